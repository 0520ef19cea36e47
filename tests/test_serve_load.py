"""benchmarks/serve_load.py counts a request as finished only when the server finished its answer: a stream that
carries an error, or ends without a finish_reason, is an error (the first GPU load counted such streams as answers)."""

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import httpx
import pytest

spec = importlib.util.spec_from_file_location("serve_load", Path(__file__).parents[1] / "benchmarks/serve_load.py")
serve_load = sys.modules["serve_load"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(serve_load)

TOKEN = {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
LENGTH = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
FAILED = {"error": {"message": "RuntimeError: a failed step", "type": "server_error", "param": None, "code": None}}


def streamed(*chunks: dict) -> serve_load.Outcome:
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    transport = httpx.MockTransport(lambda _request: httpx.Response(200, text=body))

    async def request() -> serve_load.Outcome:
        outcome = serve_load.Outcome(sent=0.0, prompt_chars=3)
        async with httpx.AsyncClient(transport=transport) as client:
            await serve_load.one(client, "http://server", "m", "doc", 3, 0.0, outcome)
        return outcome

    return asyncio.run(request())


@pytest.mark.parametrize("chunks, finished, error", [
    ((TOKEN, TOKEN, TOKEN, LENGTH), 1, ""),
    ((TOKEN, FAILED), 0, "a failed step"),
    ((TOKEN,), 0, ""),  # the stream ended with no finish_reason
])
def test_only_answers_the_server_finished_count(chunks, finished, error):
    outcome = streamed(*chunks)
    assert outcome.tokens == sum(c is TOKEN for c in chunks)
    assert error in outcome.error and bool(outcome.error) == bool(error)
    result = serve_load.summary([outcome], wall=1.0)
    assert (result["finished"], result["errors"]) == (finished, 1 - finished)


def test_documents_are_drawn_by_their_length_in_tokens():
    """Python source runs from 0.2 to 0.45 tokens a character, so a trace drawn in characters missed its lengths
    (19K-76K characters taken for 8K-33K tokens held 5K-20K): each document now holds the number of tokens drawn."""
    from helpers import word_tokenizer

    tok = word_tokenizer()
    arrivals = serve_load.trace(rate=2.0, duration=10.0, seed=0, min_tokens=300, max_tokens=900, tokenizer=tok)
    assert len(arrivals) > 5
    for _, doc, n in arrivals:
        assert 300 <= n <= 900
        assert len(tok(doc.removesuffix(serve_load.QUESTION), add_special_tokens=False).input_ids) == n
    assert len({n for _, _, n in arrivals}) > 1
    assert serve_load.trace(2.0, 10.0, 0, 300, 900, tok) == arrivals  # every server gets the same trace


def test_paired_speedup_is_the_median_of_per_request_ratios():
    """A p50 ratio compares two mixes of lengths; the paired figure compares each request with itself."""
    dense = {"outcomes": [{"ttft_s": t} for t in (0.2, 1.0, 2.0, None)]}
    pruned = {"outcomes": [{"ttft_s": t} for t in (0.2, 0.5, 1.0, 0.4)]}
    assert serve_load.paired_speedup(pruned, dense) == 2.0  # ratios 1, 2, 2; the unanswered request left out
