"""Sliding-window models (Gemma 3, and Mistral/Qwen2 with a window): exact when dense, SPEC when pruned.

The windows here (8 and 12 tokens) are far shorter than the prompts (40-56 tokens), so every
sliding layer masks keys by original position in prefill, in decoding and for revived rows.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers as tf
from helpers import GEMMA3, prompt_ids, random_tiny, tiny_model
from reference import Reference
from test_equivalence import transformers_logits

import lazyprefill as lp
from lazyprefill import attention
from lazyprefill.adapters import adapter_for
from lazyprefill.attention import decode_mask, prefill_attention
from lazyprefill.engine import Engine
from lazyprefill.eval.runner import make_methods
from lazyprefill.schedule import GEMMA3_PRESETS
from lazyprefill.scoring import Random, Revive, parse_scorer

ATOL = 1e-4
STEPS = 20
# Gemma 3's own layout (full attention every third layer, the last one full), a 12-token window,
# final logit soft-capping and linear rope scaling on the global table.
GEMMA3_LOCAL = dict(
    GEMMA3,
    sliding_window=12,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    final_logit_softcapping=3.0,
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    },
)
WINDOWED = {
    "gemma3_local": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, GEMMA3_LOCAL),
    "mistral_window": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 10}),
    # Qwen2 slides from layer max_window_layers on
    "qwen2_window": (
        tf.Qwen2Config, tf.Qwen2ForCausalLM, {"use_sliding_window": True, "sliding_window": 9, "max_window_layers": 3}
    ),
}


@functools.cache
def windowed_model(family: str) -> torch.nn.Module:
    if family == "gemma3":
        return tiny_model("gemma3")
    return random_tiny(*WINDOWED[family], seed=1, norm_center=0.0 if "gemma" in family else 1.0)


FAMILIES = ["gemma3", *WINDOWED]


@pytest.fixture(scope="module", autouse=True, params=["one call", "sliced"])
def window_calls(request):
    """Every test twice: windowed layers in one attention call, and sliced into calls of a few rows (what
    prompts longer than attention.WINDOW_ROWS get), which must not change a result."""
    with pytest.MonkeyPatch.context() as mp:
        if request.param == "sliced":
            mp.setattr(attention, "WINDOW_ROWS", 7)  # at most 2 * window: 16 to 24 rows a call here
        yield request.param


def max_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))


# ------------------------------------------------------------------------- layers and windows
def test_windows_and_prunable_layers_follow_the_config():
    gemma = adapter_for(windowed_model("gemma3_local"))
    assert [gemma.window(layer) for layer in range(6)] == [12, 12, None, 12, 12, None]
    assert gemma.prunable_layers() == [2]  # layer 5 is full but last
    qwen2 = adapter_for(windowed_model("qwen2_window"))
    assert [qwen2.window(layer) for layer in range(6)] == [None, None, None, 9, 9, 9]
    assert qwen2.prunable_layers() == [0, 1, 2]
    assert adapter_for(windowed_model("mistral_window")).prunable_layers() is None  # every layer slides
    assert adapter_for(tiny_model("llama_gqa_rope3")).window(0) is None


# ------------------------------------------------------------------- dense equals transformers
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("schedule", [None, "ones"])
def test_dense_equals_transformers_in_prefill_and_every_decoding_step(family, schedule):
    model = windowed_model(family)
    if schedule == "ones":  # keep ratio 1.0 at every layer that may prune: still dense (invariant 5)
        prunable = adapter_for(model).prunable_layers() or range(5)
        schedule = {layer: 1.0 for layer in prunable}
    ids = prompt_ids(44, seed=3)
    out = lp.LazyLLM(model, schedule).generate(ids, max_new_tokens=STEPS + 1, eos_token_id=[], return_logits=True)
    assert max_diff(out.logits, transformers_logits(model, ids, out.new_tokens[:-1])) <= ATOL


@pytest.mark.parametrize("family", ["gemma3", "gemma3_local"])
def test_the_window_bites(family):
    """The prompts are long enough that a model without its window gives other logits: the tests above can fail."""
    model = windowed_model(family)
    ids = prompt_ids(44, seed=3)
    lazy = lp.LazyLLM(model, None)
    lazy.adapter.windows = [None] * 6
    out = lazy.generate(ids, max_new_tokens=4, eos_token_id=[], return_logits=True)
    assert max_diff(out.logits, transformers_logits(model, ids, out.new_tokens[:-1])) > 100 * ATOL


@pytest.mark.parametrize("family", ["gemma3", "gemma3_local"])
def test_dense_batch_equals_transformers_per_sequence(family):
    model = windowed_model(family)
    prompts = [prompt_ids(n, seed=10 + n).tolist() for n in (40, 9, 56)]
    outs = lp.LazyLLM(model, None).generate(prompts, max_new_tokens=12, eos_token_id=[], return_logits=True)
    for prompt, out in zip(prompts, outs, strict=True):
        want = transformers_logits(model, torch.tensor(prompt), out.new_tokens[:-1])
        assert max_diff(out.logits, want) <= ATOL


# ---------------------------------------------------------- pruned: the float64 reference, invariants
CASES = [
    ("gemma3", {0: 0.5, 2: 0.5, 4: 0.5}),
    ("gemma3", "paper"),
    ("gemma3", "static:0:0.5,2:0.5,4:0.5"),
    ("gemma3_local", {2: 0.4}),
    ("qwen2_window", {0: 0.6, 2: 0.5}),
    ("mistral_window", {1: 0.5, 3: 0.5}),
]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{s}" for f, s in CASES])
def pruned(request):
    family, spec = request.param
    model = windowed_model(family)
    ids = prompt_ids(48, seed=5)
    lazy = lp.LazyLLM(model, spec, trace=True)
    out = lazy.generate(ids, max_new_tokens=STEPS + 1, eos_token_id=[], return_logits=True)
    ref = Reference(model, lazy.schedule.keep, lazy.schedule.scorer)
    ref_logits = [ref.prefill(ids.tolist())] + [ref.decode(t) for t in out.new_tokens[:-1]]
    return lazy, out, ref, ref_logits


def test_pruned_runs_equal_the_float64_reference(pruned):
    """Same candidate sets, rows computed (so the same revivals), logits: the window by original position."""
    lazy, out, ref, ref_logits = pruned
    for step, (trace, expected) in enumerate(zip(out.stats.traces, ref.steps, strict=True)):
        assert [c.tolist() for c in trace.candidates] == expected.candidates, f"S_l differ at step {step}"
        assert [c.tolist() for c in trace.computed] == expected.computed, f"computed rows differ at step {step}"
    assert max((g.double() - w).abs().max().item() for g, w in zip(out.logits, ref_logits, strict=True)) <= ATOL
    assert out.stats.final_depth.tolist() == ref.depth
    if lazy.schedule.scorer.reselects:
        assert out.stats.revived > 0, "the case was chosen so that revived rows attend through the window"


def test_pruned_runs_compute_each_token_layer_once(pruned):
    """Invariants 1 and 2 from the traces: the layers a token ran are exactly 0..its final depth."""
    _, out, _, _ = pruned
    ran: dict[int, list[int]] = {}
    for trace in out.stats.traces:
        for layer, positions in enumerate(trace.computed):
            for p in positions.tolist():
                ran.setdefault(p, []).append(layer)
    for p, depth in enumerate(out.stats.final_depth.tolist()):
        assert ran.get(p, []) == list(range(depth + 1)), f"token {p}"


def test_engine_writes_each_kv_once_under_a_window():
    model = windowed_model("gemma3_local")
    adapter = adapter_for(model)
    engine = Engine(adapter, lp.parse_schedule({2: 0.3}, 6, prunable=adapter.prunable_layers()), 64, trace=True)
    fed = []
    with torch.inference_mode():
        logits, _ = engine.prefill([prompt_ids(40, seed=8)])
        engine.settle()
        for _ in range(16):
            fed.append(int(logits.argmax()))
            logits, _ = engine.decode(torch.tensor([fed[-1]]), [0])
    writes, depth = engine.cache.writes[:, 0, :56], engine.cache.depth[0, :56]
    assert writes.max() == 1
    np.testing.assert_array_equal(writes, (np.arange(6)[:, None] <= depth[None]).astype(writes.dtype))


def test_pruned_batch_equals_each_sequence_alone():
    model = windowed_model("gemma3_local")
    prompts = [prompt_ids(n, seed=30 + n).tolist() for n in (44, 13, 52)]
    kw = {"max_new_tokens": 10, "eos_token_id": [], "return_logits": True}
    batch = lp.LazyLLM(model, {2: 0.4}).generate(prompts, **kw)
    for prompt, got in zip(prompts, batch, strict=True):
        alone = lp.LazyLLM(model, {2: 0.4}).generate(prompt, **kw)
        assert got.new_tokens == alone.new_tokens
        assert max_diff(got.logits, alone.logits) <= 1e-5
        assert [s.computed for s in got.stats.steps] == [s.computed for s in alone.stats.steps]


# --------------------------------------------------------------------------- where it may prune
def test_pruning_at_a_sliding_layer_is_refused_naming_the_layers_that_can():
    with pytest.raises(ValueError, match=r"cannot prune at layer\(s\) 1, 3: .*sliding window.*: 0, 2, 4$"):
        lp.LazyLLM(windowed_model("gemma3"), "1:0.5,3:0.5,4:0.5")
    with pytest.raises(ValueError, match=r"cannot prune at layer\(s\) 0: .*: 2$"):
        lp.LazyLLM(windowed_model("gemma3_local"), lp.Schedule({0: 0.5}, scorer=Random()))


def test_presets_land_on_layers_that_can_prune():
    """paper is {1, 3, 4} on six layers: the nearest full-attention layers, ratios multiplied where they meet."""
    assert lp.LazyLLM(windowed_model("gemma3"), "paper").schedule.keep == {0: 0.7, 2: 0.7, 4: 0.7}
    assert lp.LazyLLM(windowed_model("gemma3_local"), "static:paper").schedule.keep == {2: 0.343}
    # Gemma 3 270M: full attention at 5, 11 and 17 of 18 layers, paper's 5, 10, 16 -> 5 and 11
    assert lp.parse_schedule("paper", 18, prunable=[5, 11]).keep == {5: 0.7, 11: 0.49}
    with pytest.raises(ValueError, match="has none: use 'dense'"):
        lp.parse_schedule("paper", 6, prunable=[])


def test_gemma3_has_its_own_presets_chosen_on_its_own_evidence():
    """balanced and fast were chosen on gemma3-270m (schedule.GEMMA3_PRESETS); other families keep theirs."""
    gemma, mistral = windowed_model("gemma3"), windowed_model("mistral_window")
    pool = parse_scorer("pool(k=7, of=window(w=16))")
    # the default: 0.6 of 6 layers -> full layer 2 (layers 0, 2 and 4 attend fully), prompts under 8K dense on every
    # device (issue 24, target 5); a user's +min still decides
    default = lp.Schedule({2: 0.5}, Revive(rows=8, of=pool), min_prompt_tokens=8192)
    assert lp.LazyLLM(gemma).schedule == default
    assert default.min_prompt("cpu") == default.min_prompt("cuda") == 8192
    assert lp.LazyLLM(gemma, "balanced+min=0").schedule.min_prompt("cpu") == 0
    protect = parse_scorer(f"protect(sink=4, recent=16, of={pool.spec()})")
    assert lp.LazyLLM(gemma, "fast").schedule == lp.Schedule({0: 0.3}, protect)
    assert lp.LazyLLM(mistral).schedule == lp.parse_schedule("balanced", 6)  # the general preset: `last` at 0.67
    with pytest.raises(ValueError, match=r"use a preset \(balanced, paper, long\)"):
        lp.LazyLLM(mistral, "fast")
    # Gemma 3 270M: layers 5 and 11 can prune
    assert lp.parse_schedule("balanced", 18, [5, 11], GEMMA3_PRESETS) == lp.Schedule({11: 0.5}, Revive(rows=8, of=pool),
                                                                                   min_prompt_tokens=8192)
    names = [m.name for m in make_methods(["presets"], 18, [], [5, 11], GEMMA3_PRESETS)]
    assert names == ["dense", "balanced", "fast", "paper", "long"]


# ------------------------------------------------------------------------------ the mask helpers
def test_prefill_attention_masks_the_window_by_original_position():
    """Compacted rows with gaps in their positions against a softmax written out by hand."""
    torch.manual_seed(0)
    pos = torch.tensor([[0, 3, 4, 9, 10, 15, 17, 18]])  # [1, W] survivors of a pruning layer
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    got = prefill_attention(q, k, v, pos, window=6, longest=19, scaling=0.5)
    p = pos[0]
    allowed = (p[None, :] <= p[:, None]) & (p[None, :] > p[:, None] - 6)  # [W, W]
    logits = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(got, logits.softmax(-1) @ v)
    plain = prefill_attention(q, k, v, pos, window=None, longest=19, scaling=0.5)
    assert not torch.allclose(got, plain)


@pytest.mark.parametrize("rows_per_call", [1, 3, 5, 7, 40, None])
def test_prefill_attention_in_slices_equals_one_masked_softmax(rows_per_call):
    """A right-padded batch of two pruned sequences (GQA): however the windowed layer is sliced into calls,
    every real row gets the softmax over exactly the keys in its window."""
    torch.manual_seed(1)
    window, W = 5, 30
    pos = torch.stack([torch.randperm(80)[:W].sort().values, torch.randperm(50)[:W].sort().values])  # [2, W]
    valid = torch.tensor([W, 22])  # the second sequence's last 8 rows are padding
    q = torch.randn(2, 4, W, 8)
    k, v = torch.randn(2, 2, W, 8), torch.randn(2, 2, W, 8)
    got = prefill_attention(q, k, v, pos, window, longest=80, scaling=0.3, rows_per_call=rows_per_call)
    for b in range(2):
        n, p = int(valid[b]), pos[b, : int(valid[b])]
        allowed = (p[None, :] <= p[:, None]) & (p[None, :] > p[:, None] - window)  # [n, n]
        kb, vb = (x[b, :, :n].repeat_interleave(2, dim=0) for x in (k, v))  # [H, n, dh]
        logits = (q[b, :, :n] @ kb.transpose(-1, -2) * 0.3).masked_fill(~allowed, float("-inf"))
        torch.testing.assert_close(got[b, :, :n], logits.softmax(-1) @ vb)
    assert torch.isfinite(got).all()  # padding rows see at least themselves: no NaN to leak


@pytest.mark.parametrize("fused", [True, False])
def test_grouped_sdpa_equals_the_softmax_over_each_heads_group(fused, monkeypatch):
    """Both paths of attention.sdpa (K/V grouped into a fused kernel, or repeated per query head where none takes
    them: fp32 or a mask on CUDA) give each query head the softmax over its own K/V head's keys."""
    monkeypatch.setattr(attention, "fused_gqa", lambda q, masked: fused)
    torch.manual_seed(2)
    q, k, v = torch.randn(2, 6, 9, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    got = attention.sdpa(q, k, v, is_causal=True, scale=0.4)
    kh, vh = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)  # heads 0-2 read K/V head 0
    logits = (q @ kh.transpose(-1, -2) * 0.4).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(got, logits.softmax(-1) @ vh)
    masked = attention.sdpa(q, k, v, attn_mask=causal[None, None], scale=0.4)
    torch.testing.assert_close(masked, got)


def test_fused_gqa_names_where_a_fused_kernel_takes_grouped_kv():
    """Flash attention is the only CUDA kernel that takes grouped K/V, and it takes neither fp32 nor a mask."""
    def q(device: str, dtype: torch.dtype) -> SimpleNamespace:
        return SimpleNamespace(is_cuda=device == "cuda", dtype=dtype)

    assert attention.fused_gqa(q("cuda", torch.bfloat16), masked=False)
    assert not attention.fused_gqa(q("cuda", torch.bfloat16), masked=True)
    assert not attention.fused_gqa(q("cuda", torch.float32), masked=False)  # Gemma 3's fp32 evaluations
    assert attention.fused_gqa(q("cpu", torch.float32), masked=True)


def test_the_repeated_kv_path_equals_transformers_in_prefill_continuation_and_decoding(monkeypatch):
    """What CUDA fp32 runs (attention.sdpa repeating grouped K/V): a dense prefill, a session's continuation and
    their decoding steps still equal transformers' forward."""
    monkeypatch.setattr(attention, "fused_gqa", lambda q, masked: False)
    model = windowed_model("gemma3")
    assert model.config.num_attention_heads > model.config.num_key_value_heads
    ids = prompt_ids(44, seed=3)
    lazy = lp.LazyLLM(model, None)
    out = lazy.generate(ids, max_new_tokens=STEPS + 1, eos_token_id=[], return_logits=True)
    assert max_diff(out.logits, transformers_logits(model, ids, out.new_tokens[:-1])) <= ATOL
    session = lazy.session(ids[:30], room=40)
    out = session.generate(ids[30:], max_new_tokens=STEPS + 1, eos_token_id=[], return_logits=True)
    assert max_diff(out.logits, transformers_logits(model, ids, out.new_tokens[:-1])) <= ATOL


def test_decode_mask():
    in_s = torch.tensor([[True, False, True, True, True, True]])  # [1, T]
    assert decode_mask(None, torch.tensor([[5]]), 6, None) is None
    assert decode_mask(None, torch.tensor([[5]]), 6, 6) is None  # the window reaches back to position 0
    assert decode_mask(in_s, torch.tensor([[5]]), 6, 3).tolist() == [[[False, False, False, True, True, True]]]
    revived = decode_mask(in_s, torch.tensor([[2, 5]]), 6, 2)  # [1, 2, T]: causal and windowed per row
    assert revived.tolist() == [[[False, False, True, False, False, False], [False, False, False, False, True, True]]]
