"""`lazyprefill tune`: the search on a synthetic loss (fast, no model), then end to end on a tiny random model."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
from helpers import COMMON
from typer.testing import CliRunner

from lazyprefill import tune
from lazyprefill.bench import ModelDims
from lazyprefill.cli import app
from lazyprefill.generation import LazyLLM
from lazyprefill.schedule import Schedule, parse_schedule

DIMS = ModelDims(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, ffn=1536, vocab=49152)  # SmolLM2-135M
SPACE = tune.SearchSpace(scorers=("last", "pool(k=7)"), fractions=(0.1, 0.2, 0.34, 0.5, 0.67), ratios=(0.7, 0.5, 0.3))


def synthetic(work_left: float, pooled: bool) -> float:
    """A loss that grows as fewer tokens reach the deep layers; pooling halves it (monotone, as assumed)."""
    return (1.0 - work_left) ** 2 * (0.5 if pooled else 1.0)


class FakeEval:
    """Scores each candidate with `synthetic` on one task and counts the candidates evaluated."""

    def __init__(self, target: tune.Target) -> None:
        self.target, self.seen = target, []

    def loss(self, c: tune.Candidate) -> float:
        return synthetic(sum(c.computed) / (len(c.computed) * c.computed[0]), c.scorer.startswith("pool"))

    def __call__(self, c: tune.Candidate) -> tune.Outcome:
        self.seen.append(c)
        loss = self.loss(c)
        stats = {"code": {"score": 1 - loss, "dense": 1.0, "n": 8, "loss": loss, "loss_bound": loss}}
        if self.target.max_loss is None:
            return tune.Outcome(c, "evaluated", "", stats, c.ideal)
        return tune.Outcome(c, "passed" if loss <= self.target.max_loss else "failed", "", stats, c.ideal)


def test_candidates_count_the_tokens_each_layer_computes():
    cands = tune.candidates(SPACE, DIMS, 512)
    assert len({c.name for c in cands}) == len(cands) == 2 * (5 + 10) * 3
    assert [c.ideal for c in cands] == sorted(c.ideal for c in cands)

    def find(keep, scorer="last"):
        return next(c for c in cands if c.schedule == parse_schedule(f"{scorer}:{keep}", 30))

    one = find("10:0.5")
    assert one.computed == (512,) * 11 + (256,) * 19 and one.fractions == {0.34: 0.5}
    assert parse_schedule(one.name, 30) == one.schedule
    two = find("3:0.3,15:0.3")
    assert two.computed == (512,) * 4 + (154,) * 12 + (47,) * 14  # ceil(0.3 * 512), ceil(0.3 * 154)
    assert one.covers(two) and not two.covers(one)
    assert not one.covers(find("3:0.3,15:0.3", "pool(k=7)"))


def test_candidates_prune_only_at_the_layers_the_model_can_prune_at():
    gemma = ModelDims(layers=18, hidden=640, heads=4, kv_heads=1, head_dim=256, ffn=2048, vocab=262144)
    cands = tune.candidates(SPACE, gemma, 512, prunable=[5, 11, 17])
    assert {layer for c in cands for layer in c.schedule.keep} == {5, 11}  # 17 is past every fraction
    # 0.2 and 0.34 land on layer 5 (nearest to 3 and 6), 0.5 and 0.67 on 11: 3 layer sets x 3 ratios x 2 scorers
    assert len({c.name for c in cands}) == len(cands) == 3 * 3 * 2
    assert all(c.computed[0] == 512 and c.computed[5] == 512 for c in cands)


@pytest.mark.parametrize("max_loss", [0.0, 0.02, 0.1, 0.3])
def test_loss_target_finds_the_fastest_passing_candidate_and_skips_the_rest(max_loss):
    cands = tune.candidates(SPACE, DIMS, 512)
    target = tune.Target(max_loss=max_loss)
    fake = FakeEval(target)
    outcomes = tune.search(cands, fake, target)
    assert sorted(o.candidate.name for o in outcomes) == sorted(c.name for c in cands)  # every candidate resolved
    assert len(fake.seen) < len(cands) / 2  # the dominance cuts did their work
    passing = [c for c in cands if fake.loss(c) <= max_loss]
    chosen = tune.choose(outcomes, target)
    if passing:
        assert chosen.ideal == max(c.ideal for c in passing)
    else:
        assert chosen is None


def test_speedup_target_evaluates_only_the_mildest_candidates_that_reach_it():
    cands = tune.candidates(SPACE, DIMS, 512)
    target = tune.Target(min_speedup=2.0)
    fake = FakeEval(target)
    outcomes = tune.search(cands, fake, target)
    assert fake.seen and all(c.ideal >= 2.0 for c in fake.seen)
    assert not any(a is not b and a.covers(b) for a in fake.seen for b in fake.seen)
    chosen = tune.choose(outcomes, target)
    fast = [c for c in cands if c.ideal >= 2.0]
    assert fake.loss(chosen.candidate) == min(fake.loss(c) for c in fast)  # nothing skipped was more accurate
    assert chosen.candidate.scorer.startswith("pool")


def test_pareto_front_is_the_set_no_candidate_beats():
    cands = tune.candidates(SPACE, DIMS, 512)
    outcomes = [FakeEval(tune.Target(min_speedup=1.1))(c) for c in cands]
    front = tune.pareto_front(outcomes)

    def beats(p, o):
        return (
            p.ideal >= o.ideal and p.worst_loss <= o.worst_loss and (p.ideal > o.ideal or p.worst_loss < o.worst_loss)
        )

    assert front and [o.ideal for o in front] == sorted(o.ideal for o in front)
    assert not any(beats(p, o) for o in front for p in outcomes)
    assert all(any(beats(p, o) for p in front) for o in outcomes if o not in front)
    # along the front, going faster always costs accuracy
    assert all(a.worst_loss < b.worst_loss for a, b in itertools.pairwise(front))


def test_a_candidate_stops_once_the_target_is_out_of_reach():
    refs = {("passkey", 512, i): 1.0 for i in range(10)} | {("recall", 512, i): 0.0 for i in range(10)}

    def rec(task, i, score):
        return {"task": task, "length": 512, "index": i, "score": score}

    # passkey: dense solves all 10, 5% of them is 0.5 samples: one miss is already too many
    assert tune.cannot_pass([rec("passkey", 0, 0.0)], refs, 0.05).startswith("passkey")
    assert tune.cannot_pass([rec("passkey", 0, 1.0)], refs, 0.05) == ""
    # at 20% two misses still leave room, three do not
    assert tune.cannot_pass([rec("passkey", i, 0.0) for i in range(2)], refs, 0.2) == ""
    assert tune.cannot_pass([rec("passkey", i, 0.0) for i in range(3)], refs, 0.2) != ""


def test_losses_of_a_stopped_candidate_are_relative_to_dense_over_all_samples():
    refs = {("recall", 512, 0): 0.0, ("recall", 512, 1): 1.0, ("passkey", 512, 0): 1.0, ("passkey", 512, 1): 1.0}

    def rec(task, i, score):
        return {
            "task": task,
            "length": 512,
            "index": i,
            "method": "m",
            "family": "lazy",
            "base": "m",
            "score": score,
            "reference_score": refs[(task, 512, i)],
            "agree": 1.0,
            "kl": 0.0,
            "match": 0,
            "ttft_s": 0.5,
            "ideal_speedup": 2.0,
        }

    stats, ideal = tune.task_losses([rec("recall", 0, 0.0), rec("passkey", 0, 0.0)], refs)
    assert stats["recall"]["loss"] == 0.0 and stats["passkey"]["loss"] == 1.0  # dense 0 on the one recall sample
    assert ideal == 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one target"),
        ({"max_loss": 0.05, "min_speedup": 2.0}, "exactly one target"),
        ({"max_loss": 1.5}, r"\[0, 1\)"),
        ({"min_speedup": 0.9}, "above 1.0"),
        ({"max_loss": 0.05, "rule": "median"}, "bound or mean"),
    ],
)
def test_bad_targets_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tune.Target(**kwargs)


def test_bad_search_spaces_are_refused():
    with pytest.raises(ValueError, match="unknown scorer"):
        tune.SearchSpace(scorers=("best",))
    with pytest.raises(ValueError, match="keep ratios"):
        tune.SearchSpace(ratios=(1.0,))


# ------------------------------------------------------------------------------ end to end (tiny model)
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 4-layer random Llama with SmolLM2's tokenizer (the tasks need a real tokenizer), saved as a checkpoint."""
    import torch
    import transformers as tf

    from lazyprefill.models import converted_embedded

    tokenizer = tf.AutoTokenizer.from_pretrained(converted_embedded("smollm2"))
    config = tf.LlamaConfig(
        **{**COMMON, "vocab_size": len(tokenizer), "tie_word_embeddings": True},
        num_hidden_layers=4, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    tf.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_tune(tiny_dir, out, *target, tasks="fidelity"):
    return CliRunner().invoke(
        app,
        [
            "tune",
            "--model",
            str(tiny_dir),
            "--tasks",
            tasks,
            "--lengths",
            "128",
            "--samples",
            "3",
            "--eval-samples",
            "3",
            "--fractions",
            "0.25,0.5",
            "--ratios",
            "0.5",
            "--max-layers",
            "1",
            "--scorers",
            "last, pool(k=3, of=window(w=4))",
            "--out",
            str(out),
            *target,
        ],
    )


def test_tune_writes_a_schedule_file_that_the_api_and_the_cli_accept(tiny_dir, tmp_path):
    out = tmp_path / "schedule.json"
    result = run_tune(tiny_dir, out, "--target-speedup", "1.2")
    assert result.exit_code == 0, result.output
    assert "Pareto front" in result.output
    data = json.loads(out.read_text())
    assert data["num_layers"] == 4 and data["target"] == {"min_speedup": 1.2, "rule": "bound"}
    assert data["calibration"]["seed"] == 1 and data["calibration"]["evaluation_split"]["seed"] == 0
    assert set(data["scores"]) == {"fidelity"} and data["ideal_speedup"] >= 1.2

    work = tmp_path / "schedule-tune"
    log = json.loads((work / "tune-schedule.json").read_text())
    assert (
        log["chosen"]["schedule"]
        == Schedule(
            {int(k): v for k, v in data["keep"].items()}, parse_schedule(data["scorer"] + ":1:0.5", 4).scorer
        ).describe()
    )
    assert (work / "front-schedule.png").stat().st_size > 0
    records = (work / "records.jsonl").read_text().splitlines()

    # the API reads the file, and refuses it for a model of another depth
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_dir)
    lazy = LazyLLM(model, schedule=out)
    assert lazy.schedule.describe() == log["chosen"]["schedule"]
    with pytest.raises(ValueError, match="4 layers"):
        parse_schedule(out, 6)

    # the CLI reads it too
    ev = CliRunner().invoke(
        app,
        [
            "eval",
            "--model",
            str(tiny_dir),
            "--tasks",
            "fidelity",
            "--samples",
            "1",
            "--lengths",
            "128",
            "--schedules",
            str(out),
            "--baselines",
            "none",
            "--out",
            str(tmp_path / "eval"),
        ],
    )
    assert ev.exit_code == 0, ev.output
    assert str(out) in json.loads((tmp_path / "eval" / "eval.json").read_text())["summary"]["fidelity"]

    # a second target on the same work dir reuses every record it can
    again = run_tune(tiny_dir, out, "--target-loss", "0.5", "--rule", "mean")
    assert again.exit_code in (0, 1), again.output
    assert (work / "records.jsonl").read_text().splitlines()[: len(records)] == records

    # --report-only decides from the records alone: the same choice, nothing run
    records = (work / "records.jsonl").read_text()
    chosen = json.loads((work / "tune-schedule.json").read_text())["chosen"]
    replay = run_tune(tiny_dir, out, "--target-loss", "0.5", "--rule", "mean", "--report-only")
    assert replay.exit_code == again.exit_code, replay.output
    assert (work / "records.jsonl").read_text() == records
    assert json.loads((work / "tune-schedule.json").read_text())["chosen"] == chosen
    empty = run_tune(tiny_dir, tmp_path / "other.json", "--target-loss", "0.5", "--report-only")
    assert empty.exit_code == 2 and "run the search first" in " ".join(empty.output.split())


@pytest.mark.parametrize(
    "target, message",
    [
        ([], "exactly one target"),
        (["--target-loss", "0.05", "--target-speedup", "2"], "exactly one target"),
        (["--target-loss", "5"], "relative loss"),
        (["--target-speedup", "0.5"], "above 1.0"),
        (["--target-speedup", "50"], "fastest schedule of the search space"),
    ],
)
def test_tune_cli_refuses_bad_targets(tiny_dir, tmp_path, target, message):
    result = run_tune(tiny_dir, tmp_path / "s.json", *target)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split()).replace("│ ", "").replace(" │", "")


def test_pooled_last_is_among_the_default_candidate_scorers():
    assert "pool(k=7, of=last)" in tune.DEFAULT_SCORERS
    scorers = {c.scorer for c in tune.candidates(tune.SearchSpace(), DIMS, 512)}
    assert "pool(k=7, of=last(heads=mean))" in scorers and len(scorers) == len(tune.DEFAULT_SCORERS)


class FakeLog:
    """Stands in for `tune.Search`: remembers which tasks each evaluation was asked to run on."""

    def __init__(self, tasks: tuple[str, ...], calls: list) -> None:
        self.tasks, self.calls = tasks, calls
        self.samples = [SimpleNamespace(task=t) for t in tasks]

    def only(self, tasks):
        return FakeLog(tuple(t for t in self.tasks if t in tasks), self.calls)

    def evaluate(self, c, target, stop_early=True):
        self.calls.append((self.tasks, stop_early))
        loss = FakeEval(target).loss(c)
        stats = {t: {"score": 1 - loss, "dense": 1.0, "n": 8, "loss": loss, "loss_bound": loss} for t in self.tasks}
        return tune.Outcome(c, "passed" if loss <= target.max_loss else "failed", "", stats, c.ideal)


def test_a_fold_chooses_without_the_held_out_task_and_scores_the_choice_only_on_it():
    tasks = ("code", "recall", "passkey")
    cands, target = tune.candidates(SPACE, DIMS, 512), tune.Target(max_loss=0.1)
    for task in tasks:
        searched, scored = [], []
        fold = tune.hold_out(task, cands, FakeLog(tasks, searched), FakeLog(tasks, scored), target)
        assert fold.searched == tuple(t for t in tasks if t != task)
        assert searched and all(calls == (fold.searched, True) for calls in searched)  # never saw `task`
        assert set(fold.chosen.tasks) == set(fold.searched)
        assert scored == [((task,), False)]  # every evaluation sample of `task`, no early stop
        assert set(fold.scored.tasks) == {task} and fold.meets_target is True
        everywhere = tune.choose(tune.search(cands, FakeEval(target), target), target)
        assert fold.chosen.candidate.name == everywhere.candidate.name  # the fake's loss is the same on every task


def test_a_fold_with_no_passing_candidate_says_so():
    fold = tune.hold_out("code", tune.candidates(SPACE, DIMS, 512), FakeLog(("code", "recall"), []),
                         FakeLog(("code", "recall"), []), tune.Target(max_loss=0.0))
    assert fold.chosen is None and fold.scored is None and fold.meets_target is None
    assert fold.to_dict()["status"] == "no candidate met the target"


def test_holdout_needs_two_tasks():
    with pytest.raises(ValueError, match="at least two --tasks"):
        tune.TuneConfig(tasks=("passkey",), holdout=True)
    tune.TuneConfig(tasks=("passkey",))  # one task is fine without it


def test_tune_holdout_chooses_without_each_task_and_reports_on_it(tiny_dir, tmp_path):
    out = tmp_path / "schedule.json"
    result = run_tune(tiny_dir, out, "--target-speedup", "1.2", "--holdout", tasks="code,fidelity")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "| held out | chosen on |" in result.output and tune.HOLDOUT_NOTE in text

    work = tmp_path / "schedule-tune"
    data = json.loads((work / "holdout-schedule.json").read_text())
    assert data["note"] == tune.HOLDOUT_NOTE and [r["held_out"] for r in data["rows"]] == ["code", "fidelity"]
    for row in data["rows"]:
        assert row["searched_tasks"] == [t for t in ("code", "fidelity") if t != row["held_out"]]
        assert set(row["calibration"]["tasks"]) == set(row["searched_tasks"])  # the choice never saw it
        scores = row["held_out_scores"]
        assert scores["n"] == 3 and scores["loss_bound"] >= scores["loss"] - 1e-12
        assert row["status"] == "evaluated" and row["meets_target"] is True and row["ideal_speedup"] >= 1.2
    held = [json.loads(line) for line in (work / "holdout-records.jsonl").read_text().splitlines()]
    assert {(r["method"], r["task"]) for r in held if r["method"] != "dense"} == {
        (r["schedule"], r["held_out"]) for r in data["rows"]
    }  # each choice ran on its held-out task's evaluation samples only
    table = [line for line in (work / "holdout-schedule.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2  # the header, then one row per held-out task
    assert set(json.loads(out.read_text())["scores"]) == {"code", "fidelity"}  # the final choice: every task

    # --report-only rebuilds the folds from the two logs, running nothing
    logs = [(work / name).read_text() for name in ("records.jsonl", "holdout-records.jsonl")]
    replay = run_tune(tiny_dir, out, "--target-speedup", "1.2", "--holdout", "--report-only", tasks="code,fidelity")
    assert replay.exit_code == 0, replay.output
    assert [(work / name).read_text() for name in ("records.jsonl", "holdout-records.jsonl")] == logs
    assert json.loads((work / "holdout-schedule.json").read_text())["rows"] == data["rows"]


def test_tune_holdout_refuses_a_single_task(tiny_dir, tmp_path):
    result = run_tune(tiny_dir, tmp_path / "s.json", "--target-loss", "0.05", "--holdout")
    assert result.exit_code == 2
    assert "at least two --tasks" in " ".join(result.output.split()).replace("│ ", "").replace(" │", "")
