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
from lazyprefill.plan import GRAPH_MAX_ROWS, guess_rows, replay_guesses

PROMPTS = [prompt_ids(37, seed=3), prompt_ids(24, seed=5)]
STEPS = 12
# how the next step's rows are guessed: the planner's rule, always too few (every revival overflows), plenty
GUESSES = {
    "planner": guess_rows,
    "too-few": lambda entered: [1] * len(entered),
    "plenty": lambda entered: [1] + [64] * (len(entered) - 1),
}


def drive(schedule: str, speculate: bool, family: str = "llama_gqa_rope3"):
    """Greedy prefill + STEPS decoding steps of a batch of two -> (engine, fed tokens, logits, stats per step)."""
    adapter = adapter_for(tiny_model(family))
    sched = lp.parse_schedule(schedule, adapter.num_layers, prunable=adapter.prunable_layers())
    capacity = max(p.shape[0] for p in PROMPTS) + STEPS
    engine = Engine(adapter, sched, capacity, trace=True, decode=DecodeOptions(speculate=speculate))
    fed, logits_seen, stats_seen = [], [], []
    with torch.inference_mode():
        logits, _ = engine.prefill(PROMPTS)
        engine.settle()
        for _ in range(STEPS):
            tokens = logits.argmax(dim=-1)
            fed.append(tokens.tolist())
            logits, stats = engine.decode(tokens, [0, 1])
            logits_seen.append(logits)
            stats_seen.append(stats)
    return engine, fed, torch.stack(logits_seen), stats_seen


@pytest.fixture
def spy_runs(monkeypatch):
    """Records (segment, rows asked) of every segment run."""
    runs: list[tuple[int, int]] = []
    original = Engine._run

    def run(self, index, n, keys):
        runs.append((index, n))
        original(self, index, n, keys)

    monkeypatch.setattr(Engine, "_run", run)
    return runs


CASES = [
    ("llama_gqa_rope3", "1:0.4,3:0.5"),
    ("llama_gqa_rope3", "paper"),
    ("llama_gqa_rope3", "pool(k=3, of=window(w=4)):1:0.5,3:0.5"),
    ("gemma3", "0:0.5,2:0.6"),  # sliding-window layers between the pruning layers
]


@pytest.mark.parametrize("guess", list(GUESSES))
@pytest.mark.parametrize(("family", "schedule"), CASES)
def test_speculation_computes_what_waiting_computes(monkeypatch, spy_runs, family, schedule, guess):
    monkeypatch.setattr("lazyprefill.engine.guess_rows", GUESSES[guess])
    waited, fed_w, logits_w, stats_w = drive(schedule, speculate=False, family=family)
    del spy_runs[:]
    spec, fed_s, logits_s, stats_s = drive(schedule, speculate=True, family=family)
    assert fed_s == fed_w
    torch.testing.assert_close(logits_s, logits_w, atol=1e-5, rtol=1e-5)
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
    reruns = len(spy_runs) - STEPS * len(spec.segments)
    if guess == "too-few":
        assert reruns > 0, "guesses of one row should overflow in steps that revive"
    if guess == "plenty":
        assert reruns == 0


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


def test_speculation_is_off_on_cpu_and_without_a_reselecting_pruning_layer():
    adapter = adapter_for(tiny_model("qwen3"))
    def speculates(spec, speculate) -> bool:
        schedule = lp.parse_schedule(spec, adapter.num_layers)
        return Engine(adapter, schedule, 32, decode=DecodeOptions(speculate=speculate)).speculate

    assert not speculates("paper", False)  # the default, until timed on a GPU
    assert not speculates(None, True)  # dense: no pruning layer
    assert not speculates("static:paper", True)  # pruned in prefill only: decoding steps know their rows
    assert speculates("paper", True)


def test_guess_rows_leaves_a_bucket_of_headroom_and_gives_up_after_a_burst():
    assert guess_rows(np.array([1, 1, 1])) == [1, 8, 8]
    assert guess_rows(np.array([1, 7, 1])) == [1, 8, 8]
    assert guess_rows(np.array([1, 8, 31])) == [1, 32, 32]
    assert guess_rows(np.array([1, 200, 1])) == [1, 512, 8]
    assert guess_rows(np.array([1, GRAPH_MAX_ROWS, 1])) is None


def test_replay_guesses_counts_the_steps_that_would_run_twice():
    entered = np.array([[1, 300, 5],  # after prefill: waits (no guess yet), then guesses [1, 512, 8]
                        [1, 9, 1],  # fits; guesses [1, 32, 8]
                        [1, 8, 1],  # fits
                        [1, 40, 1],  # 40 > 32: overflows; guesses [1, 128, 8]
                        [1, 600, 1],  # overflows; a burst: the next step waits
                        [1, 1, 1]])
    assert replay_guesses(entered) == (4, 2)
