"""Block-sparse prefill attention (sparse.py) and the shortest pruned prompt (Schedule.min_prompt_tokens).

The pattern is checked against its definition and FlexAttention's result against SDPA with the same keys masked
element by element; in the engine, a pattern that keeps every block equals the dense path, composing with pruning
keeps SPEC's invariants, and a prompt below `min_prompt_tokens` gets exactly what dense gives it, alone or batched.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import prompt_ids, tiny_model
from torch.nn.attention.flex_attention import flex_attention

import lazyprefill as lp
from lazyprefill import sparse as sparse_module
from lazyprefill.adapters import adapter_for
from lazyprefill.engine import Engine
from lazyprefill.schedule import MIN_PROMPT_TOKENS, Schedule, load_schedule, parse_schedule
from lazyprefill.sparse import Sparse, parse_sparse, sparse_attention

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

SMALL = dict(block=16, rows=8, min_tokens=0)  # blocks small enough for the tiny models' prompts


def _qkv(B=2, H=4, Hkv=2, W=200, dh=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, W, dh, generator=g), torch.randn(B, Hkv, W, dh, generator=g),
            torch.randn(B, Hkv, W, dh, generator=g))


def _element_mask(seen: torch.Tensor, block: int, W: int) -> torch.Tensor:
    """[B, H, nb, nb] blocks -> [B, H, W, W] keys, causal inside."""
    keys = seen.repeat_interleave(block, 2).repeat_interleave(block, 3)[:, :, :W, :W]
    return keys & torch.ones(W, W, dtype=torch.bool).tril()


@pytest.mark.parametrize("sparse", [Sparse(top=0.2, local=2, sink=1, **SMALL), Sparse(top=0.1, local=1, sink=0,
                                                                                          **SMALL)])
@pytest.mark.parametrize("W", [200, 256], ids=["rows-padded-to-whole-blocks", "rows-filling-whole-blocks"])
def test_flex_attention_equals_sdpa_over_the_same_keys(sparse, W):
    q, k, v = _qkv(W=W)
    counts = [W, 130]
    mask = sparse.block_mask(q, k, counts, 0.25)
    seen = sparse.blocks(q, k, counts, 0.25, [True, True])
    out = sparse_attention(q, k, v, mask, 0.25)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_element_mask(seen, sparse.block, W), scale=0.25,
                                         enable_gqa=True)
    assert out.shape == q.shape
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[1, :, :130], ref[1, :, :130])
    assert seen.float().mean() < 0.8, "the pattern must skip blocks, or this test checks nothing"


def test_flex_attention_that_fails_to_compile_for_any_length_compiles_per_shape(monkeypatch, caplog):
    """Where FlexAttention does not compile with dynamic shapes (a symbolic batch, or a batch-dependent block mask),
    the process compiles it per shape from then on: the same output, one warning naming the cause, and the dynamic
    version never tried again. The per-shape compile is stood in for by the uncompiled function (the CPU's)."""
    tries = []

    def failing_backend(graph, example_inputs):
        tries.append(1)
        raise TypeError("list indices must be integers or slices, not NoneType")

    real_compile = torch.compile

    def compile_failing_dynamic(fn, dynamic=None, **kwargs):  # FlexAttention's eager path compiles its own wrapper
        if fn is not flex_attention:
            return real_compile(fn, dynamic=dynamic, **kwargs)
        return real_compile(fn, backend=failing_backend) if dynamic else fn

    monkeypatch.setattr(torch, "compile", compile_failing_dynamic)
    sparse_module._compiled_flex.cache_clear()
    q, k, v = _qkv()
    sparse = Sparse(top=0.2, local=2, sink=1, **SMALL)
    mask = sparse.block_mask(q, k, [200, 130], 0.25)
    try:
        with caplog.at_level(logging.WARNING, logger="lazyprefill.sparse"):
            out = sparse_attention(q, k, v, mask, 0.25, compiled=True)
            tried = len(tries)
            again = sparse_attention(q, k, v, mask, 0.25, compiled=True)
    finally:
        sparse_module._compiled_flex.cache_clear()
        torch._dynamo.reset()
    torch.testing.assert_close(out, sparse_attention(q, k, v, mask, 0.25, compiled=False))
    torch.testing.assert_close(again, out)
    assert tried >= 1 and len(tries) == tried
    assert [r.getMessage() for r in caplog.records if r.name == "lazyprefill.sparse"] == [
        "FlexAttention failed to compile with dynamic shapes; it compiles per shape from now on: "
        "TypeError: list indices must be integers or slices, not NoneType"]


def test_pattern_keeps_sinks_local_window_top_blocks_and_the_last_rows():
    sparse = Sparse(top=0.25, local=2, sink=1, **SMALL)
    q, k, _ = _qkv()
    counts = [200, 130]
    seen = sparse.blocks(q, k, counts, 0.25, [True, True])  # [B, H, nb, nb]
    nb = seen.shape[-1]
    assert not torch.triu(seen, diagonal=1).any(), "a block after the query block is seen"
    for b, n in enumerate(counts):
        blocks = math.ceil(n / sparse.block)
        last = (n - sparse.rows) // sparse.block
        for qb in range(blocks):
            row = seen[b, :, qb]  # [H, nb]
            assert row[:, : min(sparse.sink, qb + 1)].all() and row[:, max(qb - sparse.local + 1, 0): qb + 1].all()
            if qb >= last:
                assert row[:, : qb + 1].all(), "the blocks of the last rows attend to every earlier block"
        vertical = seen[b, :, blocks - 1 - sparse.local - 1]  # a row before the last rows: sinks, window, top
        extra = vertical[:, sparse.sink: blocks - 1 - sparse.local - sparse.local].sum(-1)
        assert (extra <= math.ceil(sparse.top * blocks)).all()
    real = math.ceil(130 / sparse.block)
    assert seen[1, :, real:].sum() == (nb - real) * seen.shape[1], "a padding block of rows must see itself only"
    assert nb == math.ceil(200 / sparse.block)


def test_pattern_of_a_sequence_does_not_depend_on_its_batch():
    sparse = Sparse(top=0.2, local=2, **SMALL)
    q, k, _ = _qkv()
    both = sparse.blocks(q, k, [200, 130], 0.25, [True, True])
    alone = sparse.blocks(q[1:, :, :130], k[1:, :, :130], [130], 0.25, [True])
    nb = alone.shape[-1]
    assert torch.equal(both[1, :, :nb, :nb], alone[0])


def test_short_or_excluded_sequences_attend_densely():
    q, k, _ = _qkv()
    sparse = Sparse(top=0.1, local=1, block=16, rows=8, min_tokens=150)
    assert sparse.block_mask(q, k, [140, 130], 0.25) is None, "no sequence reaches min_tokens: plain attention"
    seen = sparse.blocks(q, k, [200, 130], 0.25, [True, False])
    causal = torch.ones_like(seen[1, 0]).tril()
    assert torch.equal(seen[1, :, :9, :9], causal[None, :9, :9].expand(4, 9, 9))
    assert not seen[0].tril().all()


@pytest.mark.parametrize("family", ["llama_gqa_rope3", "gemma3"])
def test_sparse_with_every_block_equals_the_dense_path(family):
    model = tiny_model(family)
    a = adapter_for(model)
    ids = prompt_ids(120)

    def prefill(schedule: Schedule) -> torch.Tensor:
        with torch.inference_mode():
            return Engine(a, schedule, 121).prefill([ids])[0]

    every = Schedule(sparse=Sparse(top=1.0, local=1, from_layer=0, **SMALL))
    torch.testing.assert_close(prefill(every), prefill(Schedule()), atol=1e-4, rtol=1e-4)
    pruned = parse_schedule("paper", a.num_layers, a.prunable_layers(), a.presets)
    both = Schedule(pruned.keep, pruned.scorer, sparse=every.sparse)
    torch.testing.assert_close(prefill(both), prefill(pruned), atol=1e-4, rtol=1e-4)


def test_sparse_changes_prefill_and_keeps_the_invariants():
    """Sparse attention changes what rows compute, never which (token, layer) K/V is written: each once,
    prefix-closed, with pruning and revivals in decoding."""
    model = tiny_model("llama_gqa_rope3")
    a = adapter_for(model)
    sparse = Sparse(top=0.1, local=1, from_layer=1, **SMALL)
    schedule = Schedule({1: 0.5, 3: 0.5}, sparse=sparse)
    ids = prompt_ids(150)
    engine = Engine(a, schedule, 150 + 10, trace=True)
    with torch.inference_mode():
        logits, _ = engine.prefill([ids])
        engine.settle()
        pruned = Engine(a, Schedule({1: 0.5, 3: 0.5}), 151).prefill([ids])[0]
        assert (logits - pruned).abs().max() > 1e-3, "the option did not change prefill"
        for _ in range(10):
            logits, _ = engine.decode(logits.argmax(-1), [0])
    c = engine.cache
    T = 160
    writes = c.writes[:, 0, :T]
    assert writes.max() <= 1
    layers = np.arange(a.num_layers)[:, None]
    np.testing.assert_array_equal(writes, (layers <= c.depth[None, 0, :T]).astype(writes.dtype))


# --------------------------------------------------------------------------- min_prompt_tokens
def _generate(model, schedule, prompts, steps=8):
    lazy = lp.LazyLLM(model, schedule)
    out = lazy.generate(prompts, max_new_tokens=steps, return_logits=True)
    return out if isinstance(out, list) else [out]


def test_a_prompt_below_min_prompt_tokens_gets_what_dense_gives_it():
    model = tiny_model("llama_gqa_rope3")
    short, long = prompt_ids(40, 1).tolist(), prompt_ids(90, 2).tolist()
    dense = _generate(model, "dense", [short])[0]
    alone = _generate(model, "paper+min=64", [short])[0]
    assert alone.new_tokens == dense.new_tokens
    torch.testing.assert_close(torch.stack(alone.logits), torch.stack(dense.logits), atol=1e-4, rtol=1e-4)
    assert all(len(set(s.candidates)) == 1 for s in alone.stats.steps), "a short prompt's steps pruned"
    batched = _generate(model, "paper+min=64", [short, long])
    pruned_long = _generate(model, "paper", [long])[0]
    assert batched[0].new_tokens == dense.new_tokens and batched[1].new_tokens == pruned_long.new_tokens
    torch.testing.assert_close(torch.stack(batched[1].logits), torch.stack(pruned_long.logits), atol=1e-4, rtol=1e-4)
    assert batched[1].stats.steps[0].candidates[-1] < 90


# ------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text", ["paper+sparse(top=0.1, local=16)+min=4096", "dense+sparse", "balanced+min=512",
                                  "pool(k=7):9:0.5+sparse(block=256, min_tokens=1048576)"])
def test_options_survive_describe_and_schedule_files(text, tmp_path):
    schedule = parse_schedule(text, 32)
    assert parse_schedule(schedule.describe(), 32) == schedule
    assert load_schedule(schedule.save(tmp_path / "s.json"), 32) == schedule


@pytest.mark.parametrize("text, message", [
    ("paper+fast", "unknown schedule option"),
    ("paper+min=many", "write min=N"),
    ("paper+sparse(top=0)", "top=0"),
    ("paper+sparse(block=100)", "power of two"),
    ("paper+sparse(width=3)", "fields: top="),
    ("paper+sparse(local=1.5)", "must be a number"),
])
def test_bad_options_say_what_to_write(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_schedule(text, 32)


def test_min_prompt_tokens_must_be_a_count_and_defaults_by_device():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="min_prompt_tokens"):
            Schedule({1: 0.5}, min_prompt_tokens=bad)
    by_device = Schedule({1: 0.5})
    assert by_device.min_prompt("cuda") == MIN_PROMPT_TOKENS["cuda"] and by_device.min_prompt("cpu") == 0
    assert Schedule({1: 0.5}, min_prompt_tokens=0).min_prompt("cuda") == 0
    assert parse_sparse("sparse").spec() == "sparse"
