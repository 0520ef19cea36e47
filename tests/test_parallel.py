"""Tensor parallelism (parallel.py, mirror.py) on the CPU: torchrun jobs of 2 and 4 gloo processes on tiny random
fp32 models, and `generate --tp 2` / `serve --tp 2` on a saved one.

Each job runs parallel_worker.py; its ranks save what they generated, and the tests compare that with one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from helpers import FAMILIES, random_tiny, save_tiny_model, tiny_model, word_tokenizer
from parallel_worker import CASES, CASES_TP4, NEW_TOKENS, NUM_LAYERS, prompts, run
from test_serve import serving
from typer.testing import CliRunner

import lazyprefill as lp
from lazyprefill import parallel
from lazyprefill.adapters import adapter_for
from lazyprefill.cli import app

TESTS = Path(__file__).parent
JOB_TIMEOUT_S = 120  # a job that hangs fails the test instead of the suite


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node NPROC ARGS` on a free port, one CPU thread per rank."""
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, cwd=TESTS, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def job(tmp_path_factory, nproc: int, case: str) -> list[dict]:
    """Run the worker's `case` on `nproc` ranks -> what each rank saved, by rank."""
    out = tmp_path_factory.mktemp(f"tp{nproc}-{case}")
    done = torchrun(nproc, "parallel_worker.py", case, str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def tp2(tmp_path_factory) -> list[dict]:
    return job(tmp_path_factory, 2, "generate")


@pytest.fixture(scope="module")
def tp4(tmp_path_factory) -> list[dict]:
    return job(tmp_path_factory, 4, "generate")


def one_process(family: str, schedule: str) -> list[dict]:
    return run(family, schedule, tiny_model(family, NUM_LAYERS.get(family, 4)))


def assert_same_answers(ranks: list[dict], key: str, want: list[dict]) -> None:
    """Every rank's answers equal one process's: tokens and selections exactly, logits within 1e-5 (relative to
    the largest logit for Gemma 3, whose hidden states are sqrt(d) times larger: its embedding is scaled)."""
    for rank in ranks:
        for got, ref in zip(rank[key], want, strict=True):
            assert got["tokens"] == ref["tokens"]
            np.testing.assert_array_equal(got["prefill_depth"], ref["prefill_depth"])
            np.testing.assert_array_equal(got["final_depth"], ref["final_depth"])
            scale = float(ref["logits"].abs().max()) if key.startswith("gemma3") else 1.0
            assert float((got["logits"] - ref["logits"]).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize(("family", "schedule"), CASES)
def test_tp2_answers_as_one_process(tp2, family, schedule):
    want = one_process(family, schedule)
    assert_same_answers(tp2, f"{family} {schedule}", want)
    if schedule != "dense":  # the pruned cases prune in prefill and revive in decoding
        assert all((ref["prefill_depth"] < ref["prefill_depth"].max()).any() and ref["revived"] > 0 for ref in want)


@pytest.mark.parametrize(("family", "schedule"), CASES_TP4)
def test_tp4_answers_as_one_process(tp4, family, schedule):
    assert_same_answers(tp4, f"{family} {schedule}", one_process(family, schedule))


def test_ranks_select_the_same_tokens_and_logits(tp2):
    first, second = tp2
    for key in [f"{family} {schedule}" for family, schedule in CASES]:
        for a, b in zip(first[key], second[key], strict=True):
            assert a["tokens"] == b["tokens"] and a["revived"] == b["revived"]
            np.testing.assert_array_equal(a["final_depth"], b["final_depth"])
            assert torch.equal(a["logits"], b["logits"])


@pytest.mark.parametrize("ranks", ["tp2", "tp4"])
def test_ranks_that_select_differently_raise_on_every_rank(ranks, request):
    job = request.getfixturevalue(ranks)
    for rank in job:
        error = rank["diverged"]
        assert error is not None
        assert f"the {len(job)} tensor-parallel ranks disagree on the tokens each prefill dropped" in error


def test_a_failing_rank_stops_the_others_with_its_error(tmp_path):
    start = time.perf_counter()
    done = torchrun(2, "parallel_worker.py", "fail", str(tmp_path))
    assert time.perf_counter() - start < 60
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "injected failure on rank 1 in layer 2 of the prefill" in output  # the cause, from rank 1
    assert "parallel_worker.py FAILED" in output and "rank      : 1" in output  # torchrun names the failed rank
    assert not list(tmp_path.glob("rank*.pt"))  # rank 0 did not go on: its collective failed, or torchrun stopped it


def test_generate_tp2_prints_once_the_answer_of_one_process(tmp_path):
    model = save_tiny_model(tmp_path / "model", num_layers=4)
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(f"w{i}" for i in range(5, 60)))
    args = ["generate", "-f", str(doc), "-m", str(model), "-s", "1:0.5", "-n", "6", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "lazyprefill", *args, "--tp", "2"], env=env, capture_output=True,
                          text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 alone prints
    alone = CliRunner().invoke(app, args)
    assert alone.exit_code == 0, alone.output
    assert json.loads(lines[0])["token_ids"] == json.loads(alone.stdout)["token_ids"]


def test_sizes_that_do_not_split_the_heads_are_refused():
    with pytest.raises(ValueError, match=r"num_key_value_heads = 2 cannot be split over 4 .* \(1, 2\)"):
        parallel.check_split(tiny_model("llama_gqa_rope3", 4).config, 4)


def test_one_process_keeps_every_head():
    adapter = adapter_for(tiny_model("qwen2", 4))
    assert adapter.tp is None and (adapter.num_heads, adapter.num_kv_heads) == (4, 2)


def test_a_model_split_by_layers_over_devices_is_refused():
    model = random_tiny(*FAMILIES["llama_gqa_rope3"], num_layers=2)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "lm_head": 1}
    with pytest.raises(ValueError, match=r"split over devices \['0', '1'\] \(device_map\).*--tp N"):
        adapter_for(model)


def test_serve_tp2_answers_as_one_process(tmp_path):
    """Rank 0 serves, rank 1 repeats its engine calls: a pruned request, and a dense one that continues the cached
    prefix of an earlier one (hold, resume and a layer-by-layer extension, mirrored)."""
    model = save_tiny_model(tmp_path / "model", num_layers=4)
    first, second = prompts()
    reused = first[:36].tolist() + second[:4].tolist()  # shares 36 tokens with `first`
    asks = [(first.tolist(), "1:0.5"), (first.tolist(), "dense"), (reused, "dense")]
    with serving("--model", str(model), "--schedule", "1:0.5", "--max-prompt-tokens", "64", "--max-new-tokens", "8",
                 "--tp", "2") as url:
        answers = [httpx.post(f"{url}/v1/completions", timeout=60, json={
            "prompt": ids, "schedule": schedule, "max_tokens": NEW_TOKENS, "temperature": 0}).json()
            for ids, schedule in asks]
        metrics = httpx.get(f"{url}/metrics").text
    assert "lazyprefill_prefix_hits_total 1.0" in metrics
    tokenizer = word_tokenizer()
    for (ids, schedule), answer in zip(asks, answers, strict=True):
        want = lp.LazyLLM(tiny_model("llama_gqa_rope3", 4), schedule).generate(ids, max_new_tokens=NEW_TOKENS)
        tokens = want.new_tokens[:-1] if want.finish_reason == "eos" else want.new_tokens  # the server shows no EOS
        assert answer["choices"][0]["text"] == tokenizer.decode(tokens, skip_special_tokens=True)
