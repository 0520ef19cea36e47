"""Reused prefills through `lazyprefill serve` and the real `openai` client: two questions about one document, a
chat's second turn, eviction under a small K/V budget, and dense reuse equal to a fresh prefill."""

from __future__ import annotations

import openai
import pytest
from test_serve import DOC, metric_samples, serving

MAX_BATCH, MAX_PROMPT, MAX_NEW = 2, 700, 16
SLOT = (MAX_PROMPT + MAX_NEW + 1) * ((2 * 30 * 3 * 64 + 576) * 4 + 4)  # serving.slot_bytes for SmolLM2-135M, fp32
BUDGET_GB = (MAX_BATCH + 2) * SLOT / 2**30  # the slots, and beside them room for two cached prompts of 717 tokens


@pytest.fixture(scope="module")
def server():
    """A dense server with reuse on and room for two cached prompts beside the slots of one engine (the tests run in
    this order: a second engine takes that room)."""
    with serving("--schedule", "dense", "--max-batch", str(MAX_BATCH), "--max-prompt-tokens", str(MAX_PROMPT),
                 "--max-new-tokens", str(MAX_NEW), "--kv-budget-gb", f"{BUDGET_GB:.6f}") as url:
        yield url


def chat(server: str, messages: list[dict], schedule: str | None = None) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)
    extra = {"schedule": schedule} if schedule else None
    return client.chat.completions.create(model="smollm2", messages=messages, max_tokens=MAX_NEW, temperature=0,
                                          extra_body=extra)


def cached(reply: openai.types.chat.ChatCompletion) -> int:
    return reply.usage.prompt_tokens_details.cached_tokens


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_small_budget_evicts_the_least_recently_used_prefix(server):
    a, b, c = DOC[1550:3450], DOC[3500:5400], DOC[5450:7350]  # about 500 tokens each: two fit beside the slots
    for document in (a, b, c):
        chat(server, user(document + "\n\nSummarize."))  # the third evicts the first
    assert cached(chat(server, user(c + "\n\nWho?"))) > 400
    assert cached(chat(server, user(a + "\n\nWho?"))) == 0
    assert cached(chat(server, user(a + "\n\nWhat?"))) > 400  # cached again by the request before
    assert metric_samples(server, "lazyprefill_prefix_cache_bytes")[()] <= BUDGET_GB * 2**30 - MAX_BATCH * SLOT


def test_questions_about_one_document_and_a_chat_turn_reuse_the_prefill_and_answer_as_fresh(server):
    document = DOC[:1500]
    first = chat(server, user(document + "\n\nWho created Python?"))
    assert cached(first) == 0
    turn = [*user(document + "\n\nWho created Python?"),
            {"role": "assistant", "content": first.choices[0].message.content}, *user("And when?")]
    second_turn = chat(server, turn)
    assert cached(second_turn) > first.usage.prompt_tokens - 3  # the first turn, less the end of its template
    other = chat(server, user(document + "\n\nWhat is the PSF?"))
    assert 300 < cached(other) < other.usage.prompt_tokens  # the document, not the question
    assert other.model_extra["lazyprefill"]["prefill_work"] < 0.2
    # fresh prefills: another dense schedule is another engine, with nothing cached for it yet
    for reused, schedule in ((second_turn, "dense+min=100000"), (other, "dense+min=100001")):
        messages = turn if reused is second_turn else user(document + "\n\nWhat is the PSF?")
        fresh = chat(server, messages, schedule=schedule)
        assert cached(fresh) == 0 and fresh.choices[0].message.content == reused.choices[0].message.content
    assert metric_samples(server, "lazyprefill_prefix_hits_total")[()] >= 2
    reused_total = metric_samples(server, "lazyprefill_prefix_tokens_reused_total")[()]
    assert reused_total >= cached(second_turn) + cached(other)
