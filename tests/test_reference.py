"""The fast engine agrees with the loop-and-mask reference of SPEC.md over prefill + 30 decoding steps.

Both see the same tokens (the engine's greedy choices, no EOS), so every step can be compared:
candidate sets, rows computed (hence which tokens were revived), importance scores, logits and the
final depth of every token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import prompt_ids, tiny_model
from reference import Reference

import lazyprefill as lp

DECODE_STEPS = 30
ATOL = 1e-5

# With 6 layers, "paper" is {1: 0.7, 3: 0.7, 4: 0.7}.
SCHEDULES = {
    "paper": "paper",
    "aggressive": {0: 0.5, 2: 0.5, 4: 0.5},
    "near_one": {1: 0.95, 3: 0.9},
    "layer0_only": {0: 0.3},
    "last_prunable": {4: 0.4},
    "every_layer": {0: 0.8, 1: 0.8, 2: 0.8, 3: 0.8, 4: 0.8},
    "only_q_survives": {2: 0.01},  # ceil(0.01 * n) = 1: q alone goes on, nothing ever revives
    "static": "static:0:0.5,2:0.5,4:0.5",
}
NO_REVIVAL = {"static", "only_q_survives"}
# (family, schedule name, prompt length)
CASES = (
    [(family, name, 24) for family in ("llama_gqa_rope3", "qwen3") for name in SCHEDULES]
    + [(family, "aggressive", 24) for family in ("llama_mha", "mistral", "qwen2", "qwen3_head32")]
    + [("llama_gqa_rope3", "aggressive", n) for n in (1, 2, 3)]
    + [("llama_gqa_rope3", "paper", 96), ("qwen3", "aggressive", 96)]  # beyond llama3's original 64 positions
)


def run_both(family: str, spec, n_prompt: int = 24, seed: int = 0):
    model = tiny_model(family)
    ids = prompt_ids(n_prompt, seed)
    lazy = lp.LazyLLM(model, schedule=spec, trace=True)
    out = lazy.generate(ids, max_new_tokens=DECODE_STEPS + 1, eos_token_id=[], return_logits=True)
    ref = Reference(model, lazy.schedule.keep, lazy.schedule.scorer)
    ref_logits = [ref.prefill(ids.tolist())] + [ref.decode(t) for t in out.new_tokens[:-1]]
    return out, ref, ref_logits


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{s}-n{n}" for f, s, n in CASES])
def case(request):
    family, name, n_prompt = request.param
    out, ref, ref_logits = run_both(family, SCHEDULES[name], n_prompt)
    return name, n_prompt, out, ref, ref_logits


def test_same_candidates_and_computed_rows(case):
    *_, out, ref, _ = case
    assert len(out.stats.traces) == len(ref.steps) == DECODE_STEPS + 1
    for step, (trace, expected) in enumerate(zip(out.stats.traces, ref.steps, strict=True)):
        assert [c.tolist() for c in trace.candidates] == expected.candidates, f"S_l differ at step {step}"
        assert [c.tolist() for c in trace.computed] == expected.computed, f"computed rows differ at step {step}"


def test_same_logits(case):
    *_, out, _, ref_logits = case
    assert len(out.logits) == len(ref_logits)
    for step, (got, want) in enumerate(zip(out.logits, ref_logits, strict=True)):
        diff = (got.double() - want).abs().max().item()
        assert diff <= ATOL, f"step {step}: max abs logit diff {diff:.2e} > {ATOL}"


def test_same_scores(case):
    *_, out, ref, _ = case
    for step, (trace, expected) in enumerate(zip(out.stats.traces, ref.steps, strict=True)):
        for layer, scores in expected.scores.items():
            assert layer in trace.scores, f"step {step}: the engine did not score at pruning layer {layer}"
            pos, s = trace.scores[layer]
            assert pos.tolist() == sorted(scores)
            np.testing.assert_allclose(s, [scores[p] for p in sorted(scores)], atol=1e-6, err_msg=f"step {step}")


def test_same_revived_tokens_and_counts(case):
    """Which tokens come back from the Aux Cache, layer by layer, and the counts in the stats."""
    *_, out, ref, _ = case
    for step, (stats, trace, expected) in enumerate(zip(out.stats.steps, out.stats.traces, ref.steps, strict=True)):
        assert stats.candidates == [len(c) for c in expected.candidates]
        assert stats.computed == [len(c) for c in expected.computed]
        assert stats.revived == [len(r) for r in expected.revived], f"revived counts differ at step {step}"
        for layer in range(1, len(trace.computed)):
            engine_revived = sorted(set(trace.computed[layer].tolist()) - set(trace.computed[layer - 1].tolist()))
            assert engine_revived == expected.revived[layer], f"step {step} layer {layer}"
    assert out.stats.revived == sum(len(r) for s in ref.steps for r in s.revived)


def test_same_depth_after_prefill_and_at_the_end(case):
    *_, out, ref, _ = case
    assert out.stats.prefill_depth.tolist() == ref.steps[0].depth
    assert out.stats.final_depth.tolist() == ref.depth


def test_revival_happens_in_lazy_mode_and_never_in_static(case):
    name, n_prompt, out, _, _ = case
    if name in NO_REVIVAL:
        assert out.stats.revived == 0
    elif n_prompt < 24:
        pytest.skip("a prompt of a few tokens need not revive anything")
    else:
        assert out.stats.revived > 0, "this schedule was chosen so that decoding revives pruned tokens"


@pytest.mark.parametrize("name", ["paper", "aggressive", "static"])
def test_tracing_does_not_change_results(name):
    """Everything above is checked with trace=True; the untraced fast path must do the same work."""
    ids = prompt_ids(24)
    kw = dict(max_new_tokens=DECODE_STEPS + 1, eos_token_id=[], return_logits=True)
    model = tiny_model("qwen3")
    traced = lp.LazyLLM(model, schedule=SCHEDULES[name], trace=True).generate(ids, **kw)
    plain = lp.LazyLLM(model, schedule=SCHEDULES[name]).generate(ids, **kw)
    assert plain.new_tokens == traced.new_tokens
    assert plain.stats.to_dict() == traced.stats.to_dict()
    assert plain.stats.final_depth.tolist() == traced.stats.final_depth.tolist()
    assert all(torch.equal(a, b) for a, b in zip(plain.logits, traced.logits, strict=True))
    assert plain.stats.traces == []
