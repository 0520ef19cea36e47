"""Sessions: a prompt prefilled once, continued by several questions (Engine.extend, Engine.truncate).

Dense, a continuation must give what transformers gives for the whole sequence; pruned, it must compute
only its own rows and never a (token, layer) of the held prompt that already exists.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import prompt_ids, tiny_model
from test_equivalence import transformers_logits

import lazyprefill as lp
from lazyprefill.cache import WriteCounter

ATOL = 1e-4
QUESTIONS = [prompt_ids(n, seed=40 + n) for n in (5, 1, 12)]


def max_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max((g - w).abs().max().item() for g, w in zip(got, want, strict=True))


def test_dense_continuations_equal_transformers_on_the_whole_sequence(family_model):
    document = prompt_ids(50, seed=2)
    session = lp.LazyLLM(family_model, None).session(document, room=40)
    for question in QUESTIONS:
        out = session.generate(question, max_new_tokens=8, eos_token_id=[], return_logits=True)
        whole = torch.cat([document, question])
        assert torch.equal(out.sequences[0, : whole.shape[0]], whole)
        assert out.stats.prefill_computed == [question.shape[0]] * 6  # the document is not computed again
        assert max_diff(out.logits, transformers_logits(family_model, whole, out.new_tokens[:-1])) <= ATOL


def test_a_chat_turn_added_to_the_session_equals_the_fresh_prompt():
    model = tiny_model("gemma3")  # its window (8) bites across the turns
    first, turn, question = prompt_ids(30, seed=3), prompt_ids(14, seed=4), prompt_ids(6, seed=5)
    session = lp.LazyLLM(model, None).session(first, room=40)
    session.generate(question, max_new_tokens=5, eos_token_id=[])  # answered, then forgotten
    session.add(turn)
    assert session.room == 40 - 14
    out = session.generate(question, max_new_tokens=6, eos_token_id=[], return_logits=True)
    fresh = lp.LazyLLM(model, None).generate(torch.cat([first, turn, question]), max_new_tokens=6, eos_token_id=[])
    assert out.new_tokens == fresh.new_tokens
    whole = torch.cat([first, turn, question])
    assert max_diff(out.logits, transformers_logits(model, whole, out.new_tokens[:-1])) <= ATOL


def test_a_stream_stopped_early_leaves_the_session_whole():
    model = tiny_model("llama_gqa_rope3")
    document, question = prompt_ids(40, seed=6), QUESTIONS[0]
    session = lp.LazyLLM(model, None).session(document, room=30)
    want = session.generate(question, max_new_tokens=10, eos_token_id=[]).new_tokens
    run = session.stream(prompt_ids(9, seed=7), max_new_tokens=10, eos_token_id=[])
    next(run), next(run)
    run.close()
    assert session.generate(question, max_new_tokens=10, eos_token_id=[]).new_tokens == want


@pytest.mark.parametrize("schedule", ["0:0.5,2:0.5+min=0", "static:0:0.5,2:0.5+min=0"])
def test_pruned_continuations_compute_each_token_and_layer_once(schedule):
    """Each (token, layer) at most once per question: the held prompt's K/V is never rewritten where it exists,
    only extended deeper by revivals (the continuation's own, for a reselecting scorer); the continuation and the
    answer are written once each."""
    model = tiny_model("llama_gqa_rope3")
    document = prompt_ids(60, seed=8)
    session = lp.LazyLLM(model, schedule).session(document, room=40)
    n, L = document.shape[0], 6
    resumed = 0
    for question in QUESTIONS:
        cache = session.engine.cache
        before = cache.depth[0, :n].copy()
        assert (before < L - 1).any(), "the prompt's prefill deferred tokens"
        k_before = cache.k[:, 0, :, :n].clone()  # [L, Hkv, n, dh]
        counter = WriteCounter(L, 1, cache.capacity)
        cache._count = counter
        out = session.generate(question, max_new_tokens=8, eos_token_id=[])
        writes = counter.counts[:, 0]  # [L, C]
        assert writes.max() <= 1
        existed = np.arange(L)[:, None] <= before[None, :]  # [L, n] K/V that the prompt's tokens had
        assert not writes[:, :n][existed].any()
        kept = torch.from_numpy(existed)
        assert torch.equal(cache.k[:, 0, :, :n].transpose(1, 2)[kept], k_before.transpose(1, 2)[kept])
        total = n + question.shape[0] + len(out.new_tokens) - 1  # the last answer token is never fed back
        assert writes[:, n:total].all() and not writes[:, total:].any()
        assert (cache.depth[0, :n] >= before).all()  # deferred tokens only ever go deeper
        resumed += sum(out.stats.prefill_computed) - question.shape[0] * L  # held tokens' rows the chunk computed
    if schedule.startswith("static"):
        assert resumed == 0  # prefill-only pruning never revives
    else:
        assert resumed > 0, "the questions revived tokens that their document's own last token had dropped"


def test_the_document_prefill_work_is_the_fresh_prefills():
    """What the document's own prefill computed, per layer: what a fresh prefill of it computes (a run whose every
    answer equals dense's shows by it that it pruned)."""
    model = tiny_model("llama_gqa_rope3")
    document = prompt_ids(60, seed=8)
    session = lp.LazyLLM(model, "0:0.5,2:0.5+min=0").session(document, room=4)
    fresh = lp.LazyLLM(model, "0:0.5,2:0.5+min=0").generate(document, max_new_tokens=1, eos_token_id=[])
    assert session.prefill_computed == fresh.stats.prefill_computed == [60, 30, 30, 15, 15, 15]
    assert lp.LazyLLM(model, None).session(document, room=4).prefill_computed == [60] * 6


@pytest.mark.parametrize("schedule", ["0:0.5,2:0.5+min=0", "revive(rows=2):0:0.5,2:0.5+min=0"])
def test_a_one_token_continuation_is_a_decoding_step(schedule):
    """A pruned continuation treats the held prompt as a decoding step treats its context: scored by the new
    rows, kept as many as the step keeps, revived from the Aux Cache where they stopped (under a revival bound,
    as many as the step may revive). One token of it is that step: the same logits and the same depths after it."""
    model = tiny_model("llama_gqa_rope3")
    document, token = prompt_ids(60, seed=8), prompt_ids(1, seed=9)
    extended, stepped = (lp.LazyLLM(model, schedule).session(document, room=4) for _ in range(2))
    logits, stats = extended.engine.extend(0, token)
    want, (step,) = stepped.engine.decode(token, [0])
    assert (logits - want).abs().max().item() <= ATOL
    assert np.array_equal(extended.engine.cache.depth[0, :61], stepped.engine.cache.depth[0, :61])
    assert stats.computed == step.computed and sum(stats.revived) > 0


def test_a_bounded_continuation_computes_at_most_what_its_tokens_as_steps_would():
    """Under revive(rows=R) a continuation of m tokens computes at most m * R rows after each pruning layer (its
    own and m * (R - 1) held tokens), as m decoding steps would, where the unbounded rule resumes every kept token
    that stopped there."""
    model = tiny_model("llama_gqa_rope3")
    document, question = prompt_ids(60, seed=8), prompt_ids(3, seed=10)
    stats = {}
    for scorer in ("last", "revive(rows=2)"):
        session = lp.LazyLLM(model, f"{scorer}:0:0.5,2:0.5+min=0").session(document, room=4)
        stats[scorer] = session.engine.extend(0, question)[1]
    assert max(stats["last"].computed) > 3 * 2, "unbounded, the question must revive more than the bound allows"
    assert max(stats["revive(rows=2)"].computed) <= 3 * 2 and sum(stats["revive(rows=2)"].revived) > 0


def test_session_refuses_what_does_not_fit():
    model = tiny_model("llama_gqa_rope3")
    lazy = lp.LazyLLM(model, None)
    with pytest.raises(ValueError, match="room must be an int of at least 2"):
        lazy.session(prompt_ids(10), room=1)
    with pytest.raises(ValueError, match="one prompt"):
        lazy.session([[1, 2], [3, 4]], room=8)
    session = lazy.session(prompt_ids(10), room=12)
    with pytest.raises(ValueError, match=r"= 13 exceed the session's room of 12 tokens"):
        session.generate(prompt_ids(5), max_new_tokens=8)
    with pytest.raises(ValueError, match="one sequence"):
        session.generate([[1, 2], [3]], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        session.generate([10**6], max_new_tokens=2)
    assert session.generate(prompt_ids(4), max_new_tokens=8, eos_token_id=[]).new_tokens  # still usable
