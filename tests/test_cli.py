"""`lazyprefill generate` end to end on the embedded SmolLM2, and its input errors."""

from __future__ import annotations

import json

import pytest
from helpers import flat
from typer.testing import CliRunner

from lazyprefill.cli import app

DOCUMENT = (
    "Python was created in the early 1990s by Guido van Rossum at Stichting Mathematisch Centrum "
    "in the Netherlands as a successor of a language called ABC. In 2001, the Python Software "
    "Foundation was formed, a non-profit organization created to own Python-related intellectual property."
)
runner = CliRunner()


@pytest.fixture
def doc(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(DOCUMENT)
    return path


def generate(*args: str):
    return runner.invoke(app, ["generate", "--model", "smollm2", *args])


def test_json_reports_the_answer_and_per_layer_work(doc):
    result = generate("--prompt-file", str(doc), "--question", "Who created Python?", "-n", "4", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"] == "smollm2" and out["schedule"] == "balanced"
    assert out["schedule_scorer"] == "revive(rows=8, of=last(heads=mean))"
    assert out["schedule_keep"] == {"20": 0.3}  # the default preset: 67% of 30 layers
    assert 1 <= len(out["token_ids"]) <= 4 and isinstance(out["text"], str)
    assert out["ttft_s"] > 0 and len(out["ttft_runs_s"]) == 1
    computed = out["prefill_computed"]
    assert len(computed) == 30 and computed[0] == out["prompt_tokens"]
    assert computed[20] == out["prompt_tokens"] and computed[21] < computed[20]  # pruned after layer 20
    assert out["prefill_work"] == pytest.approx(sum(computed) / (30 * out["prompt_tokens"])) and out["prefill_work"] < 1
    assert "dense_ttft_s" not in out


def test_compare_json_times_both_methods_three_times(doc):
    result = generate("--prompt-file", str(doc), "-n", "3", "--compare", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert len(out["ttft_runs_s"]) == 3 and len(out["dense_ttft_runs_s"]) == 3
    assert out["speedup"] == pytest.approx(out["dense_ttft_s"] / out["ttft_s"])
    assert isinstance(out["dense_text"], str) and out["dense_token_ids"]


def test_keep_all_schedule_answers_like_dense(doc):
    args = ["-s", "9:1.0,18:1.0", "-n", "8", "--compare", "--repeats", "1", "--json"]
    result = generate("--prompt-file", str(doc), *args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["token_ids"] == out["dense_token_ids"]
    assert out["prefill_work"] == 1.0


def test_compare_text_prints_both_answers_and_the_speedup(doc):
    result = generate("--prompt-file", str(doc), "-n", "2", "--compare", "--repeats", "1")
    assert result.exit_code == 0, result.output
    assert "LazyLLM (balanced):" in result.stdout and "Dense:" in result.stdout
    assert "TTFT speedup:" in result.stdout


def test_several_prompt_files_answer_each_as_alone(doc, tmp_path):
    """A batch of documents of different lengths: each answer is the one its file gets alone."""
    other = tmp_path / "other.txt"
    other.write_text("The Eiffel Tower in Paris was completed in 1889 for the World's Fair.")
    args = ["--question", "When was it built?", "-n", "6", "--json"]
    result = generate("--prompt-file", str(doc), "--prompt-file", str(other), *args)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["batch_size"] == 2 and out["ttft_s"] > 0
    answers = out["answers"]
    assert [a["prompt_file"] for a in answers] == [str(doc), str(other)]
    assert answers[0]["prompt_tokens"] > answers[1]["prompt_tokens"]
    for answer, path in zip(answers, (doc, other), strict=True):
        alone = json.loads(generate("--prompt-file", str(path), *args).stdout)
        assert answer["token_ids"] == alone["token_ids"] and answer["prefill_computed"] == alone["prefill_computed"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt-file", "no/such/file.txt"], "does not exist"),
        (["--schedule", "banana"], "unknown schedule 'banana'"),
        (["--schedule", "9:1.5"], "keep ratio 1.5 at layer 9 must be in (0, 1]"),
        (["--schedule", "29:0.5"], "pruning layer 29 is out of range"),
        (["--dtype", "float8"], "use one of"),
        (["--max-new-tokens", "9000"], "exceeds the model's 8192 positions"),
    ],
)
def test_bad_input_is_a_clean_error(doc, args, message):
    if "--prompt-file" not in args:
        args = ["--prompt-file", str(doc), *args]
    result = generate(*args)
    assert result.exit_code == 2
    assert message in flat(result.output)
    assert "Traceback" not in result.output


def test_empty_prompt_is_a_clean_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    result = generate("--prompt-file", str(empty))
    assert result.exit_code == 2
    assert "is empty and no --question was given" in flat(result.output)
