"""TTFT and peak memory on long prompts, for schedules given as specs, against transformers SDPA prefill.

Issue 24's measurement: dense, the default and the long-prompt preset (or any candidate schedule, e.g. with
block-sparse attention, `paper+sparse(top=0.05)`) at 8K-128K, one process, MEASURE.md's protocol (bench_ttft:
interleaved rounds, CUDA events, median), and beside it each method at three lengths just under each length that no
method has met (bench_ttft's `new_length`; `--no-new-length` skips them), as a user's next prompt would be: what a
kernel builds or compiles per length is in those and not in the rounds. Lengths run longest last, so a run that hits
the time limit keeps the shorter ones (each length is written once its rounds are done, and again with its
new-length runs).

    PYTHONPATH=src python3 benchmarks/long_prompts.py --model llama3-8b --lengths 8192,32768 \\
        --schedules 'dense,balanced,paper,long' --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tqdm import tqdm

from lazyprefill.adapters import adapter_for
from lazyprefill.bench import BenchConfig, bench_ttft, load_bench_model, machine_info
from lazyprefill.env import DTYPES
from lazyprefill.schedule import parse_schedule, split_list


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--lengths", default="8192,32768,65536,131072")
    p.add_argument("--schedules", default="dense,balanced,paper", help="schedule specs, comma-separated")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/long"))
    p.add_argument("--stem", default="long-prompts")
    p.add_argument("--new-length", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each method at lengths it has not met (off: a short lease keeps the rounds)")
    args = p.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    cfg = BenchConfig(lengths={args.model: lengths}, repeats=args.repeats, warmup=args.warmup, device=args.device,
                      dtype=args.dtype)
    model = load_bench_model(args.model, args.device, DTYPES[args.dtype], cfg.seed)
    a = adapter_for(model)
    names = split_list(args.schedules)
    schedules = {name: parse_schedule(name, a.num_layers, a.prunable_layers(), a.presets) for name in names}
    result = {"command": " ".join(sys.argv), "machine": machine_info(model.device), "model": args.model,
              "protocol": {"repeats": cfg.repeats, "warmup": cfg.warmup, "dtype": args.dtype},
              "schedules": {name: s.describe() for name, s in schedules.items()}, "ttft": []}
    args.out.mkdir(parents=True, exist_ok=True)
    steps = (1 + args.new_length) * (len(names) + 1) + cfg.repeats  # per length: warm-ups, rounds, new lengths

    def timed(rows: list[dict]) -> None:  # a length's rounds, kept if the lease ends during its new-length runs
        write({**result, "ttft": result["ttft"] + rows}, args.out, args.stem)

    with tqdm(total=len(lengths) * steps, desc="long prompts") as bar:
        def progress(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update(1)

        for n in lengths:
            result["ttft"] += bench_ttft(model, n, cfg, progress, schedules=schedules, new_length=args.new_length,
                                         timed=timed)
            write(result, args.out, args.stem)
    print(table(result))


def write(result: dict, out: Path, stem: str) -> None:
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(f"`{result['command']}`\n\n{result['machine'].get('gpu', '')}\n\n{table(result)}\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in result["schedules"]:
        rows = [r for r in result["ttft"] if r["method"] == method and r["speedup"]]
        ax.plot([r["length"] for r in rows], [r["speedup"] for r in rows], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT speedup over transformers SDPA")
    ax.set_title(f"{result['model']} (random bf16), {result['machine'].get('gpu', '')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)


def table(result: dict) -> str:
    """TTFT after warm-ups at the length, and once at a length the process had not met (bench_ttft's new_length)."""
    lines = ["| prompt | method | TTFT ms | speedup | ideal | peak GB | at a new length: ms | speedup |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["ttft"]:
        ms = f"{r['ms']:.1f}" if r["ms"] else r["note"]
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        peak = f"{r['peak_gb']:.1f}" if r.get("peak_gb") else "-"
        fresh = f"{r['new_length_ms']:.1f}" if r.get("new_length_ms") else "-"
        fresh_speed = f"{r['new_length_speedup']:.2f}x" if r.get("new_length_speedup") else "-"
        lines.append(f"| {r['length']} | {r['method']} | {ms} | {speed} | {r['ideal']:.2f}x | {peak} | {fresh} | "
                     f"{fresh_speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
