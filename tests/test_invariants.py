"""SPEC.md invariants, read off the engine's own bookkeeping (cache write counts, depth, aux, traces).

The engine is driven directly (lazyprefill.engine.Engine) so that its cache can be inspected after
the generation. Batch independence (invariant 6) is out of scope until batching exists.
"""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import prompt_ids, tiny_model
from reference import Reference

import lazyprefill as lp
from lazyprefill.adapters import adapter_for
from lazyprefill.engine import Engine
from lazyprefill.scoring import Random

DECODE_STEPS = 30
SCHEDULES = [
    "paper",
    {0: 0.5, 2: 0.5, 4: 0.5},
    {0: 0.3},
    {1: 0.6, 2: 0.6, 3: 0.6, 4: 0.6},
    "static:0:0.5,2:0.5,4:0.5",
    "random:0:0.5,2:0.5,4:0.5",
    "revive(rows=2):0:0.5,2:0.5,4:0.5",
]
FAMILIES = ["llama_gqa_rope3", "qwen3", "qwen2"]


def drive(family: str, schedule, n_prompt: int = 24, steps: int = DECODE_STEPS, seed: int = 0):
    """Greedy prefill + `steps` decoding steps; returns the engine, the prompt and the fed tokens."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    engine = Engine(adapter, lp.parse_schedule(schedule, adapter.num_layers), n_prompt + steps, trace=True)
    ids = prompt_ids(n_prompt, seed)
    fed: list[int] = []
    with torch.inference_mode():
        logits, _ = engine.prefill([ids])
        engine.settle()
        for _ in range(steps):
            fed.append(int(logits.argmax()))
            logits, _ = engine.decode(torch.tensor([fed[-1]]), [0])
    return engine, ids, fed


CASES = [(f, s) for f in FAMILIES for s in SCHEDULES]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{s}" for f, s in CASES])
def driven(request):
    family, schedule = request.param
    return (family, schedule, *drive(family, schedule))


def test_each_kv_written_at_most_once_and_prefix_closed(driven):
    """Invariants 1 and 2: writes[l, i] is 1 exactly for l <= depth[i], else 0."""
    *_, engine, ids, fed = driven
    cache = engine.cache
    T = ids.shape[0] + len(fed)
    assert cache.length.tolist() == [T]
    writes = cache.writes[:, 0, :T]  # [L, T]
    assert writes.max() <= 1, "some (layer, token) K/V was written twice"
    layers = np.arange(writes.shape[0])[:, None]
    np.testing.assert_array_equal(writes, (layers <= cache.depth[None, 0, :T]).astype(writes.dtype))


def test_traces_compute_each_token_layer_once_and_prefix_closed(driven):
    """The same invariants from the per-step traces: the layers a token ran are exactly 0..depth."""
    *_, engine, ids, fed = driven
    T = ids.shape[0] + len(fed)
    ran = [[] for _ in range(T)]
    for trace in engine.traces[0]:
        for layer, positions in enumerate(trace.computed):
            for p in positions.tolist():
                ran[p].append(layer)
    for i in range(T):
        assert sorted(ran[i]) == ran[i] == list(range(engine.cache.depth[0, i] + 1)), f"token {i}"


def test_candidate_sets_shrink_and_contain_q(driven):
    """Invariant 3, plus: S_0 is every token so far, and the rows that run a layer are candidates."""
    *_, engine, ids, _ = driven
    for step, trace in enumerate(engine.traces[0]):
        q = ids.shape[0] - 1 + step
        assert trace.candidates[0].tolist() == list(range(q + 1))
        for layer, (cands, computed) in enumerate(zip(trace.candidates, trace.computed, strict=True)):
            assert q in cands.tolist() and q in computed.tolist()
            assert np.all(np.diff(cands) > 0), "candidates must stay in original order"
            assert set(computed.tolist()) <= set(cands.tolist())
            if layer > 0:
                assert set(cands.tolist()) <= set(trace.candidates[layer - 1].tolist()), f"step {step}"


def test_keep_counts_are_ceil_of_ratio(driven):
    """|S_{l+1}| = ceil(r * |S_l|) after a pruning layer (prefill only in static mode), else |S_l|."""
    family, schedule, engine, _, _ = driven
    sched = lp.parse_schedule(schedule, tiny_model(family).config.num_hidden_layers)
    steps = engine.traces[0] if sched.scorer.reselects else engine.traces[0][:1]  # static decoding: its own test
    for step, trace in enumerate(steps):
        sizes = [len(c) for c in trace.candidates]
        for layer in range(len(sizes) - 1):
            want = math.ceil(Fraction(str(sched.keep[layer])) * sizes[layer]) if layer in sched.keep else sizes[layer]
            assert sizes[layer + 1] == want, f"step {step} layer {layer}"


def test_keep_count_uses_the_ratio_as_written():
    """ceil(0.28 * 25) is 7; float multiplication gives 7.000000000000001 and would keep 8."""
    engine, _, _ = drive("llama_gqa_rope3", {1: 0.28}, n_prompt=25, steps=0)
    assert [len(c) for c in engine.traces[0][0].candidates] == [25, 25, 7, 7, 7, 7]


@pytest.mark.parametrize("schedule", [s for s in SCHEDULES if not str(s).startswith("random")], ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_aux_holds_the_output_of_layer_depth(family, schedule):
    """Invariant 2 (aux), after every step, against the reference's aux for each token with depth < L-1.

    (Random mode is left out: the reference has no random selection.)
    """
    model = tiny_model(family)
    adapter = adapter_for(model)
    sched = lp.parse_schedule(schedule, adapter.num_layers)
    engine = Engine(adapter, sched, 24 + DECODE_STEPS, trace=True)
    ref = Reference(model, sched.keep, sched.scorer)
    ids = prompt_ids(24)
    checked = 0
    with torch.inference_mode():
        logits, _ = engine.prefill([ids])
        engine.settle()
        ref.prefill(ids.tolist())
        for step in range(DECODE_STEPS + 1):
            depth = engine.cache.depth[0, : len(ref.ids)]
            assert depth.tolist() == ref.depth, f"step {step}"
            shallow = [i for i in range(len(ref.ids)) if depth[i] < adapter.num_layers - 1]
            if shallow:
                got = engine.cache.aux[0, shallow].double()
                want = torch.stack([ref.aux[i] for i in shallow])
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"step {step}")
            checked += len(shallow)
            if step < DECODE_STEPS:
                token = int(logits.argmax())
                logits, _ = engine.decode(torch.tensor([token]), [0])
                ref.decode(token)
    assert checked > 0, "the schedule should leave some tokens short of the last layer"


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_aux_equals_dense_hidden_state(family):
    """Tokens dropped at the first pruning layer p saw only dense layers: aux = transformers' layer p output."""
    p = 2
    engine, ids, _ = drive(family, {p: 0.4, 4: 0.5}, steps=0)
    dropped = np.flatnonzero(engine.cache.depth[0, : ids.shape[0]] == p)
    assert dropped.size > 0
    with torch.no_grad():
        hidden = tiny_model(family)(ids[None], output_hidden_states=True).hidden_states[p + 1][0]  # [n, d]
    torch.testing.assert_close(engine.cache.aux[0, dropped], hidden[dropped], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_scores_equal_transformers_attention_row(family):
    """Eq. 1 at the first pruning layer, where everything before is dense: the head-mean of the last row of
    transformers' own (eager) attention probabilities."""
    p = 2
    engine, ids, _ = drive(family, {p: 0.5}, steps=0)
    eager = copy.deepcopy(tiny_model(family))
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attn = eager(ids[None], output_attentions=True).attentions[p][0, :, -1, :].mean(0)  # [n]
    positions, scores = engine.traces[0][0].scores[p]
    assert positions.tolist() == list(range(ids.shape[0]))
    np.testing.assert_allclose(scores, attn.numpy(), atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_survivors_use_original_positions(family):
    """Prune once before the last layer, then run transformers' own last decoder layer on the survivors
    with their original position ids: that must be the engine's first-token logits. Renumbered
    positions give different logits, so the check can tell them apart."""
    model = tiny_model(family)
    L = model.config.num_hidden_layers
    ids = prompt_ids(24, seed=5)
    out = lp.LazyLLM(model, schedule={L - 2: 0.3}, trace=True).generate(ids, max_new_tokens=1, return_logits=True)
    survivors = torch.from_numpy(out.stats.traces[0].candidates[L - 1]).long()
    assert survivors.numel() < ids.shape[0] and not torch.equal(survivors, torch.arange(survivors.numel()))

    def last_layer_logits(position_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h = model(ids[None], output_hidden_states=True).hidden_states[L - 1][:, survivors]  # [1, n_s, d]
            rope = model.model.rotary_emb(h, position_ids[None])
            h = model.model.layers[L - 1](h, attention_mask=None, position_embeddings=rope)
            return model.lm_head(model.model.norm(h))[0, -1]

    original = last_layer_logits(survivors)
    assert (out.logits[0] - original).abs().max().item() <= 1e-5
    renumbered = last_layer_logits(torch.arange(survivors.numel()))
    assert (out.logits[0] - renumbered).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_static_never_revives(family):
    engine, ids, _fed = drive(family, "static:0:0.5,2:0.5,4:0.5")
    n = ids.shape[0]
    prefill_depth = engine.traces[0][0]
    depth_after_prefill = np.array(
        [max(layer for layer, c in enumerate(prefill_depth.computed) if i in c) for i in range(n)]
    )
    np.testing.assert_array_equal(engine.cache.depth[0, :n], depth_after_prefill)
    L = engine.a.num_layers
    for step, trace in enumerate(engine.traces[0][1:], start=1):
        q = n - 1 + step
        assert [c.tolist() for c in trace.computed] == [[q]] * L, "static decoding runs only the new token"
        for layer, cands in enumerate(trace.candidates):
            with_kv = [i for i in range(q) if engine.cache.depth[0, i] >= layer]
            assert cands.tolist() == [*with_kv, q], "static decoding attends to every cached K/V"


@pytest.mark.parametrize("family", FAMILIES)
def test_random_keeps_lazy_counts_with_other_tokens(family):
    """Same keep counts as lazy at every step and layer, different choices, reproducible by seed."""
    keep = {0: 0.5, 2: 0.5, 4: 0.5}
    prompt = prompt_ids(24, seed=6)
    lazy = lp.LazyLLM(tiny_model(family), schedule=keep, trace=True)
    rand = lp.LazyLLM(tiny_model(family), schedule=lp.Schedule(keep, scorer=Random(seed=3)), trace=True)
    a = lazy.generate(prompt, max_new_tokens=20, eos_token_id=[])
    b = rand.generate(prompt, max_new_tokens=20, eos_token_id=[])
    assert [s.candidates for s in a.stats.steps] == [s.candidates for s in b.stats.steps]
    chosen_a = [[c.tolist() for c in t.candidates] for t in a.stats.traces]
    chosen_b = [[c.tolist() for c in t.candidates] for t in b.stats.traces]
    assert chosen_a != chosen_b
    again = rand.generate(prompt, max_new_tokens=20, eos_token_id=[])
    assert again.new_tokens == b.new_tokens
    assert [[c.tolist() for c in t.candidates] for t in again.stats.traces] == chosen_b


@pytest.mark.parametrize("family", FAMILIES)
def test_dense_computes_every_token_layer_exactly_once(family):
    engine, ids, fed = drive(family, None)
    T = ids.shape[0] + len(fed)
    assert np.all(engine.cache.writes[:, 0, :T] == 1)
    assert engine.traces[0][0].computed[0].tolist() == list(range(ids.shape[0]))
    for step, trace in enumerate(engine.traces[0][1:], start=1):
        q = ids.shape[0] - 1 + step
        assert all(c.tolist() == [q] for c in trace.computed)
        assert all(c.tolist() == list(range(q + 1)) for c in trace.candidates)
