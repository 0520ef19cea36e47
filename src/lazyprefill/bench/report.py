"""A benchmark result as markdown tables and PNG plots; several chunks of one preset merged into one result."""

from __future__ import annotations

import json
from pathlib import Path


def merge(results: list[dict]) -> dict:
    """One result from several runs (chunks of one preset): models with the same name are joined."""
    merged = {"machine": results[0]["machine"], "protocol": results[0]["protocol"], "models": []}
    by_name: dict[str, dict] = {}
    for res in results:
        for entry in res["models"]:
            if entry["name"] in by_name:
                for key in ("ttft", "decode", "batch_ttft", "batch_decode"):
                    by_name[entry["name"]].setdefault(key, []).extend(entry.get(key, []))
            else:
                by_name[entry["name"]] = json.loads(json.dumps(entry))
                merged["models"].append(by_name[entry["name"]])
    for entry in merged["models"]:
        for key in ("ttft", "decode", "batch_ttft", "batch_decode"):
            entry.setdefault(key, []).sort(key=lambda r: (r["length"], r.get("batch", 1)))
    merged["runs"] = [r["machine"] for r in results]
    return merged


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    """The tables for the README: TTFT per length and method, then decoding."""
    m = result["machine"]
    where = m.get("gpu") or m.get("cpu", "CPU")
    lines = [f"Machine: {where}; torch {m['torch']}, transformers {m['transformers']}.", ""]
    for entry in result["models"]:
        dtype = entry["config"]["dtype"].removeprefix("torch.")
        weights = f"random {dtype} weights" if entry["random_weights"] else dtype
        if entry["ttft"]:
            lines += [f"### {entry['name']} ({weights}): time to first token", "",
                      "| prompt | method | TTFT ms | speedup | ideal | efficiency | peak GB | note |",
                      "|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in entry["ttft"]:
            lines.append(f"| {r['length']} | {r['method']} | {_fmt(r['ms'], '.1f')} | {_fmt(r['speedup'], '.2f')} | "
                         f"{r['ideal']:.2f} | {_fmt(r['efficiency'], '.2f')} | {_fmt(r['peak_gb'], '.1f')} | "
                         f"{r['note']} |")
        if entry["decode"]:
            lines += ["", f"### {entry['name']}: decoding, {entry['decode'][0]['new_tokens'] - 1} greedy steps", "",
                      "| prompt | method | ms/token | speedup | peak GB | note |", "|---:|---|---:|---:|---:|---|"]
            for r in entry["decode"]:
                lines.append(f"| {r['length']} | {r['method']} | {_fmt(r['ms_per_token'], '.2f')} | "
                             f"{_fmt(r['speedup'], '.2f')} | {_fmt(r['peak_gb'], '.1f')} | {r['note']} |")
        if entry.get("batch_ttft"):
            lines += [*batch_markdown(entry, weights)]
        lines.append("")
    return "\n".join(lines)


def batch_markdown(entry: dict, weights: str) -> list[str]:
    """One row per batch size and method: prefill (TTFT of the batch) beside decoding throughput."""
    prefill = {(r["batch"], r["method"]): r for r in entry["batch_ttft"]}
    decode = {(r["batch"], r["method"]): r for r in entry["batch_decode"]}
    n = entry["batch_ttft"][0]["length"]
    steps = entry["batch_decode"][0]["new_tokens"] - 1 if entry["batch_decode"] else 0
    lines = [f"### {entry['name']} ({weights}): batches of {n}-token prompts, {steps} decoding steps", "",
             ("| batch | method | TTFT ms | prefill tok/s | speedup | ideal | decode tok/s | decode speedup | "
              "peak GB | note |"), "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key in sorted(dict.fromkeys([*decode, *prefill]), key=lambda k: k[0]):  # stable: methods keep their order
        p, d = prefill.get(key, {}), decode.get(key, {})
        lines.append(f"| {key[0]} | {key[1]} | {_fmt(p.get('ms'), '.0f')} | "
                     f"{_fmt(p.get('prefill_tokens_per_s'), ',.0f')} | "
                     f"{_fmt(p.get('speedup'), '.2f')} | {_fmt(p.get('ideal'), '.2f')} | "
                     f"{_fmt(d.get('tokens_per_s'), '.1f')} | {_fmt(d.get('speedup'), '.2f')} | "
                     f"{_fmt(p.get('peak_gb', d.get('peak_gb')), '.1f')} | "
                     f"{' '.join(x for x in (p.get('note'), d.get('note')) if x)} |")
    return lines


def plot(result: dict, path: Path) -> None:
    """TTFT against prompt length, one line per method, one panel per model, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, entry in zip(axes[0], models):
        methods = dict.fromkeys(r["method"] for r in entry["ttft"])
        for method in methods:
            pts = [(r["length"], r["ms"]) for r in entry["ttft"] if r["method"] == method and r["ms"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(entry["name"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(result["machine"].get("gpu") or result["machine"].get("cpu", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_batch(result: dict, path: Path) -> None:
    """Prefill and decoding throughput against batch size, one line per method, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [e for e in result["models"] if e.get("batch_ttft")]
    methods = dict.fromkeys(r["method"] for e in models for r in [*e["batch_decode"], *e["batch_ttft"]])
    color = {method: f"C{i}" for i, method in enumerate(methods)}  # one colour per method in every panel
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False)
    for col, entry in enumerate(models):
        for row, (key, value, label) in enumerate([
            ("batch_ttft", "prefill_tokens_per_s", "prefill tokens/s"),
            ("batch_decode", "tokens_per_s", "decoding tokens/s"),
        ]):
            ax = axes[row][col]
            for method in dict.fromkeys(r["method"] for r in entry[key]):
                pts = [(r["batch"], r[value]) for r in entry[key] if r["method"] == method and r[value]]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, color=color[method])
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
            ax.set_title(f"{entry['name']}, {entry[key][0]['length']}-token prompts")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(result["machine"].get("gpu") or result["machine"].get("cpu", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["md"].write_text(markdown(result))
    if any(e.get("ttft") for e in result["models"]):
        plot(result, paths["png"])
    else:
        del paths["png"]
    if any(e.get("batch_ttft") for e in result["models"]):
        paths["batch_png"] = out_dir / f"{stem}-batch.png"
        plot_batch(result, paths["batch_png"])
    return paths
