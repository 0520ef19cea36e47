"""Invariant 6: per-sequence results do not depend on what else is in the batch.

Each sequence of a batch must get exactly what it gets alone (tokens, fp32 logits within 1e-5,
finish reason, and the tokens kept and revived at every layer of every step), whatever the padding
side, with sequences that stop early, under every method.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import prompt_ids, tiny_model

import lazyprefill as lp
from lazyprefill.adapters import adapter_for
from lazyprefill.engine import Engine
from lazyprefill.scoring import Random

LENGTHS = [37, 1, 24, 50]  # a one-token prompt is its own q, and nothing else is ever a candidate
PROMPTS = [prompt_ids(n, seed=20 + i).tolist() for i, n in enumerate(LENGTHS)]
NEW = 12
SCHEDULES = ["dense", "paper", "static", "random", {0: 0.5, 2: 0.5, 4: 0.5}]
FAMILIES = ["llama_gqa_rope3", "qwen3"]


def padded(prompts: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, n_max] batch padded with a token id that is not padding anywhere else (so a leak would show)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), 7, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        span = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[b, span], mask[b, span] = torch.tensor(p), 1
    return ids, mask


def alone_schedule(schedule, family: str, b: int) -> lp.Schedule:
    """What sequence b of a batch runs: the random baseline draws with the schedule's seed + b."""
    sched = lp.parse_schedule(schedule, tiny_model(family).config.num_hidden_layers)
    if isinstance(sched.scorer, Random):
        return lp.Schedule(sched.keep, scorer=Random(seed=sched.scorer.seed + b))
    return sched


def early_eos(model, schedule) -> int:
    """A token that ends sequence 0 early while sequence 3 runs to the length limit."""
    tokens = [lp.LazyLLM(model, schedule).generate(p, max_new_tokens=NEW, eos_token_id=[]).new_tokens for p in PROMPTS]
    return next(t for t in tokens[0][1:] if t not in tokens[3])


def assert_same(batch: lp.GenerationOutput, alone: lp.GenerationOutput, b: int) -> None:
    assert batch.new_tokens == alone.new_tokens, f"sequence {b}"
    assert batch.finish_reason == alone.finish_reason, f"sequence {b}"
    assert batch.sequences.tolist() == alone.sequences.tolist()
    for step, (got, want) in enumerate(zip(batch.logits, alone.logits, strict=True)):
        assert (got - want).abs().max().item() <= 1e-5, f"sequence {b} step {step}"
    assert [(s.computed, s.candidates, s.revived) for s in batch.stats.steps] == [
        (s.computed, s.candidates, s.revived) for s in alone.stats.steps
    ], f"sequence {b}: different tokens kept or revived"
    np.testing.assert_array_equal(batch.stats.final_depth, alone.stats.final_depth)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_each_sequence_alone(family, schedule):
    model = tiny_model(family)
    eos = early_eos(model, schedule)
    kw = dict(max_new_tokens=NEW, eos_token_id=eos, return_logits=True)
    alone = [
        lp.LazyLLM(model, alone_schedule(schedule, family, b)).generate(p, **kw) for b, p in enumerate(PROMPTS)
    ]
    finished = [len(o.new_tokens) for o in alone]
    assert alone[0].finish_reason == "eos" and alone[3].finish_reason == "length", finished
    lazy = lp.LazyLLM(model, schedule)
    inputs = {"lists": (PROMPTS, None), "right": padded(PROMPTS, "right"), "left": padded(PROMPTS, "left")}
    for name, (ids, mask) in inputs.items():
        outs = lazy.generate(ids, attention_mask=mask, **kw)
        assert len(outs) == len(PROMPTS), name
        for b, (got, want) in enumerate(zip(outs, alone, strict=True)):
            assert_same(got, want, b)
    if schedule not in ("dense", "static"):  # static never revives
        assert sum(o.stats.revived for o in alone) > 0, "the case should exercise revivals"


def test_sampling_per_sequence_seed():
    """Sequence i samples with seed + i: the same tokens as alone with that seed."""
    model = tiny_model("llama_gqa_rope3")
    lazy = lp.LazyLLM(model, "paper")
    kw = dict(max_new_tokens=8, eos_token_id=[], do_sample=True, top_k=20, temperature=0.8)
    outs = lazy.generate(PROMPTS, seed=5, **kw)
    alone = [lazy.generate(p, seed=5 + b, **kw).new_tokens for b, p in enumerate(PROMPTS)]
    assert [o.new_tokens for o in outs] == alone


def test_stream_and_on_token_name_the_sequence():
    lazy = lp.LazyLLM(tiny_model("qwen3"), "paper")
    eos = early_eos(lazy.model, "paper")
    seen: list[tuple[int, int]] = []
    outs = lazy.generate(PROMPTS, max_new_tokens=NEW, eos_token_id=eos, on_token=lambda i, t: seen.append((i, t)))
    for b, out in enumerate(outs):
        assert [t for i, t in seen if i == b] == out.new_tokens
    assert len(seen) == sum(len(o.new_tokens) for o in outs)
    run = lazy.stream(PROMPTS, max_new_tokens=NEW, eos_token_id=eos)
    assert list(run) == seen


@pytest.mark.parametrize("schedule", ["paper", "static", "random"])
def test_each_kv_written_at_most_once_in_a_batch(schedule):
    """Invariants 1 and 2 for every sequence of a batch whose sequences stop at different steps."""
    adapter = adapter_for(tiny_model("llama_gqa_rope3"))
    engine = Engine(adapter, lp.parse_schedule(schedule, adapter.num_layers), max(LENGTHS) + NEW, trace=True)
    active = list(range(len(PROMPTS)))
    with torch.inference_mode():
        logits, _ = engine.prefill([torch.tensor(p) for p in PROMPTS])
        engine.settle()
        for step in range(NEW):
            if step == 4:  # sequences 0 and 2 stop
                logits, active = logits[[1, 3]], [1, 3]
            logits, _ = engine.decode(logits.argmax(dim=-1), active)
    cache = engine.cache
    assert cache.length.tolist() == [37 + 4, 1 + NEW, 24 + 4, 50 + NEW]
    layers = np.arange(adapter.num_layers)[:, None]
    for b, n in enumerate(cache.length):
        writes = cache.writes[:, b, :n]  # [L, T]
        assert writes.max() <= 1, f"sequence {b}: some (layer, token) K/V was written twice"
        np.testing.assert_array_equal(writes, (layers <= cache.depth[None, b, :n]).astype(writes.dtype))
        assert not cache.writes[:, b, n:].any(), f"sequence {b}: K/V written past its length"
    for b, steps in enumerate(engine.traces):
        assert len(steps) == 1 + cache.length[b] - LENGTHS[b], f"sequence {b}: prefill plus one trace per decoding step"
