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
FAMILY_STYLE = {"lazy": ("LazyLLM sweep", "C0", "o"), "static": ("static", "C1", "s"), "random": ("random", "C2", "^")}


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
        ratios = [dense_ttft[(r["task"], r["length"], r["index"])] / r["ttft_s"] for r in rows
                  if (r["task"], r["length"], r["index"]) in dense_ttft]
        out[task][method] = {
            "family": rows[0]["family"],
            "base": rows[0]["base"],
            "score": metrics.mean_ci([r["score"] for r in rows]).to_dict(),
            "dense_score": metrics.mean_ci([r["reference_score"] for r in rows]).to_dict(),
            "diff_vs_dense": metrics.paired_diff_ci([r["score"] for r in rows],
                                                    [r["reference_score"] for r in rows]).to_dict(),
            "agree": metrics.mean_ci([r["agree"] for r in rows]).to_dict(),
            "kl": statistics.fmean(r["kl"] for r in rows),
            "match": statistics.fmean(r["match"] for r in rows),
            "ttft_s": statistics.median(r["ttft_s"] for r in rows),
            "speedup": statistics.median(ratios) if ratios else None,
            "ideal_speedup": statistics.median(r["ideal_speedup"] for r in rows),
        }
    return dict(out)


def select_presets(summary: dict, tolerances: dict[str, float]) -> dict[str, dict]:
    """For each name, the fastest LazyLLM schedule whose mean score is within `tol` (relative) of dense
    on every task of PRESET_TASKS present in `summary`; speed is the measured TTFT speedup, averaged
    over those tasks."""
    tasks = [t for t in PRESET_TASKS if t in summary]
    schedules = {m for t in tasks for m, s in summary[t].items() if s["family"] == "lazy"}
    chosen: dict[str, dict] = {}
    for name, tol in tolerances.items():
        ok = [m for m in schedules
              if all(m in summary[t] and summary[t][m]["score"]["mean"]
                     >= (1 - tol) * summary[t][m]["dense_score"]["mean"] for t in tasks)]
        if not ok:
            chosen[name] = {"schedule": None, "tolerance": tol}
            continue
        speed = {m: statistics.fmean(summary[t][m]["speedup"] for t in tasks) for m in ok}
        best = max(ok, key=speed.get)
        chosen[name] = {
            "schedule": best, "tolerance": tol, "speedup": speed[best],
            "ideal_speedup": statistics.fmean(summary[t][best]["ideal_speedup"] for t in tasks),
            "scores": {t: summary[t][best]["score"] for t in tasks},
            "dense_scores": {t: summary[t][best]["dense_score"] for t in tasks},
        }
    return chosen


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def plot(summary: dict, out_dir: Path, title: str) -> list[Path]:
    """One PNG per task: score against measured TTFT speedup, a line per method family, dense as a star;
    bars are 95% CIs of each mean (not of the paired difference to dense, which is in the JSON)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task, methods in summary.items():
        keys = PLOT_METRICS.get(task, ("score",))
        fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for family, (label, color, marker) in FAMILY_STYLE.items():
                rows = sorted((s for s in methods.values() if s["family"] == family), key=lambda s: s["speedup"])
                if rows:
                    ax.errorbar([s["speedup"] for s in rows], [_value(s, key) for s in rows],
                                yerr=_errors(rows, key), marker=marker, color=color, label=label, capsize=3)
            if "dense" in methods:
                dense = methods["dense"]
                ax.errorbar([dense["speedup"]], [_value(dense, key)], yerr=_errors([dense], key), fmt="k*", ms=12,
                            capsize=3, label="dense")
            ax.set_xlabel("measured TTFT speedup over dense (median)")
            ax.set_ylabel(METRIC_LABELS[key] if key != "score" else f"{task} score")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{title}: {task}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{task}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _errors(rows: list[dict], key: str) -> list[list[float]] | None:
    """Asymmetric error bars from the 95% CIs (None for metrics reported without one)."""
    if not isinstance(rows[0][key], dict):
        return None
    return [[max(0.0, s[key]["mean"] - s[key]["ci95"][0]) for s in rows],  # max: float round-off at 0 and 1
            [max(0.0, s[key]["ci95"][1] - s[key]["mean"]) for s in rows]]


def _value(stats: dict, key: str) -> float:
    value = stats[key]
    return value["mean"] if isinstance(value, dict) else value


def markdown_table(summary: dict) -> str:
    """Per task and method: score ± CI half-width, n, paired diff to dense, fidelity, speedups."""
    lines = ["| task | method | score (95% CI) | n | diff vs dense (95% CI) | first-token agree | KL | "
             "speedup (measured) | speedup (ideal) |", "|---|---|---|---|---|---|---|---|---|"]
    for task, methods in summary.items():
        for name, s in methods.items():
            sc, d = s["score"], s["diff_vs_dense"]
            lines.append(
                f"| {task} | {name} | {sc['mean']:.3f} [{sc['ci95'][0]:.3f}, {sc['ci95'][1]:.3f}] | {sc['n']} | "
                f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {s['agree']['mean']:.2f} | "
                f"{s['kl']:.3f} | {s['speedup']:.2f}x | {s['ideal_speedup']:.2f}x |"
            )
    return "\n".join(lines)
