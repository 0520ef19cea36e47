"""Summaries, preset selection, JSON and plots for an evaluation run."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from . import metrics

# Tasks whose score decides the presets; `fidelity` is agreement with dense, reported beside them.
PRESET_TASKS: tuple[str, ...] = ("code", "recall", "passkey")
PLOT_METRICS: dict[str, tuple[str, ...]] = {"fidelity": ("score", "agree", "kl")}
METRIC_LABELS = {
    "score": "score",
    "agree": "first token = dense",
    "kl": "KL(dense || method), first token (nats)",
}
BASELINE_STYLE = {"static": ("static", "0.45", "s"), "random": ("random", "0.7", "^")}
SPEED_AXES = {
    "speedup": "measured TTFT speedup over dense (median)",
    "ideal_speedup": "ideal prefill speedup (FLOP ratio)",
}


def summarize(records: list[dict]) -> dict:
    """{task: {method: stats}}: score mean/CI, paired difference to dense, fidelity, speedups.

    Measured speedup is the median over samples of dense TTFT / method TTFT on the same sample, with
    dense re-run beside the method, so slow periods of a shared machine hit both sides.
    """
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        by[(r["task"], r["method"])].append(r)
    dense_ttft = {(r["task"], r["length"], r["index"]): r["ttft_s"] for r in records if r["method"] == "dense"}
    out: dict[str, dict] = defaultdict(dict)
    for (task, method), rows in by.items():
        rows = sorted(rows, key=lambda r: (r["length"], r["index"]))
        ratios = [
            dense_ttft[(r["task"], r["length"], r["index"])] / r["ttft_s"]
            for r in rows
            if (r["task"], r["length"], r["index"]) in dense_ttft
        ]
        out[task][method] = {
            "family": rows[0]["family"],
            "base": rows[0]["base"],
            "scorer": rows[0].get("scorer", ""),
            "score": metrics.mean_ci([r["score"] for r in rows]).to_dict(),
            "dense_score": metrics.mean_ci([r["reference_score"] for r in rows]).to_dict(),
            "diff_vs_dense": metrics.paired_diff_ci(
                [r["score"] for r in rows], [r["reference_score"] for r in rows]
            ).to_dict(),
            "loss_bound": loss_bound(rows),
            "agree": metrics.mean_ci([r["agree"] for r in rows]).to_dict(),
            "kl": statistics.fmean(r["kl"] for r in rows),
            "match": statistics.fmean(r["match"] for r in rows),
            "ttft_s": statistics.median(r["ttft_s"] for r in rows),
            "speedup": statistics.median(ratios) if ratios else None,
            "ideal_speedup": statistics.median(r["ideal_speedup"] for r in rows),
        }
    return dict(out)


def loss_bound(rows: list[dict]) -> float | None:
    """The 95% upper bound of the relative loss to dense on these samples (-lower bound of the paired
    difference / dense mean): a preset "within x%" promises this is at most x. None when dense scores 0."""
    dense = sum(r["reference_score"] for r in rows) / len(rows)
    diff = metrics.paired_diff_ci([r["score"] for r in rows], [r["reference_score"] for r in rows])
    return -diff.lo / dense if dense > 0 else None


def select_presets(summary: dict, tolerances: dict[str, float]) -> dict[str, dict]:
    """For each name, the fastest LazyLLM schedule whose relative loss to dense is within `tol` on every
    task of PRESET_TASKS present in `summary`, counting the loss at its 95% bound (MEASURE.md); speed
    is the ideal speedup (the measured one is noisy on a shared CPU), averaged over those tasks."""
    tasks = [t for t in PRESET_TASKS if t in summary]
    schedules = {m for t in tasks for m, s in summary[t].items() if s["family"] == "lazy"}
    chosen: dict[str, dict] = {}
    for name, tol in tolerances.items():
        ok = [
            m
            for m in schedules
            if all(
                m in summary[t] and summary[t][m].get("loss_bound") is not None and summary[t][m]["loss_bound"] <= tol
                for t in tasks
            )
        ]
        if not ok:
            chosen[name] = {"schedule": None, "tolerance": tol}
            continue
        speed = {m: statistics.fmean(summary[t][m]["ideal_speedup"] for t in tasks) for m in ok}
        best = max(ok, key=speed.get)
        chosen[name] = {
            "schedule": best,
            "tolerance": tol,
            "ideal_speedup": speed[best],
            "speedup": statistics.fmean(summary[t][best]["speedup"] for t in tasks),
            "scores": {t: summary[t][best]["score"] for t in tasks},
            "dense_scores": {t: summary[t][best]["dense_score"] for t in tasks},
            "loss_bounds": {t: summary[t][best]["loss_bound"] for t in tasks},
        }
    return chosen


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def plot(summary: dict, out_dir: Path, title: str) -> list[Path]:
    """One PNG per task: score against measured TTFT speedup and against ideal speedup, a line per scorer
    and per baseline, dense as a star; bars are 95% CIs of each mean (the paired differences to dense,
    tighter, are in the JSON). `fidelity` adds first-token agreement and KL against measured speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task, methods in summary.items():
        panels = [("score", axis) for axis in SPEED_AXES] + [
            (k, "speedup") for k in PLOT_METRICS.get(task, ()) if k != "score"
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
        for ax, (key, axis) in zip(axes[0], panels):
            for label, rows, style in _lines(methods):
                rows = sorted(rows, key=lambda s: s[axis])
                ax.errorbar(
                    [s[axis] for s in rows],
                    [_value(s, key) for s in rows],
                    yerr=_errors(rows, key),
                    label=label,
                    capsize=3,
                    **style,
                )
            if "dense" in methods:
                dense = methods["dense"]
                ax.errorbar(
                    [dense[axis]],
                    [_value(dense, key)],
                    yerr=_errors([dense], key),
                    fmt="k*",
                    ms=12,
                    capsize=3,
                    label="dense",
                )
            ax.set_xlabel(SPEED_AXES[axis])
            ax.set_ylabel(METRIC_LABELS[key] if key != "score" else f"{task} score")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{title}: {task}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _lines(methods: dict) -> list[tuple[str, list[dict], dict]]:
    """(label, stats, matplotlib style) per LazyLLM scorer (records before scorers: one "LazyLLM" line),
    then static and random."""
    lazy: dict[str, list[dict]] = defaultdict(list)
    for s in methods.values():
        if s["family"] == "lazy":
            lazy[s.get("scorer") or "last"].append(s)
    out = [
        (f"LazyLLM {scorer}", rows, {"marker": "o", "color": f"C{i}"}) for i, (scorer, rows) in enumerate(lazy.items())
    ]
    for family, (label, color, marker) in BASELINE_STYLE.items():
        rows = [s for s in methods.values() if s["family"] == family]
        if rows:
            out.append((label, rows, {"marker": marker, "color": color, "linestyle": "--"}))
    return out


def _errors(rows: list[dict], key: str) -> list[list[float]] | None:
    """Asymmetric error bars from the 95% CIs (None for metrics reported without one)."""
    if not isinstance(rows[0][key], dict):
        return None
    return [
        [max(0.0, s[key]["mean"] - s[key]["ci95"][0]) for s in rows],  # max: float round-off at 0 and 1
        [max(0.0, s[key]["ci95"][1] - s[key]["mean"]) for s in rows],
    ]


def _value(stats: dict, key: str) -> float:
    value = stats[key]
    return value["mean"] if isinstance(value, dict) else value


def markdown_table(summary: dict) -> str:
    """Per task and method: score ± CI half-width, n, paired diff to dense, fidelity, speedups."""
    header = (
        "| task | method | score (95% CI) | n | diff vs dense (95% CI) | rel. loss (95% bound) | first-token agree | "
        "KL | speedup (measured) | speedup (ideal) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for task, methods in summary.items():
        for name, s in methods.items():
            sc, d = s["score"], s["diff_vs_dense"]
            lines.append(
                f"| {task} | {name} | {sc['mean']:.3f} [{sc['ci95'][0]:.3f}, {sc['ci95'][1]:.3f}] | {sc['n']} | "
                f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {_percent(s.get('loss_bound'))} | "
                f"{s['agree']['mean']:.2f} | "
                f"{s['kl']:.3f} | {s['speedup']:.2f}x | {s['ideal_speedup']:.2f}x |"
            )
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
