"""Revivals with real weights (CPU): rows revived per decoding step on the evaluation prompts, beside a
random-weight twin of the same model (same config, seeded init) on the same prompts.

Random weights redraw the top tokens at every step, the worst case for revivals, and the GPU benchmark
(`answers.py`) runs only random weights: this says how far real weights are from that. Greedy, EOS off, every
schedule preset; the prompts are `lazyprefill.eval.tasks`' (recall and passkey by default).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/revivals.py --model smollm2      # about 15 min on one busy core
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/revivals.py --model gemma3-270m --lengths 1024,2048
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from lazyprefill import answers
from lazyprefill.bench import machine_info
from lazyprefill.eval.tasks import build
from lazyprefill.generation import LazyLLM
from lazyprefill.models import load_model
from lazyprefill.schedule import PRESETS


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in _names(text)]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a real model lazyprefill.models.load_model knows")
    p.add_argument("--tasks", type=_names, default=["recall", "passkey"])
    p.add_argument("--lengths", type=_ints, default=[512, 1024])
    p.add_argument("--samples", type=int, default=4, help="prompts per task and length")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--methods", type=_names, default=list(PRESETS), help="schedules (default: every preset)")
    p.add_argument("--no-twin", action="store_true", help="skip the random-weight twin")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--stem", help="output file name without extension (default: revivals-<model>)")
    p.add_argument("--summarize", type=Path, metavar="JSON",
                   help="summarize a finished run's records again (table, plot) instead of measuring")
    return p.parse_args(argv)


def random_twin(model: nn.Module, seed: int) -> nn.Module:
    """The same architecture and config with transformers' own seeded random init."""
    torch.manual_seed(seed)
    return type(model)(model.config).eval()


def summarize(records: list[dict]) -> list[dict]:
    """Per (weights, length, method): revived rows per step (mean, max, mean curve over prompts) and shares."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["weights"], r["length"], r["method"]), []).append(r)
    rows = []
    for (weights, length, method), rs in groups.items():
        steps = [r["revived_per_step"] for r in rs]
        deferred = sum(r["prompt_deferred"] for r in rs)
        rows.append({
            "weights": weights, "length": length, "method": method, "prompts": len(rs),
            "revived_mean": statistics.fmean(x for s in steps for x in s),
            "revived_max": max(x for s in steps for x in s),
            "curve": [statistics.fmean(col) for col in zip(*steps)],  # mean over prompts, per decoding step
            "prompt_share_deferred": deferred / sum(r["prompt_tokens"] for r in rs),
            "prompt_share_revived": sum(r["prompt_revived"] for r in rs) / sum(r["prompt_tokens"] for r in rs),
            "deferred_share_revived": sum(r["prompt_revived"] for r in rs) / deferred if deferred else None,
        })
    return rows


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [(f"Revivals on {cfg['model']} (CPU, greedy, EOS off, {cfg['new_tokens']} new tokens, tasks "
              f"{', '.join(cfg['tasks'])}, {cfg['samples']} prompts per task and length). Rows revived per decoding "
              "step are summed over layers; shares are of prompt tokens."), "",
             ("| weights | prompt | method | prompts | revived rows/step mean | max | prompt deferred | "
              "prompt revived | deferred revived |"),
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        share = "—" if r["deferred_share_revived"] is None else f"{r['deferred_share_revived']:.1%}"
        lines.append(f"| {r['weights']} | {r['length']} | {r['method']} | {r['prompts']} | {r['revived_mean']:.1f} | "
                     f"{r['revived_max']} | {r['prompt_share_deferred']:.1%} | {r['prompt_share_revived']:.1%} | "
                     f"{share} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    """Revived rows per decoding step (mean over prompts), one panel per prompt length; dashed: random twin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in result["summary"]})
    methods = list(dict.fromkeys(r["method"] for r in result["summary"]))
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for r in (r for r in result["summary"] if r["length"] == length):
            ax.plot(range(1, len(r["curve"]) + 1), r["curve"], color=f"C{methods.index(r['method'])}",
                    linestyle="-" if r["weights"] == "real" else "--", label=f"{r['method']} ({r['weights']})")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("decoding step")
        ax.set_ylabel("revived rows (sum over layers)")
        ax.set_title(f"{result['config']['model']}, {length}-token prompts")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out: Path, stem: str) -> None:
    result["summary"] = summarize(result["records"])
    answers.write_json(result, out, stem)
    (out / f"{stem}.md").write_text(markdown(result))
    plot(result, out / f"{stem}.png")
    print(markdown(result))


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.summarize:
        result = json.loads(args.summarize.read_text())
        write(result, args.out, args.stem or args.summarize.stem)
        return result
    stem = args.stem or f"revivals-{args.model}"
    model, tokenizer = load_model(args.model)
    models = {"real": model} | ({} if args.no_twin else {"random": random_twin(model, args.seed)})
    samples = [
        s for n in args.lengths for task in args.tasks for s in build(task, tokenizer, n, args.samples, args.seed)
    ]
    result = {"kind": "revivals", "machine": machine_info(torch.device("cpu")),
              "command": shlex.join(["python", "benchmarks/revivals.py", *(sys.argv[1:] if argv is None else argv)]),
              "config": vars(args) | {"out": str(args.out)}, "records": [], "summary": []}
    lazies = {(w, m): LazyLLM(net, m) for w, net in models.items() for m in args.methods}
    for sample in tqdm(samples, desc=f"revivals {args.model}"):
        for (weights, method), lazy in lazies.items():
            out = lazy.generate(sample.prompt_ids, args.new_tokens, eos_token_id=[])
            record = answers.revivals(out.stats, len(sample.prompt_ids))
            result["records"].append({"weights": weights, "method": method, "task": sample.task,
                                      "sample": sample.index, "length": sample.length, **record})
        result["summary"] = summarize(result["records"])
        answers.write_json(result, args.out, stem)
    write(result, args.out, stem)
    return result


if __name__ == "__main__":
    main()
