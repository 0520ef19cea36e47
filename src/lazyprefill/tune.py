"""`lazyprefill tune`: the fastest schedule within a loss target, or the most accurate one at a speedup.

The search runs on calibration prompts built from the eval tasks with their own seed, never on the
evaluation split (MEASURE.md: choose on one split, report on another); prompts shared with the
evaluation split are dropped. A candidate is a scorer and a depth-relative schedule: 1 to
`max_layers` pruning layers at depth fractions, one keep ratio from a ladder at each of them.

Two rules keep the search small, both from one assumption (for one scorer, pruning more never helps):
- A candidate computes `computed[l]` tokens at layer l. If it fails the loss target, every candidate
  with the same scorer that computes no more at any layer is skipped; if it passes, every one that
  computes no fewer is skipped (it is slower and the target needs no more accuracy). Candidates are
  taken from the middle of the remaining speedups, so each result cuts the rest about in half.
- Samples of all tasks are interleaved and a candidate stops as soon as it cannot reach the target any
  more, even if it matched dense on every sample still to run.

Every record goes to `work_dir/records.jsonl` (the eval runner's format) and is reused on a rerun, so
a stopped search resumes and a second target on the same calibration costs only the new candidates.

Leave one family out (`holdout`, MEASURE.md): a split of samples does not show what a choice costs on a
family it never saw (a preset chosen on passkey, recall and code lost held-out key-value retrieval). Each
task in turn is left out: the same search chooses on the other tasks' calibration records (reused, so a
fold runs only the candidates its own cuts need) and the choice is scored on the left-out task's
evaluation split against dense (`work_dir/holdout-records.jsonl`). Accuracy claims come from those rows.
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapters import adapter_for
from .eval import report
from .eval import tasks as eval_tasks
from .eval.runner import Method, Runner, task_score
from .flops import ModelDims, ideal_speedup
from .schedule import Schedule
from .scoring import parse_scorer

if TYPE_CHECKING:
    import torch

RULES = ("bound", "mean")
DEFAULT_SCORERS = (
    "last",
    "pool(k=7, of=last)",
    "pool(k=7, of=window(w=16))",
    "protect(sink=4, recent=16, of=pool(k=7, of=window(w=16)))",
)
DENSE = Method("dense", "dense", "dense", "")
HOLDOUT_NOTE = (
    "Quote accuracy from the held-out rows: each was scored on a task its schedule's search never saw. "
    "The schedule written to --out was chosen on every task, so its calibration scores are not held out."
)


@dataclass(frozen=True)
class Target:
    """What to stop at: the largest relative loss per task against dense, or the smallest ideal speedup.

    `rule="bound"` holds a candidate to the 95% confidence bound of its paired loss (MEASURE.md's
    promise), `rule="mean"` to its mean loss.
    """

    max_loss: float | None = None
    min_speedup: float | None = None
    rule: str = "bound"

    def __post_init__(self) -> None:
        if (self.max_loss is None) == (self.min_speedup is None):
            raise ValueError("give exactly one target: --target-loss (e.g. 0.05) or --target-speedup (e.g. 2.0)")
        if self.max_loss is not None and not 0.0 <= self.max_loss < 1.0:
            raise ValueError(f"--target-loss {self.max_loss} must be a relative loss in [0, 1), e.g. 0.05 for 5%")
        if self.min_speedup is not None and not self.min_speedup > 1.0:
            raise ValueError(f"--target-speedup {self.min_speedup} must be above 1.0 (dense is 1.0x), e.g. 2.0")
        if self.rule not in RULES:
            raise ValueError(f"rule {self.rule!r}: use {' or '.join(RULES)}")


@dataclass(frozen=True)
class SearchSpace:
    """Scorers x pruning depth fractions (1 to `max_layers` of them) x one keep ratio from `ratios`."""

    scorers: tuple[str, ...] = DEFAULT_SCORERS
    fractions: tuple[float, ...] = (0.1, 0.2, 0.34, 0.5, 0.67)
    ratios: tuple[float, ...] = (0.7, 0.5, 0.3)
    max_layers: int = 2

    def __post_init__(self) -> None:
        for spec in self.scorers:
            parse_scorer(spec)  # raises with the registered scorers named
        if not self.scorers or not self.fractions or not self.ratios:
            raise ValueError("the search space needs at least one scorer, one depth fraction and one keep ratio")
        if not all(0.0 <= f < 1.0 for f in self.fractions):
            raise ValueError(f"depth fractions {self.fractions} must be in [0, 1)")
        if not all(0.0 < r < 1.0 for r in self.ratios):
            raise ValueError(f"keep ratios {self.ratios} must be in (0, 1): 1.0 prunes nothing")
        if self.max_layers < 1:
            raise ValueError(f"max_layers {self.max_layers} must be at least 1")


@dataclass(frozen=True)
class Candidate:
    """One schedule to try; `computed[l]` is how many tokens layer l computes for the longest prompt."""

    schedule: Schedule
    fractions: dict[float, float]  # depth fraction -> keep ratio, as a `Preset` writes it
    computed: tuple[int, ...]
    ideal: float

    @property
    def name(self) -> str:
        return self.schedule.describe()

    @property
    def scorer(self) -> str:
        return self.schedule.scorer.spec()

    def covers(self, other: Candidate) -> bool:
        """True when `other` has the same scorer and computes no more tokens than this one at any layer."""
        return self.scorer == other.scorer and all(a >= b for a, b in zip(self.computed, other.computed))


def depth_layer(fraction: float, num_layers: int, prunable: Sequence[int] | None = None) -> int:
    """The layer a depth fraction names, placed as `schedule.preset` places it (on the nearest of a
    model's `prunable` layers when it can prune only at some, as Gemma 3 at its full-attention layers)."""
    layer = min(max(int(fraction * num_layers), 0), num_layers - 2)
    return layer if prunable is None else min(prunable, key=lambda p: (abs(p - layer), p))


def prefill_counts(schedule: Schedule, num_layers: int, length: int) -> tuple[int, ...]:
    """Tokens each layer computes in prefill of a `length`-token prompt under `schedule`."""
    counts, n = [], length
    for layer in range(num_layers):
        counts.append(n)
        if layer in schedule.keep:
            n = schedule.kept_count(layer, n)
    return tuple(counts)


def candidates(
    space: SearchSpace, dims: ModelDims, length: int, prunable: Sequence[int] | None = None
) -> list[Candidate]:
    """Every distinct schedule of the space for this model, fastest (ideal speedup) last; `prunable`:
    the layers it can prune at (None: all)."""
    out: dict[str, Candidate] = {}
    for spec in space.scorers:
        scorer = parse_scorer(spec)
        for n in range(1, space.max_layers + 1):
            for fracs in itertools.combinations(sorted(set(space.fractions)), n):
                for ratio in space.ratios:
                    keep = {depth_layer(f, dims.layers, prunable): ratio for f in fracs}
                    if len(keep) < n:  # two fractions on one layer (a shallow model, or few prunable layers)
                        continue
                    schedule = Schedule(keep, scorer)
                    computed = prefill_counts(schedule, dims.layers, length)
                    cand = Candidate(schedule, {f: ratio for f in fracs}, computed, ideal_speedup(dims, list(computed)))
                    out.setdefault(cand.name, cand)
    return sorted(out.values(), key=lambda c: (c.ideal, c.name))


# ------------------------------------------------------------------------------------- calibration
def calibration_samples(
    task_names: tuple[str, ...],
    tokenizer,
    lengths: tuple[int, ...],
    n: int,
    seed: int,
    evaluation: list[eval_tasks.Sample],
) -> tuple[list[eval_tasks.Sample], int]:
    """The calibration prompts, less any that the `evaluation` split also has.

    Returns (samples, how many were dropped as shared)."""
    held_out = {tuple(s.prompt_ids) for s in evaluation}
    samples = eval_tasks.build_all(task_names, tokenizer, lengths, n, seed)
    kept = [s for s in samples if tuple(s.prompt_ids) not in held_out]
    return kept, len(samples) - len(kept)


@dataclass
class Outcome:
    """A candidate's result on the calibration samples (`status`: passed, failed, stopped, evaluated, skipped)."""

    candidate: Candidate
    status: str
    why: str = ""
    tasks: dict[str, dict] = field(default_factory=dict)  # task -> score, dense, loss, loss_bound, n
    ideal: float = 0.0

    @property
    def complete(self) -> bool:
        return self.status in ("passed", "failed", "evaluated")

    @property
    def worst_loss(self) -> float:
        return max(t["loss"] for t in self.tasks.values())

    def to_dict(self) -> dict:
        c = self.candidate
        return {
            "schedule": c.name,
            "scorer": c.scorer,
            "keep": {str(k): v for k, v in c.schedule.keep.items()},
            "fractions": {str(k): v for k, v in c.fractions.items()},
            "status": self.status,
            "why": self.why,
            "ideal_speedup": self.ideal or c.ideal,
            "tasks": self.tasks,
        }


def task_losses(records: list[dict], references: dict[tuple, float]) -> tuple[dict[str, dict], float]:
    """Per task: score and dense means, the relative loss and its 95% bound; plus the ideal speedup.

    No measured speedup: dense runs once per sample, at the start, not beside each candidate, so on a
    shared machine the ratio of the two times says more about the load than the schedule (`eval`
    interleaves them and reports it).

    Losses are relative to dense's mean over all of the task's calibration samples, so that a candidate
    stopped early (on a few samples, where dense may have scored 0) still has one."""
    out = {}
    for task, methods in report.summarize(records).items():
        (s,) = methods.values()  # one method
        dense = statistics.fmean(v for k, v in references.items() if k[0] == task)
        out[task] = {
            "score": s["score"]["mean"],
            "dense": s["dense_score"]["mean"],
            "n": s["score"]["n"],
            "diff_ci95": s["diff_vs_dense"]["ci95"],
            "loss": -s["diff_vs_dense"]["mean"] / dense,
            "loss_bound": -s["diff_vs_dense"]["ci95"][0] / dense,
        }
    return out, statistics.median(r["ideal_speedup"] for r in records)


def _key(r: dict) -> tuple:
    return (r["task"], r["length"], r["index"])


def cannot_pass(records: list[dict], references: dict[tuple, float], max_loss: float) -> str:
    """Why a partly evaluated candidate cannot reach `max_loss` on some task even if every remaining sample
    scored 1.0 (every metric is in [0, 1]); '' while it still can. Failing the mean fails the bound too."""
    for task in sorted({k[0] for k in references}):
        keys = [k for k in references if k[0] == task]
        done = {_key(r): r["score"] for r in records if r["task"] == task}
        deficit = sum(references[k] - done[k] for k in done)
        best_gain = sum(1.0 - references[k] for k in keys if k not in done)
        allowed = max_loss * sum(references[k] for k in keys)
        if deficit - best_gain > allowed:
            return f"{task}: already {deficit:.2f} below dense over {len(done)} of {len(keys)} samples"
    return ""


def passes(task_stats: dict[str, dict], target: Target) -> str:
    """'' when the losses meet a loss target, else which task does not."""
    key = "loss_bound" if target.rule == "bound" else "loss"
    bad = [f"{t} {s[key]:+.1%}" for t, s in task_stats.items() if s[key] > target.max_loss]
    return ", ".join(bad)


# ------------------------------------------------------------------------------------------ search
@dataclass(frozen=True)
class TuneConfig:
    model: str = "smollm2"
    tasks: tuple[str, ...] = ("code", "recall", "passkey")
    lengths: tuple[int, ...] = (512,)
    samples: int = 20
    seed: int = eval_tasks.SPLITS["calibration"]
    eval_seed: int = eval_tasks.SPLITS["evaluation"]
    eval_samples: int = 100
    target: Target = field(default_factory=lambda: Target(max_loss=0.05))
    space: SearchSpace = field(default_factory=SearchSpace)
    work_dir: Path = Path("tune-work")
    cache_dir: Path | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    run: bool = True  # False: rebuild the outcomes from work_dir's records, run nothing
    holdout: bool = False  # also leave each task out in turn (the module docstring)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in eval_tasks.TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(eval_tasks.TASKS)}")
        if self.samples < 2:
            raise ValueError(f"samples {self.samples}: use at least 2 per task (more give tighter bounds)")
        if not self.lengths:
            raise ValueError("give at least one prompt length (--lengths 512)")
        if self.seed == self.eval_seed:
            raise ValueError(f"the calibration seed {self.seed} is the evaluation seed: choose another --seed")
        if self.holdout and len(self.tasks) < 2:
            raise ValueError(
                f"--holdout leaves each task out in turn and chooses on the others: give at least two --tasks "
                f"(got {', '.join(self.tasks)}), e.g. code,recall,passkey"
            )
        if self.holdout and self.eval_samples < 2:
            raise ValueError(f"--eval-samples {self.eval_samples}: --holdout needs at least 2 per task for a bound")


@dataclass
class TuneResult:
    outcomes: list[Outcome]
    chosen: Outcome | None
    front: list[Outcome]
    calibration: dict
    dense: dict[str, float]  # task -> dense mean score on the calibration samples
    holdout: list[Holdout] = field(default_factory=list)  # one fold per task, with `TuneConfig.holdout`


class NotRun(Exception):
    """A record the log does not hold, asked for in a search that runs nothing (`run=False`)."""


class Search:
    """Evaluates candidates on the calibration samples, reusing and appending to a JSONL log.

    With `run=False` it only reads the log: references come from the dense records, and a candidate
    the log does not fully hold comes out "not run" (its partial statistics kept)."""

    def __init__(
        self,
        runner: Runner | None,
        samples: list[eval_tasks.Sample],
        log_path: Path,
        progress: Callable[[str], None] = lambda _: None,
        run: bool = True,
    ) -> None:
        self.runner, self.samples, self.log_path, self.progress, self.run = runner, samples, log_path, progress, run
        self.done: dict[tuple[str, tuple], dict] = {}
        if log_path.exists():
            for line in log_path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.done[(r["method"], _key(r))] = r
        self.refs = {}
        self.references: dict[tuple, float] = {}
        for sample in samples:
            key = _key(vars(sample))
            if run:
                self.refs[key] = ref = runner.reference(sample)
                self.references[key] = task_score(sample, ref.text, ref.tokens, ref.tokens)
            elif ("dense", key) in self.done:
                self.references[key] = self.done[("dense", key)]["reference_score"]
            else:
                raise ValueError(
                    f"{log_path} has no dense record of {key}: run the search first (without --report-only)"
                )

    def only(self, tasks: Collection[str]) -> Search:
        """This search on the samples of `tasks` alone, sharing its log, records and references: a fold of
        leave one family out reuses every record that a search over more tasks made."""
        view = copy.copy(self)
        view.samples = [s for s in self.samples if s.task in tasks]
        view.references = {k: v for k, v in self.references.items() if k[0] in tasks}
        return view

    def dense_means(self, tasks: Sequence[str], split: str) -> dict[str, float]:
        """Dense's mean score per task; refused when it is 0, where a relative loss is undefined."""
        means = {t: statistics.fmean(v for k, v in self.references.items() if k[0] == t) for t in tasks}
        for task, mean in means.items():
            if mean == 0:
                lengths = sorted({s.length for s in self.samples})
                raise ValueError(
                    f"dense scores 0 on {task} ({split} split) at {lengths} tokens: a relative loss is undefined; "
                    "drop the task or use lengths where the model does it"
                )
        return means

    def record(self, sample: eval_tasks.Sample, method: Method) -> dict:
        key = (method.name, _key(vars(sample)))
        if key not in self.done:
            if not self.run:
                raise NotRun(method.name)
            r = self.runner.run_one(sample, method, self.refs[key[1]])
            r["reference_score"] = self.references[key[1]]
            self.done[key] = r
            with open(self.log_path, "a") as log:
                log.write(json.dumps(r) + "\n")
        return self.done[key]

    def run_dense(self) -> None:
        """Dense as a method on every sample: its scores must equal the references' (a check in the log)."""
        for s in self.samples:
            self.record(s, DENSE)

    def evaluate(self, cand: Candidate, target: Target, stop_early: bool = True) -> Outcome:
        """All samples (stopping early when a loss target is out of reach, unless `stop_early` is False: a
        reported score must not depend on when it was stopped), then the per-task statistics."""
        method = Method(cand.name, "lazy", cand.name, cand.name)
        records: list[dict] = []
        for i, sample in enumerate(self.samples):
            self.progress(f"{cand.name} {i + 1}/{len(self.samples)}")
            try:
                records.append(self.record(sample, method))
            except NotRun:
                if not records:
                    return Outcome(cand, "not run", "no record in the log")
                stats, ideal = task_losses(records, self.references)
                return Outcome(
                    cand, "not run", f"the log holds {len(records)} of {len(self.samples)} samples", stats, ideal
                )
            can_stop = stop_early and target.max_loss is not None
            why = cannot_pass(records, self.references, target.max_loss) if can_stop else ""
            if why and i + 1 < len(self.samples):
                stats, ideal = task_losses(records, self.references)
                return Outcome(cand, "stopped", why, stats, ideal)
        stats, ideal = task_losses(records, self.references)
        if target.max_loss is None:
            return Outcome(cand, "evaluated", "", stats, ideal)
        why = passes(stats, target)
        return Outcome(cand, "failed" if why else "passed", why, stats, ideal)


def search(
    space_candidates: list[Candidate],
    evaluate: Callable[[Candidate], Outcome],
    target: Target,
    on_resolved: Callable[[int], None] = lambda _: None,
) -> list[Outcome]:
    """Resolve every candidate, evaluating as few as the target allows (see the module docstring)."""
    outcomes: list[Outcome] = []
    if target.min_speedup is not None:
        fast = [c for c in space_candidates if c.ideal >= target.min_speedup]
        # the least pruning at or above the target speed: a candidate another one covers prunes more for nothing
        todo = [c for c in fast if not any(o is not c and o.covers(c) for o in fast)]
        outcomes += [
            Outcome(c, "skipped", "prunes more than a candidate that reaches the target") for c in fast if c not in todo
        ]
        on_resolved(len(outcomes) + len(space_candidates) - len(fast))
        for c in todo:
            outcomes.append(evaluate(c))
            on_resolved(1)
        return outcomes
    pending = list(space_candidates)
    while pending:
        cand = pending[len(pending) // 2]  # sorted by ideal speedup: the middle one
        outcome = evaluate(cand)
        outcomes.append(outcome)
        pending.remove(cand)
        if outcome.status == "not run":
            cut, why = [], ""
        elif outcome.status == "passed":
            cut = [c for c in pending if c.covers(cand)]
            why = f"computes no fewer tokens than {cand.name}, which passed"
        else:
            cut = [c for c in pending if cand.covers(c)]
            why = f"computes no more tokens than {cand.name}, which failed"
        outcomes += [Outcome(c, "skipped", why) for c in cut]
        pending = [c for c in pending if c not in cut]
        on_resolved(1 + len(cut))
    return outcomes


def pareto_front(outcomes: list[Outcome]) -> list[Outcome]:
    """Complete outcomes that no other beats on both ideal speedup and worst-task loss, fastest last."""
    done = [o for o in outcomes if o.complete]
    front = [
        o
        for o in done
        if not any(
            (p.ideal >= o.ideal and p.worst_loss <= o.worst_loss) and (p.ideal > o.ideal or p.worst_loss < o.worst_loss)
            for p in done
        )
    ]
    return sorted(front, key=lambda o: o.ideal)


def choose(outcomes: list[Outcome], target: Target) -> Outcome | None:
    """The fastest candidate that passed a loss target, or the most accurate one at a speedup target."""
    if target.max_loss is not None:
        ok = [o for o in outcomes if o.status == "passed"]
        return max(ok, key=lambda o: (o.ideal, -o.worst_loss)) if ok else None  # ties: the first evaluated
    done = [o for o in outcomes if o.complete]
    return min(done, key=lambda o: (o.worst_loss, -o.ideal)) if done else None


# ----------------------------------------------------------------------------- leave one family out
@dataclass
class Holdout:
    """One fold: the schedule chosen on the calibration samples of every task but `task`, scored on
    `task`'s evaluation samples against dense; neither the choice nor its statistics saw `task`."""

    task: str
    searched: tuple[str, ...]
    chosen: Outcome | None  # on the calibration samples of `searched`; None: no candidate met the target
    scored: Outcome | None  # the chosen schedule on `task`'s evaluation samples
    meets_target: bool | None  # None: nothing chosen, or its evaluation is not in the log (report only)

    def to_dict(self) -> dict:
        scored = self.scored
        return {
            "held_out": self.task,
            "searched_tasks": list(self.searched),
            "schedule": None if self.chosen is None else self.chosen.candidate.name,
            "status": "no candidate met the target" if scored is None else scored.status,
            "ideal_speedup": None if scored is None else scored.ideal,
            "held_out_scores": None if scored is None else scored.tasks.get(self.task),
            "meets_target": self.meets_target,
            "calibration": None if self.chosen is None else self.chosen.to_dict(),
        }


def meets(outcome: Outcome, target: Target) -> bool | None:
    """Whether a complete outcome meets the target (its losses, or its ideal speedup); None if incomplete."""
    if not outcome.complete:
        return None
    if target.max_loss is not None:
        return not passes(outcome.tasks, target)
    return outcome.ideal >= target.min_speedup


def hold_out(
    task: str,
    space: list[Candidate],
    calibration: Search,
    evaluation: Search,
    target: Target,
    on_resolved: Callable[[int], None] = lambda _: None,
) -> Holdout:
    """Choose as `tune` does on every calibration task but `task`, then score the choice on `task`'s
    evaluation samples, every one of them (no early stop: the row is a report, not a cut)."""
    searched = tuple(dict.fromkeys(s.task for s in calibration.samples if s.task != task))
    fold = calibration.only(searched)
    chosen = choose(search(space, lambda c: fold.evaluate(c, target), target, on_resolved), target)
    if chosen is None:
        return Holdout(task, searched, None, None, None)
    scored = evaluation.only((task,)).evaluate(chosen.candidate, target, stop_early=False)
    return Holdout(task, searched, chosen, scored, meets(scored, target))


# ------------------------------------------------------------------------------------------- tune
def tune(cfg: TuneConfig, progress: bool = True) -> TuneResult:
    """Build the calibration split, search, and return every outcome with the chosen one and the front;
    with `cfg.holdout`, also one leave-one-family-out fold per task."""
    from tqdm.auto import tqdm

    model, tokenizer, runner = _load(cfg)
    evaluation = eval_tasks.build_all(cfg.tasks, tokenizer, cfg.lengths, cfg.eval_samples, cfg.eval_seed)
    samples, shared = calibration_samples(cfg.tasks, tokenizer, cfg.lengths, cfg.samples, cfg.seed, evaluation)
    calibration = {
        "tasks": list(cfg.tasks),
        "lengths": list(cfg.lengths),
        "samples_per_task": cfg.samples,
        "seed": cfg.seed,
        "samples": len(samples),
        "dropped_shared_with_evaluation": shared,
        "evaluation_split": {"seed": cfg.eval_seed, "samples_per_task": cfg.eval_samples},
    }
    _check_log(cfg, calibration)
    space = _space(cfg, model)
    folds = cfg.tasks if cfg.holdout else ()
    with tqdm(total=len(space) * (1 + len(folds)), desc="tune", unit="cand", disable=not progress) as bar:

        def open_log(split: str, samples: list[eval_tasks.Sample], name: str) -> tuple[Search, dict[str, float]]:
            log = Search(runner, samples, cfg.work_dir / name, progress=bar.set_postfix_str, run=cfg.run)
            dense = log.dense_means(cfg.tasks, split)
            log.run_dense()
            return log, dense

        log, dense = open_log("calibration", samples, "records.jsonl")
        held = open_log("evaluation", evaluation, "holdout-records.jsonl")[0] if folds else None
        outcomes = search(space, lambda c: log.evaluate(c, cfg.target), cfg.target, on_resolved=bar.update)
        holdout = [hold_out(task, space, log, held, cfg.target, bar.update) for task in folds]
    return TuneResult(outcomes, choose(outcomes, cfg.target), pareto_front(outcomes), calibration, dense, holdout)


def _load(cfg: TuneConfig) -> tuple[torch.nn.Module, Any, Runner | None]:
    """(model, tokenizer, runner); no runner when the search runs nothing (`run=False`)."""
    import torch

    from .models import load_model

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.run:
        return model, tokenizer, None
    cache = cfg.cache_dir if cfg.cache_dir is not None else cfg.work_dir / "dense-cache"
    return model, tokenizer, Runner(model, tokenizer, f"{cfg.model}|{cfg.dtype}|{cfg.device}", cache)


def _space(cfg: TuneConfig, model: torch.nn.Module) -> list[Candidate]:
    """The candidates of `cfg.space` for this model, refused when none can prune or reach a speedup target."""
    prunable = adapter_for(model).prunable_layers()
    if prunable is not None and not prunable:
        raise ValueError(f"{cfg.model} has no layer that can prune (README, 'Models'): there is nothing to tune")
    space = candidates(cfg.space, ModelDims.of(model), max(cfg.lengths), prunable)
    if cfg.target.min_speedup is not None and not any(c.ideal >= cfg.target.min_speedup for c in space):
        raise ValueError(
            f"--target-speedup {cfg.target.min_speedup}: the fastest schedule of the search space "
            f"gives {space[-1].ideal:.2f}x ideal; lower the target or add lower --ratios / more --max-layers"
        )
    return space


def _check_log(cfg: TuneConfig, calibration: dict) -> None:
    """Refuse to resume a work dir whose records came from other calibration prompts or another model."""
    path = cfg.work_dir / "calibration.json"
    identity = {"model": cfg.model, "dtype": cfg.dtype, "device": cfg.device, **calibration}
    if path.exists() and json.loads(path.read_text()) != identity:
        raise ValueError(f"{cfg.work_dir} holds records of another calibration ({path}): use a new --work-dir")
    path.write_text(json.dumps(identity, indent=1))


# ------------------------------------------------------------------------------------------ output
def save_schedule(result: TuneResult, cfg: TuneConfig, num_layers: int, path: Path) -> Path:
    """The chosen schedule as a schedule file, with what it was chosen for and measured at."""
    o = result.chosen
    assert o is not None
    target = {k: v for k, v in asdict(cfg.target).items() if v is not None}
    return o.candidate.schedule.save(
        path,
        model=cfg.model,
        num_layers=num_layers,
        target=target,
        calibration=result.calibration,
        scores=o.tasks,
        ideal_speedup=o.ideal,
        preset={"keep": {str(k): v for k, v in o.candidate.fractions.items()}, "scorer": o.candidate.scorer},
    )


def write_log(result: TuneResult, cfg: TuneConfig, path: Path) -> Path:
    """Every candidate's outcome (evaluated or skipped, and why) as JSON."""
    data = {
        "target": asdict(cfg.target),
        "space": asdict(cfg.space),
        "calibration": result.calibration,
        "dense": result.dense,
        "chosen": result.chosen.to_dict() if result.chosen else None,
        "front": [o.candidate.name for o in result.front],
        "candidates": [o.to_dict() for o in result.outcomes],
    }
    path.write_text(json.dumps(data, indent=1))
    return path


def write_holdout(result: TuneResult, cfg: TuneConfig, path: Path) -> tuple[Path, Path]:
    """The leave-one-family-out folds as JSON at `path` and as a markdown table beside it (.md)."""
    data = {
        "note": HOLDOUT_NOTE,
        "target": asdict(cfg.target),
        "space": asdict(cfg.space),
        "calibration": result.calibration,
        "final_schedule": result.chosen.candidate.name if result.chosen else None,
        "rows": [h.to_dict() for h in result.holdout],
    }
    path.write_text(json.dumps(data, indent=1))
    md = path.with_suffix(".md")
    md.write_text(holdout_markdown(result.holdout, cfg) + "\n")
    return path, md


def describe_target(target: Target) -> str:
    """The target in words, for a table that must say what its rows were chosen for."""
    if target.max_loss is None:
        return f"ideal speedup >= {target.min_speedup:g}x"
    return f"relative loss <= {target.max_loss:.1%} ({'95% bound' if target.rule == 'bound' else 'mean'})"


def holdout_markdown(rows: list[Holdout], cfg: TuneConfig) -> str:
    """One line per held-out task: the schedule chosen without it and what it scores on it against dense."""
    lines = [
        f"Leave one family out: each schedule was chosen on the other tasks' calibration split for "
        f"{describe_target(cfg.target)}, then scored on the held-out task's evaluation split "
        f"(seed {cfg.eval_seed}, {cfg.eval_samples} samples per task and length). {HOLDOUT_NOTE}",
        "",
        "| held out | chosen on | schedule | ideal speedup | score | dense "
        "| rel. loss (95% bound) | n | meets target |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for h in rows:
        chosen_on = ", ".join(h.searched)
        s = h.scored.tasks.get(h.task) if h.scored is not None else None
        if s is None:
            why = "no candidate met the target" if h.chosen is None else f"{h.chosen.candidate.name}: not run"
            lines.append(f"| {h.task} | {chosen_on} | {why} | - | - | - | - | - | - |")
            continue
        meets_text = {True: "yes", False: "**no**", None: f"- ({h.scored.status})"}[h.meets_target]
        lines.append(
            f"| {h.task} | {chosen_on} | `{h.chosen.candidate.name}` | {h.scored.ideal:.2f}x | {s['score']:.3f} | "
            f"{s['dense']:.3f} | {s['loss'] + 0.0:.1%} ({s['loss_bound'] + 0.0:.1%}) | {s['n']} | {meets_text} |"
        )
    return "\n".join(lines)


def plot(result: TuneResult, path: Path, title: str) -> Path:
    """Score against ideal speedup, one panel per task: every complete candidate grey, the front in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(result.dense)
    fig, axes = plt.subplots(1, len(task_names), figsize=(4.6 * len(task_names), 4), squeeze=False)
    done = [o for o in result.outcomes if o.complete]
    for ax, task in zip(axes[0], task_names):
        ax.scatter(
            [o.ideal for o in done], [o.tasks[task]["score"] for o in done], color="0.7", s=18, label="candidates"
        )
        ax.plot(
            [o.ideal for o in result.front],
            [o.tasks[task]["score"] for o in result.front],
            "o-",
            color="C0",
            label="Pareto front",
        )
        if result.chosen is not None:
            ax.scatter(
                [result.chosen.ideal],
                [result.chosen.tasks[task]["score"]],
                s=140,
                facecolors="none",
                edgecolors="C3",
                linewidths=2,
                label="chosen",
                zorder=3,
            )
        ax.plot([1.0], [result.dense[task]], "k*", ms=12, label="dense")
        ax.set_xlabel("ideal prefill speedup (FLOP ratio)")
        ax.set_ylabel(f"{task} score (calibration)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def front_table(result: TuneResult):
    """The Pareto front as a rich table: per task, the score and its relative loss [95% bound]."""
    from rich.table import Table

    table = Table("schedule", "ideal", *result.dense, "status", title="Pareto front (calibration)")
    for o in result.front:
        cells = [
            f"{s['score']:.3f} loss {s['loss'] + 0.0:.1%} (bound {s['loss_bound'] + 0.0:.1%}) n={s['n']}"
            for s in (o.tasks[t] for t in result.dense)
        ]
        chosen = " [bold](chosen)[/bold]" if o is result.chosen else ""
        table.add_row(o.candidate.name, f"{o.ideal:.2f}x", *cells, o.status + chosen)
    return table
