"""`lazyprefill serve` end to end: the command starts a server with the embedded SmolLM2 on a free port, and the
real `openai` client talks to it (plain and streamed chat and completions, concurrent requests, a client that
leaves mid-stream, every bad input), then /metrics is parsed."""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

DOC = (Path(__file__).parents[1] / "examples" / "python_license.txt").read_text()
MAX_BATCH, MAX_QUEUE, MAX_PROMPT, MAX_NEW = 3, 2, 700, 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """`lazyprefill serve` in a subprocess; yields its base URL, stops it at the end."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lazyprefill", "serve", "--port", str(port), "--max-batch", str(MAX_BATCH),
           "--max-queue", str(MAX_QUEUE), "--max-prompt-tokens", str(MAX_PROMPT), "--max-new-tokens", str(MAX_NEW)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # the first run fetches and converts the embedded model
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lazyprefill serve exited: {proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client: openai.OpenAI, chars: int, new: int = 12, **kw) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": DOC[:chars] + "\n\nWho created Python?"}],
        max_tokens=new, temperature=0, **kw)


def idle(url: str, timeout: float = 120) -> dict:
    """Wait until no request runs or waits; the /health figures then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        time.sleep(0.1)
    raise AssertionError(f"the server stayed busy: {health}")


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "waiting": 0, "running": 0}


def test_chat_plain_and_streamed_give_the_same_answer(client):
    plain = ask(client, 1500)
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.choices[0].message.content
    assert plain.usage.completion_tokens <= 12 and plain.usage.prompt_tokens > 300
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    figures = plain.model_extra["lazyprefill"]
    assert figures["schedule"].startswith("revive(rows=8, of=last")
    assert 0 < figures["prefill_work"] < 1 and figures["ttft_s"] > 0
    chunks = list(ask(client, 1500, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_and_a_per_request_schedule(client):
    kw = dict(model="smollm2", prompt="The capital of France is", max_tokens=6, temperature=0)
    dense = client.completions.create(**kw, extra_body={"schedule": "dense"})
    assert dense.model_extra["lazyprefill"]["schedule"] == "dense"
    assert dense.model_extra["lazyprefill"]["prefill_work"] == 1.0
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True,
                                                                            extra_body={"schedule": "dense"}))
    assert streamed == dense.choices[0].text


def test_concurrent_requests_get_what_they_get_alone(server, client):
    """Four requests of different lengths at once (they join the batch as they arrive; prefill is chunked)."""
    sizes = [1900, 300, 1400, 800]
    alone = [ask(client, n).choices[0].message.content for n in sizes]
    with concurrent.futures.ThreadPoolExecutor(len(sizes)) as pool:
        together = list(pool.map(lambda n: ask(client, n).choices[0].message.content, sizes))
    assert together == alone
    idle(server)


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client):
    """The request stops within a few tokens of the client leaving, not at max_tokens."""
    before = metric_samples(server, "lazyprefill_generated_tokens_total")[()]
    stream = ask(client, 1200, new=MAX_NEW, stream=True)
    for _, _chunk in zip(range(4), stream):
        pass
    stream.close()
    idle(server)
    assert metric_samples(server, "lazyprefill_generated_tokens_total")[()] - before < MAX_NEW / 2
    assert metric_samples(server, "lazyprefill_requests_total").get(("outcome", "cancelled"), 0) >= 1
    assert ask(client, 300).choices[0].message.content  # and the server goes on


def test_a_client_that_leaves_a_plain_request_cancels_it(server):
    before = metric_samples(server, "lazyprefill_generated_tokens_total")[()]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/chat/completions", timeout=httpx.Timeout(60, read=1.0), json={
            "messages": [{"role": "user", "content": DOC[:1200]}], "max_tokens": MAX_NEW, "temperature": 0})
    idle(server)
    assert metric_samples(server, "lazyprefill_generated_tokens_total")[()] - before < MAX_NEW / 2


def test_the_raw_stream_ends_with_done(server):
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60, json={
            "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "stream": True}) as reply:
        lines = [line for line in reply.iter_lines() if line]
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and chunks[-1]["choices"][0]["finish_reason"]


def test_an_unknown_path_gets_an_openai_error(server):
    reply = httpx.get(f"{server}/v1/nothing-here")
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ('{"model": "smollm2", "messages": [', None),  # malformed JSON
    ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"}, "max_tokens"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_NEW + 1}, "max_tokens"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"model": "smollm2", "messages": []}, "messages"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "schedule": "9:1.5"}, "schedule"),
    ({"model": "smollm2", "messages": [{"role": "user", "content": DOC}]}, "messages"),  # over --max-prompt-tokens
    ({"model": "smollm2", "prompt": [10**9]}, "prompt"),
    ({"model": "smollm2", "prompt": "hi", "stop": [""]}, "stop"),
    ({"model": "smollm2", "prompt": "hi", "seed": 2**70}, "seed"),
])
def test_bad_input_gets_a_400_in_openai_s_shape_and_the_server_goes_on(server, client, body, param):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    reply = httpx.post(f"{server}{path}", timeout=60, **({"content": body, "headers": {"content-type":
                                                         "application/json"}} if isinstance(body, str) else
                                                         {"json": body}))
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param or (param is not None and param in (error["param"] or ""))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert ask(client, 200, new=2).choices[0].message.content is not None


def test_a_full_queue_gets_429_with_retry_after(server, client):
    """MAX_BATCH requests run, MAX_QUEUE wait, the next is refused at once."""
    with concurrent.futures.ThreadPoolExecutor(MAX_BATCH + MAX_QUEUE) as pool:
        busy = [pool.submit(ask, client, 1200, MAX_NEW) for _ in range(MAX_BATCH + MAX_QUEUE)]
        deadline = time.monotonic() + 120
        while httpx.get(f"{server}/health").json()["waiting"] < MAX_QUEUE and time.monotonic() < deadline:
            time.sleep(0.05)
        reply = httpx.post(f"{server}/v1/chat/completions", json={
            "model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)
        assert reply.status_code == 429 and int(reply.headers["retry-after"]) >= 1
        assert reply.json()["error"]["type"] == "rate_limit_error"
        assert all(f.result().choices[0].message.content is not None for f in busy)
    idle(server)


def metric_samples(server: str, name: str) -> dict:
    text = httpx.get(f"{server}/metrics").text
    return {tuple(label for kv in s.labels.items() for label in kv): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def test_metrics_parse(server, client):
    ask(client, 600, new=4)
    text = httpx.get(f"{server}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("lazyprefill_ttft_seconds", "lazyprefill_inter_token_seconds", "lazyprefill_queue_depth",
                 "lazyprefill_running_requests", "lazyprefill_generated_tokens", "lazyprefill_tokens_per_second",
                 "lazyprefill_prefill_rows_saved", "lazyprefill_revived_rows", "lazyprefill_requests"):
        assert name in families, name
    assert metric_samples(server, "lazyprefill_ttft_seconds_count")[()] >= 1
    assert metric_samples(server, "lazyprefill_generated_tokens_total")[()] >= 4
    assert metric_samples(server, "lazyprefill_prefill_rows_saved_total")[()] > 0
