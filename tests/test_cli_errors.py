"""Every bad input to `lazyprefill inspect`, `generate` and `eval` is one clear message, exit code 2, no traceback.

Model folders are tiny random models saved with save_pretrained (helpers.save_tiny_model), so nothing
here downloads or loads a real checkpoint.
"""

from __future__ import annotations

import pytest
import transformers as tf
from helpers import assert_clean_error, flat, save_tiny_model
from typer.testing import CliRunner

import lazyprefill.engine
from lazyprefill.cli import app

runner = CliRunner()
WORDS = " ".join(f"w{i % 300 + 2}" for i in range(40))  # 40 tokens of the word tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(WORDS)
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """An unknown name fails at once instead of asking the hub (huggingface_hub reads the variable on import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


@pytest.fixture(params=["inspect", "generate"])
def command(request, tmp_path):
    """Each command's arguments around the ones a test adds (inspect also needs --out)."""
    extra = ["--out", str(tmp_path / "r.html")] if request.param == "inspect" else []
    return lambda *args: runner.invoke(app, [request.param, *extra, *args])


def test_a_binary_prompt_file(command, model_dir, tmp_path):
    binary = tmp_path / "doc.bin"
    binary.write_bytes(b"\x00\x01\x02binary")
    assert_clean_error(command("--prompt-file", str(binary), "--model", model_dir), "looks like a binary file")


def test_a_prompt_file_that_is_not_utf8(command, model_dir, tmp_path):
    latin = tmp_path / "doc.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert_clean_error(command("--prompt-file", str(latin), "--model", model_dir), "is not UTF-8 text")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "float8"], "unknown dtype 'float8': use one of"),
        (["--device", "banana"], "unknown device 'banana'"),
        (["--schedule", "banana"], "unknown schedule 'banana'"),
        (["--schedule", ""], "the schedule is empty: use 'dense'"),
        (["--schedule", "2:0.5,2:0.7"], "layer 2 appears twice"),
        (["--schedule", "5:0.5"], "pruning layer 5 is out of range"),
    ],
)
def test_bad_options(command, model_dir, doc, args, message):
    assert_clean_error(command("--prompt-file", str(doc), "--model", model_dir, *args), message)


def test_cuda_without_a_gpu(command, model_dir, doc, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert_clean_error(command("--prompt-file", str(doc), "--model", model_dir, "--device", "cuda"),
                       "CUDA is not available on this machine: use --device cpu")


def test_folders_and_names_that_are_not_models(command, doc, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    cfg_only = tmp_path / "config-only"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text('{"model_type": "llama"}')
    for model in (str(empty), str(broken), str(cfg_only), "no-such-model-anywhere", str(tmp_path / "missing")):
        result = command("--prompt-file", str(doc), "--model", model)
        assert_clean_error(result, "pass smollm2")


def test_an_unsupported_architecture(command, doc, tmp_path):
    gpt2 = tmp_path / "gpt2"
    config = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=400, n_positions=64)
    tf.GPT2LMHeadModel(config).save_pretrained(gpt2)
    save_tiny_model(tmp_path / "words")  # borrow its tokenizer files
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gpt2 / name).write_bytes((tmp_path / "words" / name).read_bytes())
    assert_clean_error(command("--prompt-file", str(doc), "--model", str(gpt2)), "unsupported architecture 'gpt2'")


def test_too_few_layers_for_the_default_schedule_blames_the_model(command, doc, tmp_path):
    one = str(save_tiny_model(tmp_path / "one", num_layers=1))
    result = command("--prompt-file", str(doc), "--model", one)
    assert_clean_error(result, "too few to prune")
    assert "--model" in flat(result.output) and "--schedule" not in flat(result.output)
    assert command("--prompt-file", str(doc), "--model", one, "--schedule", "dense").exit_code == 0


def test_a_request_too_long_fails_before_any_prefill(command, model_dir, doc, monkeypatch):
    """40 prompt tokens + 250 new ones exceed the 256 positions: said with the real 250, no prefill run."""
    prefills = []
    real = lazyprefill.engine.Engine.prefill
    monkeypatch.setattr(lazyprefill.engine.Engine, "prefill", lambda self, p: prefills.append(p) or real(self, p))
    result = command("--prompt-file", str(doc), "--model", model_dir, "--max-new-tokens", "250")
    assert_clean_error(result, "+ max_new_tokens (250) = ")
    assert prefills == []


def eval_(*args: str):
    return runner.invoke(app, ["eval", "--samples", "1", "--lengths", "64", "--tasks", "fidelity", *args])


def test_eval_refuses_an_unknown_schedule_before_running(model_dir, tmp_path):
    result = eval_("--model", model_dir, "--schedules", "banana", "--out", str(tmp_path / "out"))
    assert_clean_error(result, "unknown schedule 'banana'")
    assert not (tmp_path / "out" / "records.jsonl").exists()


def test_eval_report_only_on_a_missing_folder(tmp_path):
    result = eval_("--report-only", "--out", str(tmp_path / "nothing"))
    assert_clean_error(result, "holds no eval run")


@pytest.mark.parametrize(
    "args, message",
    [(["--dtype", "float8"], "unknown dtype 'float8'"), (["--model", "no-such-model-anywhere"], "pass smollm2")],
)
def test_eval_bad_model_and_dtype(tmp_path, args, message):
    assert_clean_error(eval_("--out", str(tmp_path / "out"), *args), message)
