"""Accuracy of LazyLLM against the dense model and the static/random baselines, on offline tasks.

`evaluate` builds the samples, runs every method, and writes under `out_dir`: `records.jsonl` (every sample's
record, as it is made), `eval.json` (the config, the summary with 95% CIs and the chosen presets), `eval.md` (the
table) and one PNG per task. The records live only in records.jsonl, whose complete samples (`complete_records`) are
the ones the summary counts: a copy in eval.json doubled what every committed run and every GPU call carries.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import report, tasks
from .runner import Method, Runner, make_methods

__all__ = [
    "EvalConfig", "evaluate", "write_report", "report_from_log", "complete_records", "sample_key", "Method",
    "ResumeMismatch", "Runner", "make_methods",
]


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. `schedules` may hold "presets" and "sweep" (see runner.SWEEP)."""

    model: str = "smollm2"
    tasks: tuple[str, ...] = ("code", "recall", "passkey")
    samples: int = 5
    lengths: tuple[int, ...] = (512,)
    schedules: tuple[str, ...] = ("presets",)
    baselines: tuple[str, ...] | None = None  # schedules that also get static and random; None: all
    split: str = "evaluation"  # tasks.SPLITS: presets are chosen on "calibration" and reported on "evaluation"
    seed: int | None = None  # builds the samples; None: the split's seed
    out_dir: Path = Path("results/eval")
    cache_dir: Path | None = None
    device: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None  # torch CPU threads; 1 is steadier on a machine shared with other work
    resume: bool = False  # keep the complete samples of an earlier run of this evaluation in out_dir
    tolerances: dict[str, float] = field(default_factory=lambda: {"balanced": 0.01, "fast": 0.05})

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in tasks.TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; tasks: {', '.join(tasks.TASKS)}")
        if self.samples < 1:
            raise ValueError(f"samples must be at least 1, got {self.samples}")
        if not self.lengths:
            raise ValueError("give at least one prompt length (--lengths 512,1024)")
        if self.split not in tasks.SPLITS:
            raise ValueError(f"unknown split {self.split!r}; splits: {', '.join(tasks.SPLITS)}")

    @property
    def sample_seed(self) -> int:
        return tasks.SPLITS[self.split] if self.seed is None else self.seed


def evaluate(cfg: EvalConfig, progress: bool = True) -> dict:
    """Run the evaluation `cfg` describes and write its report; returns the JSON-ready result.

    Records stream to `out_dir/records.jsonl` as they are made, so `write_report` can rebuild the
    report from a run that was stopped early, and `resume` can run only the samples it did not finish
    (or more samples than it asked for).
    """
    import torch

    from ..env import machine_info
    from ..models import load_model

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    cache_dir = cfg.cache_dir if cfg.cache_dir is not None else cfg.out_dir / "dense-cache"
    runner = Runner(model, tokenizer, f"{cfg.model}|{cfg.dtype}|{cfg.device}", cache_dir)
    methods = make_methods(cfg.schedules, runner.num_layers, cfg.baselines, runner.prunable, runner.presets)
    samples = tasks.build_all(cfg.tasks, tokenizer, cfg.lengths, cfg.samples, cfg.sample_seed)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model": cfg.model,
        "tasks": list(cfg.tasks),
        "samples": cfg.samples,
        "lengths": list(cfg.lengths),
        "split": cfg.split,
        "seed": cfg.sample_seed,
        "device": cfg.device,
        "dtype": cfg.dtype,
        "threads": torch.get_num_threads(),
        "num_layers": runner.num_layers,
        "methods": [vars(m) for m in methods],
        "schedules": {m.name: runner.schedule(m.schedule).describe() for m in methods if m.family != "dense"},
        "machine": machine_info(model.device),
    }
    kept = _resumable(cfg.out_dir, config, samples) if cfg.resume else []
    done = {sample_key(r) for r in kept}
    (cfg.out_dir / "config.json").write_text(json.dumps(config, indent=1))
    started = time.time()
    with open(cfg.out_dir / "records.jsonl", "w") as log:
        log.writelines(json.dumps(r) + "\n" for r in kept)
        records = kept + runner.run(
            [s for s in samples if (s.task, s.length, s.index) not in done], methods, progress=progress,
            on_record=lambda r: (log.write(json.dumps(r) + "\n"), log.flush()),
        )
    config["wall_s"] = time.time() - started
    config["resumed_samples"] = len(done)
    return write_report(config, records, cfg.out_dir, cfg.tolerances)


def write_report(config: dict, records: list[dict], out_dir: Path, tolerances: dict[str, float]) -> dict:
    """eval.json (config, summary, chosen presets), eval.md and one PNG per task; returns them with the records."""
    summary = report.summarize(records)
    result = {"config": config, "summary": summary, "presets": report.select_presets(summary, tolerances)}
    report.write_json(result, out_dir / "eval.json")
    (out_dir / "eval.md").write_text(report.markdown_table(summary) + "\n")
    lengths = "/".join(map(str, sorted({r["length"] for r in records})))
    report.plot(summary, out_dir, f"{config['model']}, {lengths} tokens, {config['device']}")
    return result | {"records": records}


def report_from_log(out_dir: Path, tolerances: dict[str, float] | None = None) -> dict:
    """Rebuild the report from `out_dir`'s config.json and records.jsonl (a run stopped early, say)."""
    config = json.loads((out_dir / "config.json").read_text())
    records = complete_records(out_dir, len(config["methods"]))
    config["complete_samples"] = len({sample_key(r) for r in records})
    return write_report(config, records, out_dir, tolerances or EvalConfig().tolerances)


class ResumeMismatch(ValueError):
    """`resume` found records of another evaluation in out_dir."""


# What must match for an earlier run's records to count in this one (more samples may be asked for). `schedules` is
# what each method's spec runs, which changes when a preset it names does; a key an older run did not record is not
# compared.
_IDENTITY = ("model", "tasks", "lengths", "split", "seed", "device", "dtype", "num_layers", "methods", "schedules")


def sample_key(record: dict) -> tuple:
    """Which sample a record is of: (task, length, index)."""
    return record["task"], record["length"], record["index"]


def complete_records(out_dir: Path, n_methods: int) -> list[dict]:
    """The records in out_dir/records.jsonl of the samples that every method finished."""
    lines = (out_dir / "records.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    counts = Counter(sample_key(r) for r in records)
    return [r for r in records if counts[sample_key(r)] == n_methods]


def _resumable(out_dir: Path, config: dict, samples: list[tasks.Sample]) -> list[dict]:
    """The earlier run's records of complete samples that this run also has; none if out_dir holds no run."""
    if not (out_dir / "config.json").is_file() or not (out_dir / "records.jsonl").is_file():
        return []
    before = json.loads((out_dir / "config.json").read_text())
    differ = [k for k in _IDENTITY if before.get(k, config[k]) != config[k]]
    if differ:
        raise ResumeMismatch(
            f"{out_dir} holds an evaluation with another {', '.join(differ)}: resume it with the same options and "
            "presets, or use a new --out"
        )
    wanted = {(s.task, s.length, s.index) for s in samples}
    return [r for r in complete_records(out_dir, len(config["methods"])) if sample_key(r) in wanted]
