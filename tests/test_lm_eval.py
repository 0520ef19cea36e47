"""lm-evaluation-harness's `lazyprefill` model, offline: a tiny random Llama saved as a user's model folder, tasks
defined by local YAML files over local jsonl data, run by lm-eval's own `simple_evaluate` and command line.

Dense, it must score and generate as lm-eval's own `hf` model on the same folder; pruned, its log-likelihoods must be
what LazyLLM's own decoding computes for the same tokens.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from helpers import VOCAB, save_tiny_model
from lm_eval.tasks import TaskManager

from lazyprefill.lm_eval_model import LazyPrefillLM

TASKS = ["lp_generate", "lp_choice", "lp_perplexity"]
PRUNED = "2:0.5;4:0.5"  # layer:ratio pairs joined by ';': lm-eval splits model_args at commas


def _words(rng: random.Random, n: int) -> str:
    # from w200 on: the tokenizer splits its special tokens' text (w0 unknown, w1 EOS) off the front of a word
    return " ".join(f"w{rng.randrange(200, VOCAB)}" for _ in range(n))


def _task(name: str, data: Path, cache: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {cache}\ntest_split: test\n{body}")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """The model folder, the task folder (one task per lm-eval request type) and a TaskManager over it alone."""
    root = tmp_path_factory.mktemp("lm_eval")
    save_tiny_model(root / "model")
    rng = random.Random(0)
    docs = {
        "generate": [{"prompt": _words(rng, rng.randrange(20, 60)), "answer": "w9"} for _ in range(5)],
        # one-token answers share their question's computation (lm-eval's logits cache), longer ones do not
        "choice": [{"prompt": _words(rng, rng.randrange(20, 60)), "label": 0,
                    "choices": [_words(rng, 1), _words(rng, 1), _words(rng, 3), _words(rng, 2)]} for _ in range(5)],
        "perplexity": [{"text": _words(rng, rng.randrange(20, 60))} for _ in range(3)],
    }
    bodies = {
        "generate": 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                    'generation_kwargs:\n  until: ["w7"]\n  max_gen_toks: 8\n  do_sample: false\n'
                    "metric_list:\n  - metric: exact_match\n",
        "choice": 'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\n'
                  'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n',
        "perplexity": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                      "metric_list:\n  - metric: word_perplexity\n",
    }
    tasks = root / "tasks"
    tasks.mkdir()
    for kind, rows in docs.items():
        data = root / f"{kind}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (tasks / f"{kind}.yaml").write_text(_task(f"lp_{kind}", data, root / "datasets", bodies[kind]))
    return {"model": root / "model", "tasks": tasks,
            "manager": TaskManager(include_path=str(tasks), include_defaults=False)}


def _evaluate(workspace: dict, model: str, gen_kwargs: str | None = None, **model_args) -> dict:
    args = {"pretrained": str(workspace["model"]), "device": "cpu", "dtype": "float32", **model_args}
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=TASKS, task_manager=workspace["manager"],
                                   log_samples=True, gen_kwargs=gen_kwargs)


def _responses(out: dict, task: str) -> list:
    """Each document's responses in document order: [text] or [(loglikelihood, is_greedy), ...] or [loglikelihood]."""
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] for r in s["resps"]] for s in samples]


def _loglikelihoods(out: dict, task: str) -> torch.Tensor:
    """Every response's log-likelihood, in document order."""
    return torch.tensor([r[0] if isinstance(r, tuple | list) else r for doc in _responses(out, task) for r in doc])


@pytest.fixture(scope="module")
def reference(workspace) -> dict:
    """lm-eval's own HF model, one request at a time (no padding)."""
    return _evaluate(workspace, "hf", batch_size=1)


@pytest.fixture(scope="module")
def pruned(workspace) -> dict:
    return _evaluate(workspace, "lazyprefill", schedule=PRUNED, batch_size=3)


def test_dense_matches_lm_evals_hf_model(workspace, reference):
    """schedule=dense in batches of 3 (the last one shorter): the hf model's log-likelihoods, greedy flags and text."""
    out = _evaluate(workspace, "lazyprefill", schedule="dense", batch_size=3)
    assert _responses(out, "lp_generate") == _responses(reference, "lp_generate")
    assert any(text[0] for text in _responses(out, "lp_generate"))  # something was generated, not only stops
    for task in ("lp_choice", "lp_perplexity"):
        torch.testing.assert_close(_loglikelihoods(out, task), _loglikelihoods(reference, task), rtol=0, atol=1e-4)
    greedy = [[r[1] for r in doc] for doc in _responses(out, "lp_choice")]
    assert greedy == [[r[1] for r in doc] for doc in _responses(reference, "lp_choice")]
    assert out["config"]["lazyprefill_schedule"] == "dense"


@pytest.mark.parametrize("schedule", [PRUNED, "balanced"])
def test_pruning_schedules_run_every_request_type(workspace, reference, pruned, schedule):
    out = pruned if schedule == PRUNED else _evaluate(workspace, "lazyprefill", schedule=schedule, batch_size=2)
    assert set(out["results"]) == set(TASKS)
    assert all(isinstance(text[0], str) for text in _responses(out, "lp_generate"))
    assert torch.isfinite(_loglikelihoods(out, "lp_choice")).all()
    assert out["config"]["lazyprefill_schedule"] != "dense"


def test_pruning_reaches_the_scored_tokens(reference, pruned):
    """Pruned contexts change the continuations' log-probabilities: they are not scored by a dense pass."""
    diff = (_loglikelihoods(pruned, "lp_choice") - _loglikelihoods(reference, "lp_choice")).abs()
    assert diff.max() > 1e-3


def test_loglikelihood_is_what_lazyllm_decoding_computes(workspace):
    """Teacher forcing a continuation LazyLLM generated itself gives the log-probabilities of its own steps' logits
    and counts as greedy: the continuation is scored by LazyLLM's decoding, revivals included."""
    lm = LazyPrefillLM(str(workspace["model"]), schedule=PRUNED, device="cpu", dtype="float32")
    prompt = [int(t) for t in torch.randint(2, VOCAB, (48,), generator=torch.Generator().manual_seed(1))]
    out = lm.lazy.generate(prompt, 6, return_logits=True, eos_token_id=[])
    expected = sum(float(torch.log_softmax(row, -1)[t]) for row, t in zip(out.logits, out.new_tokens))
    other = [*out.new_tokens[:-1], (out.new_tokens[-1] + 1) % VOCAB]  # one more request in the batch, not greedy
    (logprob, greedy), (_, other_greedy) = lm._loglikelihood_tokens([(None, prompt, out.new_tokens),
                                                                     (None, prompt[:40], other)])
    assert logprob == pytest.approx(expected, abs=1e-4)
    assert greedy and not other_greedy


def test_sampling_follows_lm_evals_seed(workspace):
    """do_sample draws from a seed taken from torch's RNG, which lm-eval seeds: two runs sample the same text."""
    runs = [_evaluate(workspace, "lazyprefill", gen_kwargs="do_sample=True,temperature=0.8", schedule=PRUNED)
            for _ in range(2)]
    assert _responses(runs[0], "lp_generate") == _responses(runs[1], "lp_generate")


def test_command_line(workspace, pruned, tmp_path):
    """`lazyprefill lm-eval` is lm-eval's command line with the model registered: the same scores as in process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    model_args = f"pretrained={workspace['model']},dtype=float32,schedule={PRUNED}"
    command = [sys.executable, "-m", "lazyprefill", "lm-eval", "--model", "lazyprefill", "--model_args", model_args,
               "--device", "cpu", "--batch_size", "3", "--tasks", "lp_choice",
               "--include_path", str(workspace["tasks"]), "--output_path", str(tmp_path)]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    (written,) = tmp_path.rglob("results_*.json")
    results = json.loads(written.read_text())
    assert results["results"]["lp_choice"]["acc,none"] == pruned["results"]["lp_choice"]["acc,none"]
    assert results["config"]["lazyprefill_schedule"] == pruned["config"]["lazyprefill_schedule"]


@pytest.mark.parametrize(("model_args", "message"), [
    ("schedule=fastest", "unknown schedule 'fastest'"),
    ("schedule=2:0.5,4:0.5", "separate a schedule's layer:ratio pairs with ';'"),
    ("schedule=9:0.5", "pruning layer 9 is out of range"),
    ("batch_size=auto", "give lazyprefill an int"),
])
def test_bad_model_args_say_what_to_pass(workspace, model_args, message):
    with pytest.raises(ValueError, match=message):
        lm_eval.simple_evaluate(model="lazyprefill", model_args=f"pretrained={workspace['model']},device=cpu,"
                                f"{model_args}", tasks=["lp_choice"], task_manager=workspace["manager"])


def test_unsupported_generation_kwargs_are_refused(workspace):
    with pytest.raises(ValueError, match="num_beams"):
        _evaluate(workspace, "lazyprefill", gen_kwargs="num_beams=2", schedule=PRUNED)
