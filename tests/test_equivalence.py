"""Without pruning (dense, or keep ratio 1.0 everywhere) the engine is the unmodified transformers model.

The anchor is transformers' own incremental decoding with a DynamicCache, fed the tokens the engine
produced, so prefill and each of 30 decoding steps are compared one by one (SPEC invariants 4, 5).
"""

from __future__ import annotations

import pytest
import torch
from helpers import prompt_ids, tiny_model
from transformers import DynamicCache

import lazyprefill as lp

DECODE_STEPS = 30
ATOL = 1e-4
NO_PRUNING = [None, "dense", {0: 1.0, 2: 1.0, 4: 1.0}, "static:1:1.0,3:1.0,4:1.0", "random:0:1.0,2:1.0,4:1.0"]


def transformers_logits(model, ids: torch.Tensor, new_tokens: list[int]) -> list[torch.Tensor]:
    """Logits [vocab] for the prompt and after each fed token, from transformers' cached forward."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        out = model(ids[None], past_key_values=cache, use_cache=True)
        logits = [out.logits[0, -1]]
        for tok in new_tokens:
            out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1])
    return logits


@pytest.mark.parametrize("schedule", NO_PRUNING, ids=str)
def test_logits_equal_transformers_at_every_step(family_model, schedule):
    ids = prompt_ids(20, seed=1)
    out = lp.LazyLLM(family_model, schedule=schedule).generate(
        ids, max_new_tokens=DECODE_STEPS + 1, eos_token_id=[], return_logits=True
    )
    assert len(out.logits) == DECODE_STEPS + 1
    want = transformers_logits(family_model, ids, out.new_tokens[:-1])
    for step, (got, ref) in enumerate(zip(out.logits, want, strict=True)):
        diff = (got - ref).abs().max().item()
        assert diff <= ATOL, f"step {step}: max abs logit diff {diff:.2e} > {ATOL}"
    assert out.stats.revived == 0


def test_logits_equal_full_sequence_forward(family_model):
    """A second anchor: one full-sequence forward over prompt + generated tokens."""
    ids = prompt_ids(16, seed=2)
    out = lp.LazyLLM(family_model, schedule=None).generate(
        ids, max_new_tokens=DECODE_STEPS + 1, eos_token_id=[], return_logits=True
    )
    with torch.no_grad():
        full = family_model(out.sequences[:, :-1]).logits[0, ids.shape[0] - 1 :]  # [31, vocab]
    assert (torch.stack(out.logits) - full).abs().max().item() <= ATOL


@pytest.mark.parametrize("schedule", [None, {1: 1.0, 3: 1.0}], ids=str)
def test_long_prompt_equals_transformers(schedule):
    """Positions well beyond the Llama 3 rope scaling's original 64, and a prompt longer than the rest."""
    model = tiny_model("llama_gqa_rope3")
    ids = prompt_ids(200, seed=5)
    out = lp.LazyLLM(model, schedule=schedule).generate(ids, max_new_tokens=9, eos_token_id=[], return_logits=True)
    want = transformers_logits(model, ids, out.new_tokens[:-1])
    assert max((got - ref).abs().max().item() for got, ref in zip(out.logits, want, strict=True)) <= ATOL


def test_greedy_tokens_equal_transformers_generate(family_model):
    ids = prompt_ids(16, seed=3)
    out = lp.LazyLLM(family_model, schedule="dense").generate(ids, max_new_tokens=12, eos_token_id=[])
    hf = family_model.generate(
        ids[None],
        attention_mask=torch.ones(1, ids.shape[0], dtype=torch.long),
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        min_new_tokens=12,
    )
    assert out.sequences.tolist() == hf.tolist()


def test_model_is_left_unmodified(family_model):
    """The engine wraps the model: no weight changes, and transformers still gives the same logits."""
    ids = prompt_ids(16, seed=4)
    before = {k: v.clone() for k, v in family_model.state_dict().items()}
    with torch.no_grad():
        logits_before = family_model(ids[None]).logits
    lp.LazyLLM(family_model, schedule={0: 0.5, 2: 0.5, 4: 0.5}).generate(ids, max_new_tokens=8)
    after = family_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(family_model(ids[None]).logits, logits_before)
