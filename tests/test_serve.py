"""`lazyprefill serve` end to end: the command starts a server with the embedded SmolLM2 on a free port, and the
real `openai` client talks to it (plain and streamed chat and completions, concurrent requests, a client that
leaves mid-stream, every bad input, schedules by registered name and paths refused, bodies over the limit), then
/metrics is parsed. The command's own errors for --schedule-file run without a server."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import httpx
import openai
import pytest
from helpers import assert_clean_error, flat, save_tiny_model
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from lazyprefill.cli import SERVE_DECODE_KEYS, app
from lazyprefill.engine import DecodeOptions
from lazyprefill.schedule import FileRefused, Schedule, parse_schedule

DOC = (Path(__file__).parents[1] / "examples" / "python_license.txt").read_text()
MAX_BATCH, MAX_QUEUE, MAX_PROMPT, MAX_NEW = 3, 2, 700, 64
MAX_BODY = 2**20  # --max-request-bytes: room for every request here, and quick to send past
TUNED = Schedule({9: 0.5, 19: 0.5}, min_prompt_tokens=0)  # registered as "tuned" (--schedule-file tuned=FILE)


@pytest.fixture(scope="module")
def tuned_file(tmp_path_factory) -> Path:
    return TUNED.save(tmp_path_factory.mktemp("schedules") / "tuned.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(*options: str) -> Iterator[str]:
    """`lazyprefill serve` with these options in a subprocess on a free port; yields its base URL, stops it after."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lazyprefill", "serve", "--port", str(port), *options]
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
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tuned_file):
    with serving("--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--max-prompt-tokens", str(MAX_PROMPT),
                 "--max-new-tokens", str(MAX_NEW), "--schedule-file", f"tuned={tuned_file}", "--max-request-bytes",
                 str(MAX_BODY)) as url:
        yield url


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


def test_a_registered_schedule_answers_as_the_same_schedule_given_as_a_spec(client):
    kw = dict(model="smollm2", prompt=DOC[:1500], max_tokens=8, temperature=0)
    named = client.completions.create(**kw, extra_body={"schedule": "tuned"})
    spec = client.completions.create(**kw, extra_body={"schedule": TUNED.describe()})
    assert named.choices[0].text == spec.choices[0].text and named.usage == spec.usage
    figures = named.model_extra["lazyprefill"]
    assert figures["schedule"] == TUNED.describe() == spec.model_extra["lazyprefill"]["schedule"]
    assert figures["prefill_work"] == spec.model_extra["lazyprefill"]["prefill_work"] < 1


def test_a_path_schedule_gets_one_answer_whether_or_not_the_file_exists(client, tuned_file, tmp_path):
    """The server opens no path a request gives, so its answer tells nothing of the server's files: a valid schedule
    file, the registered one, a missing one, one that is no schedule and a folder all get the same 400."""
    real = TUNED.save(tmp_path / "real.json")
    (tmp_path / "other.json").write_text("{}")
    paths = [str(real), str(tuned_file), str(tmp_path / "missing.json"), str(tmp_path / "other.json"), str(tmp_path),
             "tuned.json", "./tuned", "~/schedule", "..\\schedule", "/etc/passwd"]
    answers = []
    for path in paths:
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="smollm2", prompt="hi", max_tokens=1, extra_body={"schedule": path})
        answers.append((err.value.status_code, err.value.body))
    assert answers == [answers[0]] * len(paths)
    assert answers[0][1]["param"] == "schedule" and "--schedule-file NAME=FILE" in answers[0][1]["message"]


def test_an_unknown_schedule_name_lists_the_registered_ones(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smollm2", prompt="hi", max_tokens=1, extra_body={"schedule": "tune"})
    assert "registered on this server: tuned" in err.value.message and ".json" not in err.value.message


def test_without_files_parse_schedule_refuses_a_path_before_touching_the_disk(tmp_path, monkeypatch):
    real = TUNED.save(tmp_path / "real.json")
    assert parse_schedule(str(real), 30) == TUNED  # files allowed: the CLI's and the API's way

    def touched(*_args, **_kwargs):
        raise AssertionError("parse_schedule(files=False) touched the disk")

    for name in ("is_file", "exists", "read_text", "read_bytes", "open", "stat"):
        monkeypatch.setattr(Path, name, touched)
    for spec in (str(real), real, str(tmp_path / "missing.json"), "./x", "~/x", "a\\b"):
        with pytest.raises(FileRefused):
            parse_schedule(spec, 30, files=False)
    assert parse_schedule(TUNED.describe(), 30, files=False) == TUNED


def padded(size: int) -> bytes:
    """A valid completions request of exactly `size` bytes (JSON allows trailing whitespace)."""
    body = json.dumps({"model": "smollm2", "prompt": "hi", "max_tokens": 1, "temperature": 0}).encode()
    return body + b" " * (size - len(body))


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_gets_413_before_it_is_parsed_and_the_server_goes_on(server, client, chunked):
    def post(body: bytes) -> httpx.Response:
        content = (body[at:at + 2**16] for at in range(0, len(body), 2**16)) if chunked else body
        reply = httpx.post(f"{server}/v1/completions", content=content, timeout=60,
                           headers={"content-type": "application/json"})
        assert ("content-length" in reply.request.headers) != chunked
        return reply

    before = metric_samples(server, "lazyprefill_requests_total").get(("outcome", "413"), 0)
    assert post(padded(MAX_BODY)).status_code == 200
    over = post(padded(MAX_BODY + 1))
    assert over.status_code == 413 and over.json()["error"]["type"] == "invalid_request_error"
    assert str(MAX_BODY) in over.json()["error"]["message"]
    assert post(b"[" * (MAX_BODY + 1)).status_code == 413  # not JSON: parsed, it would get a 400
    assert metric_samples(server, "lazyprefill_requests_total")[("outcome", "413")] == before + 2
    assert ask(client, 200, new=2).choices[0].message.content is not None


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


runner = CliRunner()


@pytest.mark.parametrize("pairs, message", [
    (["tuned"], "'tuned' is not NAME=FILE"),
    (["tuned="], "'tuned=' is not NAME=FILE"),
    (["paper={file}"], "schedule name 'paper' already means a schedule"),
    (["static={file}"], "schedule name 'static' already means a schedule"),
    (["dense={file}"], "schedule name 'dense' already means a schedule"),
    (["my/tuned={file}"], "schedule name 'my/tuned' must be letters, digits"),
    (["tuned={file}", "tuned={file}"], "schedule name 'tuned' is given twice"),
    (["tuned={missing}"], "missing.json' does not exist"),
    (["tuned={other}"], "other.json' is not a lazyprefill schedule"),
])
def test_bad_schedule_files_are_clean_errors_before_the_model_loads(tuned_file, tmp_path, pairs, message):
    (tmp_path / "other.json").write_text('{"keep": {"9": 0.5}}')
    where = {"file": tuned_file, "missing": tmp_path / "missing.json", "other": tmp_path / "other.json"}
    args = [arg for pair in pairs for arg in ("--schedule-file", pair.format(**where))]
    result = runner.invoke(app, ["serve", "--model", str(tmp_path / "no-model"), *args])
    assert_clean_error(result, message)  # the model, which does not exist, is not reached
    assert "--schedule-file" in flat(result.output)


@pytest.mark.parametrize("pairs, message", [
    (["graphs=maybe"], "'graphs=maybe' is not KEY=on or KEY=off"),
    (["speed=on"], "'speed=on' is not KEY=on or KEY=off with KEY one of graphs, "),
    (["graphs"], "'graphs' is not KEY=on or KEY=off"),
    (["graphs=on", "graph_layout=off"], "CUDA graphs need the graph layout"),
    (["graphs=off", "graphs=on"], "graphs is given twice"),
    (["ahead=on"], "'ahead=on' is not KEY=on or KEY=off with KEY one of graphs, graph_layout, split_kernel, "
                   "burst_kernel, compile"),
    (["graphs=on"], "CUDA graphs need a CUDA model"),
    (["burst_kernel=on"], "the Triton attention kernels need a CUDA model"),
])
def test_bad_decode_options_are_clean_errors_before_the_model_loads(tmp_path, monkeypatch, pairs, message):
    """Every --decode a CPU server could not run is refused before the model loads, not at the first request."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' interpreter aside, Triton needs CUDA
    args = [arg for pair in pairs for arg in ("--decode", pair)]
    result = runner.invoke(app, ["serve", "--model", str(tmp_path / "no-model"), *args])
    assert_clean_error(result, message)
    assert "--decode" in flat(result.output)


def test_serve_takes_every_decode_option_its_steps_read():
    """`ahead` is generate's alone; a DecodeOptions field added later must be offered to serve or left out here."""
    assert set(SERVE_DECODE_KEYS) == {f.name for f in fields(DecodeOptions)} - {"ahead"}


def test_decode_options_reach_the_scheduler(tmp_path, monkeypatch):
    """`serve --decode graphs=off --decode graph_layout=on`: the scheduler's engines decode with those options."""
    import lazyprefill.serving

    seen = []

    class Recorded(lazyprefill.serving.Scheduler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self.decode_options)

    monkeypatch.setattr(lazyprefill.serving, "Scheduler", Recorded)
    monkeypatch.setattr("uvicorn.run", lambda *args, **kwargs: None)
    tiny = save_tiny_model(tmp_path / "tiny")
    result = runner.invoke(app, ["serve", "--model", str(tiny), "--max-new-tokens", "16", "--decode", "graphs=off",
                                 "--decode", "graph_layout=on"])
    assert result.exit_code == 0, result.output
    assert seen == [DecodeOptions(graphs=False, graph_layout=True)]


def test_a_schedule_file_the_model_cannot_run_names_its_option(tuned_file, tmp_path):
    tiny = save_tiny_model(tmp_path / "tiny", num_layers=6)
    result = runner.invoke(app, ["serve", "--model", str(tiny), "--schedule-file", f"tuned={tuned_file}"])
    assert_clean_error(result, "pruning layer 9 is out of range")
    assert "--schedule-file tuned" in flat(result.output)
