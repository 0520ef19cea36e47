"""The accuracy evaluation: metrics on hand-computed cases, task construction, and `lazyprefill eval` end to end."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lazyprefill.cli import app
from lazyprefill.eval import complete_records, metrics, report, tasks
from lazyprefill.eval.runner import Runner, make_methods, sweep_schedules
from lazyprefill.schedule import PRESETS, Preset, parse_schedule, split_list
from lazyprefill.sparse import Sparse


# ------------------------------------------------------------------------------------------ metrics
def test_code_sim_score_is_longbench_edit_similarity_of_the_first_code_line():
    # Indel ratio: "abc" vs "abd" needs 1 deletion + 1 insertion over 6 characters -> 1 - 2/6.
    assert metrics.code_sim_score("abd", "abc") == pytest.approx(4 / 6)
    # Leading newlines and comment lines are skipped, as in LongBench; lines are compared stripped.
    assert metrics.code_sim_score("\n\n    # set x\n    x = 1\ny = 2", "x = 1") == 1.0
    assert metrics.code_sim_score("// c\n`x`\n", "x = 1") == 0.0
    assert metrics.code_sim_score("", "x = 1") == 0.0


def test_recall_exact_compares_the_first_words():
    assert metrics.recall_exact(" to omit the\nparentheses that would", "to omit the parentheses") == 1.0
    assert metrics.recall_exact("to omit the parenthesis", "to omit the parentheses") == 0.0
    assert metrics.recall_exact("to omit", "to omit the") == 0.0
    assert metrics.recall_exact("to omit, the", "to omit the") == 0.0


def test_passkey_takes_the_first_number():
    assert metrics.passkey_correct(" 41267.\nThe", "41267") == 1.0
    assert metrics.passkey_correct(" 4126", "41267") == 0.0
    assert metrics.passkey_correct(" 12 then 41267", "41267") == 0.0
    assert metrics.passkey_correct(" no key", "41267") == 0.0


def test_fidelity_metrics():
    assert metrics.first_token_agree([5, 6], [5, 7]) == 1.0
    assert metrics.first_token_agree([], [5]) == 0.0
    assert metrics.match_length([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert metrics.match_length([1, 2], [1, 2, 3]) == 2
    logits = torch.tensor([0.3, -1.0, 2.0])
    assert metrics.kl_divergence(logits, logits) == 0.0
    # p = (0.5, 0.5), q = (0.8, 0.2): KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2).
    expected = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    q = torch.tensor([math.log(0.8), math.log(0.2)])
    assert metrics.kl_divergence(torch.zeros(2), q) == pytest.approx(expected, rel=1e-6)


def test_intervals():
    # Wilson for 2/4 correct: centre 0.5, half-width z*sqrt(1/16 + z^2/64) / (1 + z^2/4).
    z = metrics.Z95
    half = z * math.sqrt(1 / 16 + z * z / 64) / (1 + z * z / 4)
    ci = metrics.mean_ci([1, 0, 1, 0])
    assert (ci.mean, ci.n) == (0.5, 4)
    assert (ci.lo, ci.hi) == pytest.approx((0.5 - half, 0.5 + half))
    assert metrics.mean_ci([1, 1, 1]).lo < 1.0  # all correct still leaves doubt
    cont = metrics.mean_ci([0.2, 0.4, 0.6, 0.8])
    assert 0.2 <= cont.lo < 0.5 < cont.hi <= 0.8
    same = metrics.paired_diff_ci([0.2, 0.9], [0.2, 0.9])
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)
    worse = metrics.paired_diff_ci([0.0, 0.5, 1.0], [1.0, 1.0, 1.0])
    assert worse.mean == pytest.approx(-0.5) and worse.hi <= 0.0


def test_select_presets_takes_the_fastest_schedule_within_tolerance_on_every_task():
    def stats(family, bound, speedup):  # bound: the 95% upper bound of the relative loss
        return {"family": family, "score": {"mean": 0.5}, "dense_score": {"mean": 0.5}, "loss_bound": bound,
                "speedup": speedup, "ideal_speedup": speedup}

    summary = {
        "code": {"a": stats("lazy", 0.0, 1.2), "b": stats("lazy", 0.006, 1.5), "c": stats("lazy", 0.04, 2.0),
                 "static:c": stats("static", 0.0, 3.0)},
        "passkey": {"a": stats("lazy", 0.0, 1.2), "b": stats("lazy", 0.01, 1.5), "c": stats("lazy", 0.05, 2.0),
                    "static:c": stats("static", 0.0, 3.0)},
    }
    chosen = report.select_presets(summary, {"balanced": 0.01, "fast": 0.05, "none": 0.0})
    assert chosen["balanced"]["schedule"] == "b"
    assert chosen["fast"]["schedule"] == "c"
    assert chosen["none"]["schedule"] == "a"


def test_methods_pair_each_schedule_with_static_and_random():
    methods = make_methods(["paper", "9:0.5"], num_layers=30, baselines=["paper"])
    assert [(m.name, m.family) for m in methods] == [
        ("dense", "dense"), ("paper", "lazy"), ("9:0.5", "lazy"), ("static:paper", "static"),
        ("random:paper", "random"),
    ]
    assert len(sweep_schedules(30)) >= 5
    with pytest.raises(ValueError, match="not among"):
        make_methods(["paper"], num_layers=30, baselines=["9:0.5"])


def test_methods_take_their_family_from_the_scorer():
    spec = "pool(k=5, of=window(w=8)):9:0.5,18:0.5"
    methods = make_methods(split_list(f"static:paper, {spec.replace(',1', ';1')}, random:9:0.5"), num_layers=30)
    by_name = {m.name: m for m in methods}
    assert [m.family for m in methods] == ["dense", "lazy", "static", "random", "static", "random"]
    assert by_name[spec].scorer == "pool(k=5, of=window(w=8, heads=mean))"
    # the static baseline of a schedule keeps its scorer in prefill; random draws the same counts
    assert by_name[f"static:{spec}"].schedule == "static(of=pool(k=5, of=window(w=8, heads=mean))):9:0.5,18:0.5"
    assert by_name[f"random:{spec}"].schedule == "random(seed=0):9:0.5,18:0.5"
    assert by_name["static:paper"].family == "static" and by_name["random:9:0.5"].family == "random"


def test_baselines_keep_the_schedules_sparse_attention_and_shortest_prompt():
    methods = make_methods(["paper+sparse(top=0.1)+min=4096"], num_layers=30)
    static, random = (parse_schedule(m.schedule, 30) for m in methods[2:])
    for baseline in (static, random):
        assert baseline.sparse == Sparse(top=0.1) and baseline.min_prompt_tokens == 4096
    assert static.scorer.name == "static" and random.scorer.name == "random"


def test_schedule_lists_split_outside_parentheses():
    assert split_list("paper, pool(k=5, of=window(w=8)):9:0.5;18:0.5,9:0.7;19:0.7") == [
        "paper", "pool(k=5, of=window(w=8)):9:0.5,18:0.5", "9:0.7,19:0.7"]
    assert split_list(" , paper,") == ["paper"]


# -------------------------------------------------------------------------------------------- tasks
@pytest.fixture(scope="module")
def tokenizer():
    from lazyprefill.models import load_model

    return load_model("smollm2")[1]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_tasks_are_deterministic_and_exactly_the_requested_length(tokenizer, task):
    first = tasks.build(task, tokenizer, 256, 3, seed=1)
    again = tasks.build(task, tokenizer, 256, 3, seed=1)
    other = tasks.build(task, tokenizer, 256, 3, seed=2)
    assert first == again and first != other
    assert all(len(s.prompt_ids) == 256 for s in first)


def test_task_answers_are_in_the_prompt_where_they_should_be(tokenizer):
    for s in tasks.build("passkey", tokenizer, 256, 5):
        assert f"The pass key is {s.reference}." in tokenizer.decode(s.prompt_ids)
    for s in tasks.build("recall", tokenizer, 256, 3):
        text = " ".join(tokenizer.decode(s.prompt_ids).split())
        assert text.endswith(s.meta["prefix"]) and text.count(s.meta["prefix"] + " " + s.reference) == 1
    for s in tasks.build("code", tokenizer, 256, 3):
        assert "#" not in s.reference and len(s.reference) >= 12


# ------------------------------------------------------------------------------------------ the CLI
def test_eval_cli_writes_the_report_and_dense_matches_itself(tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(app, [
        "eval", "--model", "smollm2", "--tasks", "code,recall,passkey", "--samples", "5", "--lengths", "256",
        "--schedules", "paper", "--baselines", "none", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    assert set(data) == {"config", "summary", "presets"}  # the records are in records.jsonl alone
    records = complete_records(out, n_methods=2)
    assert len(records) == 3 * 5 * 2
    for task in ("code", "recall", "passkey"):
        assert (out / f"{task}.png").stat().st_size > 0
        assert set(data["summary"][task]) == {"dense", "paper"}
        for stats in data["summary"][task].values():
            assert stats["score"]["n"] == 5
            lo, hi = stats["score"]["ci95"]
            assert lo <= stats["score"]["mean"] <= hi
            assert stats["speedup"] > 0 and stats["ideal_speedup"] >= 1.0
        dense = data["summary"][task]["dense"]
        assert dense["score"] == dense["dense_score"]
        assert dense["diff_vs_dense"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 5}
    for r in records:
        if r["method"] == "dense":  # the run that made the reference
            assert r["score"] == r["reference_score"] and r["agree"] == 1.0 and r["kl"] == 0.0
    assert "balanced" in data["presets"] and "fast" in data["presets"]
    assert data["config"]["split"] == "evaluation" and data["config"]["seed"] == 0
    assert (out / "eval.md").read_text().count("| paper |") == 3


def test_eval_resume_runs_only_the_samples_left_and_refuses_another_evaluation(tmp_path, monkeypatch):
    out = tmp_path / "eval"
    args = ["eval", "--model", "smollm2", "--tasks", "passkey", "--lengths", "256", "--baselines", "none",
            "--out", str(out)]
    assert CliRunner().invoke(app, [*args, "--schedules", "paper", "--samples", "2"]).exit_code == 0
    first = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    (out / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first[:-1]))  # stopped mid-sample
    result = CliRunner().invoke(app, [*args, "--schedules", "paper", "--samples", "3", "--resume"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    assert data["config"]["resumed_samples"] == 1
    records = complete_records(out, n_methods=2)
    assert [(r["index"], r["method"]) for r in records] == [(i, m) for i in range(3) for m in ("dense", "paper")]
    assert [r["ttft_s"] for r in records[:2]] == [r["ttft_s"] for r in first[:2]]  # kept, not run again
    refused = CliRunner().invoke(app, [*args, "--schedules", "balanced", "--samples", "3", "--resume"])
    assert refused.exit_code == 2 and "another methods" in refused.output
    monkeypatch.setitem(PRESETS, "paper", Preset({0.3: 0.5}))  # the same spec now runs another schedule
    changed = CliRunner().invoke(app, [*args, "--schedules", "paper", "--samples", "3", "--resume"])
    assert changed.exit_code == 2 and "another schedules" in changed.output


def test_a_split_merged_folder_resumes_as_the_per_task_run_of_some_of_its_methods(tmp_path):
    """benchmarks/split_eval.py: a lease's merged report of three methods gives each task the folder that a later
    run of two of them resumes, keeping their records, and running only the samples left."""
    spec = importlib.util.spec_from_file_location("split_eval", Path(__file__).parents[1] / "benchmarks/split_eval.py")
    split_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split_eval)
    merged = tmp_path / "merged"
    args = ["eval", "--model", "smollm2", "--lengths", "256", "--baselines", "none", "--samples", "2"]
    first = CliRunner().invoke(app, [*args, "--tasks", "passkey,recall", "--schedules", "paper,2:0.5", "--out",
                                     str(merged)])
    assert first.exit_code == 0, first.output
    assert split_eval.split(merged, tmp_path, ["dense", "paper"], "b") == {"256-passkey-b": 2, "256-recall-b": 2}
    folder = tmp_path / "256-passkey-b"
    kept = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert {r["method"] for r in kept} == {"dense", "paper"} and {r["task"] for r in kept} == {"passkey"}
    resumed = CliRunner().invoke(app, [*args[:-1], "3", "--tasks", "passkey", "--schedules", "paper", "--out",
                                       str(folder), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    data = json.loads((folder / "eval.json").read_text())
    assert data["config"]["resumed_samples"] == 2
    records = complete_records(folder, n_methods=2)
    assert [(r["index"], r["method"]) for r in records] == [(i, m) for i in range(3) for m in ("dense", "paper")]
    assert [r["ttft_s"] for r in records[:4]] == [r["ttft_s"] for r in kept]
    with pytest.raises(SystemExit, match="no method"):
        split_eval.split(merged, tmp_path, ["dense", "balanced"], "c")


def test_a_fresh_reference_is_the_dense_run_and_a_cached_one_is_checked_by_a_rerun(tokenizer, tmp_path):
    from lazyprefill.models import load_model

    runner = Runner(load_model("smollm2")[0], tokenizer, "smollm2", cache_dir=tmp_path)
    samples = tasks.build("passkey", tokenizer, 128, 2)
    methods = make_methods(["paper"], runner.num_layers, baselines=[])
    calls: list[str] = []
    generate = runner.generate
    runner.generate = lambda sample, schedule: calls.append(schedule) or generate(sample, schedule)
    fresh = runner.run(samples, methods, progress=False)
    assert calls == ["dense", "paper"] * 2  # one dense prefill per sample, not two
    calls.clear()
    cached = runner.run(samples, methods, progress=False)
    assert calls == ["dense", "paper"] * 2  # the reference from disk; dense re-run against it
    for a, b in zip(fresh, cached, strict=True):
        assert (a["method"], a["score"], a["prediction"]) == (b["method"], b["score"], b["prediction"])
        if a["method"] == "dense":
            assert b["agree"] == 1.0 and b["kl"] == 0.0 and b["score"] == b["reference_score"]
