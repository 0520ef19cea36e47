"""Speculative decoding steps: every segment laid out at a guessed row count, one wait a step, and a
segment that overflows its guess changes nothing and runs again at its real size (engine.decode).

Speculating must not change what a step computes: against the engine that waits for every count, the
same tokens, logits, stats, traces, depths and K/V writes, whether every guess fits, none does, or the
planner guesses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import prompt_ids, tiny_model

import lazyprefill as lp
from lazyprefill.adapters import adapter_for
from lazyprefill.engine import DecodeOptions, Engine
from lazyprefill.plan import SPECULATE_MAX_ROWS, Replay, first_overflow, guess_rows, replay_guesses

PROMPTS = [prompt_ids(37, seed=3), prompt_ids(24, seed=5)]
STEPS, BOTH = 12, 7  # decoding steps; sequence 0 stops after BOTH of them, sequence 1 goes on alone
# how the next step's rows are guessed: the planner's rule, always too few (every revival overflows), plenty
GUESSES = {
    "planner": guess_rows,
    "too-few": lambda entered, batch=1: [1] * len(entered),
    "plenty": lambda entered, batch=1: [1] + [32] * (len(entered) - 1),
}


def drive(schedule: str, speculate: bool, family: str = "llama_gqa_rope3"):
    """Greedy prefill + STEPS decoding steps of a batch of two, the first stopping early
    -> (engine, and per step: fed tokens, logits, stats)."""
    adapter = adapter_for(tiny_model(family))
    sched = lp.parse_schedule(schedule, adapter.num_layers, prunable=adapter.prunable_layers())
    capacity = max(p.shape[0] for p in PROMPTS) + STEPS
    engine = Engine(adapter, sched, capacity, trace=True, decode=DecodeOptions(speculate=speculate))
    fed, logits_seen, stats_seen = [], [], []
    with torch.inference_mode():
        logits, _ = engine.prefill(PROMPTS)
        engine.settle()
        for step in range(STEPS):
            seqs = [0, 1] if step < BOTH else [1]
            if step == BOTH:
                logits = logits[1:]
            tokens = logits.argmax(dim=-1)
            fed.append(tokens.tolist())
            logits, stats = engine.decode(tokens, seqs)
            logits_seen.append(logits)
            stats_seen.append(stats)
    return engine, fed, logits_seen, stats_seen


@pytest.fixture
def overflows(monkeypatch):
    """What engine.decode found after every step that speculated: the first segment that overflowed, or None."""
    seen: list[int | None] = []

    def spy(entered, rows):
        seen.append(first_overflow(entered, rows))
        return seen[-1]

    monkeypatch.setattr("lazyprefill.engine.first_overflow", spy)
    return seen


CASES = [
    ("llama_gqa_rope3", "1:0.4,3:0.5"),
    ("llama_gqa_rope3", "paper"),
    ("llama_gqa_rope3", "pool(k=3, of=window(w=4)):1:0.5,3:0.5"),
    ("gemma3", "0:0.5,2:0.6"),  # sliding-window layers between the pruning layers
]


@pytest.mark.parametrize("guess", list(GUESSES))
@pytest.mark.parametrize(("family", "schedule"), CASES)
def test_speculation_computes_what_waiting_computes(monkeypatch, overflows, family, schedule, guess):
    monkeypatch.setattr("lazyprefill.engine.guess_rows", GUESSES[guess])
    waited, fed_w, logits_w, stats_w = drive(schedule, speculate=False, family=family)
    assert not overflows, "the engine that waits guesses nothing"
    spec, fed_s, logits_s, stats_s = drive(schedule, speculate=True, family=family)
    assert fed_s == fed_w
    for got, want in zip(logits_s, logits_w, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert stats_s == stats_w
    assert sum(sum(s.revived) for step in stats_w for s in step) > 0, "nothing revived: nothing to guess"
    a, b = waited.cache, spec.cache
    np.testing.assert_array_equal(b.writes, a.writes)
    assert b.writes.max() <= 1, "a speculative segment wrote some (layer, token) K/V a second time"
    np.testing.assert_array_equal(b.depth, a.depth)
    resumable = torch.from_numpy((a.depth >= 0) & (a.depth < waited.a.num_layers - 1))  # aux is read again
    torch.testing.assert_close(b.aux[:, : b.capacity][resumable], a.aux[:, : a.capacity][resumable], atol=1e-5,
                               rtol=1e-5)
    for steps_w, steps_s in zip(waited.traces, spec.traces, strict=True):
        for tw, ts in zip(steps_w, steps_s, strict=True):
            assert [c.tolist() for c in ts.computed] == [c.tolist() for c in tw.computed]
            assert [c.tolist() for c in ts.candidates] == [c.tolist() for c in tw.candidates]
            assert ts.scores.keys() == tw.scores.keys()
            for layer, (pos, score) in tw.scores.items():
                np.testing.assert_array_equal(ts.scores[layer][0], pos)
                np.testing.assert_allclose(ts.scores[layer][1], score, rtol=1e-5, atol=1e-6)
    if guess != "planner":  # every step after the first lays its segments out on a guess
        assert len(overflows) == STEPS - 1
    if guess == "too-few":
        assert any(o is not None for o in overflows), "guesses of one row should overflow in steps that revive"
    if guess == "plenty":
        assert all(o is None for o in overflows)


def test_lazyllm_passes_decode_options_to_its_engine():
    model = tiny_model("llama_gqa_rope3")
    kw = {"max_new_tokens": STEPS, "eos_token_id": [], "return_logits": True}
    waited = lp.LazyLLM(model, "1:0.4,3:0.5").generate(PROMPTS, **kw)
    spec = lp.LazyLLM(model, "1:0.4,3:0.5", decode=lp.DecodeOptions(speculate=True))
    calls = []
    original = Engine.decode

    def decode(self, tokens, seqs):
        calls.append(self.speculate)
        return original(self, tokens, seqs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Engine, "decode", decode)
        got = spec.generate(PROMPTS, **kw)
    assert calls and all(calls)
    for a, b in zip(waited, got, strict=True):
        assert a.new_tokens == b.new_tokens
        torch.testing.assert_close(torch.stack(b.logits), torch.stack(a.logits), atol=1e-5, rtol=1e-5)


def test_speculation_is_opt_in_and_only_where_a_step_waits():
    adapter = adapter_for(tiny_model("qwen3"))

    def speculates(spec, speculate) -> bool:
        schedule = lp.parse_schedule(spec, adapter.num_layers)
        return Engine(adapter, schedule, 32, decode=DecodeOptions(speculate=speculate)).speculate

    assert not speculates("paper", False)  # the default, until timed on a GPU
    assert not speculates(None, True)  # dense: no pruning layer
    assert not speculates("static:paper", True)  # pruned in prefill only: decoding steps know their rows
    assert speculates("paper", True)


def test_guess_rows_leaves_headroom_and_gives_up_on_large_counts():
    assert guess_rows(np.array([1, 1, 1])) == [1, 32, 32]
    assert guess_rows(np.array([1, 8, 31])) == [1, 32, 32]
    assert guess_rows(np.array([1, SPECULATE_MAX_ROWS, 1])) is None  # the next bucket would be 128 rows
    assert guess_rows(np.array([1, 40, 1]), max_rows=128) == [1, 128, 32]


def test_guess_floor_is_shared_by_the_batch():
    """A batch lays out every sequence's rows in one matrix: the floor is 32 rows over the batch, not per sequence."""
    assert guess_rows(np.array([1, 0, 0]), batch=8) == [1, 4, 4]
    assert guess_rows(np.array([1, 5, 0]), batch=8) == [1, 8, 4]
    assert guess_rows(np.array([1, 0, 0]), batch=64) == [1, 1, 1]


def test_first_overflow_is_the_first_segment_over_its_rows():
    assert first_overflow(np.array([1, 8, 3]), [1, 8, 8]) is None
    assert first_overflow(np.array([1, 9, 30]), [1, 8, 8]) == 1


def test_replay_guesses_counts_the_steps_that_would_run_twice():
    entered = np.array([[1, 300, 5],  # a burst: the next step waits
                        [1, 9, 1],  # waits; then guesses [1, 32, 32]
                        [1, 8, 1],  # fits; guesses [1, 32, 32]
                        [1, 40, 1],  # 40 > 32: overflows; the next step waits
                        [1, 3, 1],  # waits; guesses [1, 32, 32]
                        [1, 1, 33]])  # 33 > 32: overflows
    needed = 8 + 1 + 40 + 1 + 1 + 33
    assert replay_guesses(entered) == Replay(speculated=3, overflowed=2, laid_out=3 * 64, needed=needed)
    assert replay_guesses(entered, max_rows=512).speculated == 5  # only the burst's next step waits
