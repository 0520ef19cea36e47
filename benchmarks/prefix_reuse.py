"""TTFT of a follow-up question over a document already prefilled (LazyLLM.session) against a fresh request.

Issue 25's target 2: a question over a held document answers in a fraction of a fresh request's time to first
token. For each document length and schedule: the fresh request (document + question through `generate`) and the
follow-up (`session.generate(question)` after `LazyLLM.session(document)`), each the median of `--repeats` runs
after a warm-up, with a different question each run, each a token longer than the one before. Token values do not
change the work at fixed keep ratios, so the document and questions are seeded random ids.

    PYTHONPATH=src python3 benchmarks/prefix_reuse.py --model smollm2 --device cpu --dtype float32 --threads 1 \\
        --lengths 2048 --schedules dense,balanced --out benchmarks/results/serve
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

import lazyprefill as lp
from lazyprefill.bench import load_bench_model, machine_info
from lazyprefill.env import DTYPES
from lazyprefill.schedule import split_list


def measure(model: torch.nn.Module, schedule: str, n: int, args: argparse.Namespace) -> dict:
    """Median fresh and follow-up TTFT (s) for an n-token document under `schedule`."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(n)
    document = torch.randint(vocab, (n,), generator=gen)
    # each question a token longer than the last, so that every run meets a length the process has not (a user's
    # next question does; on a GPU a new length can cost a kernel build, benchmarks/NOTES.md "Twelfth GPU session")
    questions = [torch.randint(vocab, (args.question_tokens + i,), generator=gen) for i in range(args.repeats + 1)]
    lazy = lp.LazyLLM(model, schedule)
    fresh = [lazy.generate(torch.cat([document, q]), max_new_tokens=1).ttft_s for q in questions]
    lazy.release()
    session = lazy.session(document, room=args.question_tokens + args.repeats + 1)
    answers = [session.generate(q, max_new_tokens=1) for q in questions]
    follow = [a.ttft_s for a in answers]
    return {
        "schedule": schedule, "document_tokens": n, "question_tokens": [len(q) for q in questions],
        "fresh_ttft_s": statistics.median(fresh[1:]), "follow_up_ttft_s": statistics.median(follow[1:]),
        "session_prefill_s": session.prefill_s, "runs": {"fresh": fresh, "follow_up": follow},
        "follow_up_revived": [sum(a.stats.steps[0].revived) for a in answers],  # deferred tokens each brought back
    }


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Fresh and follow-up TTFT per document length and schedule, the follow-up's share written over its bar."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(rows), 3.6))
    for i, r in enumerate(rows):
        ax.bar(i - 0.2, r["fresh_ttft_s"], 0.4, color="0.6", label="fresh request" if i == 0 else None)
        ax.bar(i + 0.2, r["follow_up_ttft_s"], 0.4, color="tab:blue", label="follow-up (session)" if i == 0 else None)
        share = r["follow_up_ttft_s"] / r["fresh_ttft_s"]
        ax.text(i + 0.2, r["follow_up_ttft_s"], f"{share:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [f"{r['schedule']}\n{r['document_tokens']} tok" for r in rows], fontsize=8)
    ax.set_ylabel("TTFT (s, median)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="a shape (llama3-8b: random weights), smollm2, or a path")
    p.add_argument("--lengths", default="2048", help="document lengths in tokens, comma-separated")
    p.add_argument("--question-tokens", type=int, default=32)
    p.add_argument("--schedules", default="dense,balanced")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    p.add_argument("--stem", default="prefix-reuse")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_bench_model(args.model, args.device, DTYPES[args.dtype])
    lengths, schedules = [int(x) for x in args.lengths.split(",")], split_list(args.schedules)
    result = {"command": " ".join(sys.argv), "machine": machine_info(model.device), "model": args.model,
              "dtype": args.dtype, "rows": []}
    args.out.mkdir(parents=True, exist_ok=True)
    for n in lengths:
        for schedule in tqdm(schedules, desc=f"{n} tokens"):
            result["rows"].append(measure(model, schedule, n, args))
            (args.out / f"{args.stem}.json").write_text(json.dumps(result, indent=1))
    plot(result["rows"], args.out / f"{args.stem}.png", f"lazyprefill sessions: {args.model}, {args.device}")
    for r in result["rows"]:
        print(f"{r['schedule']:>10} {r['document_tokens']:>7} tok: fresh {r['fresh_ttft_s'] * 1e3:8.1f} ms, "
              f"follow-up {r['follow_up_ttft_s'] * 1e3:7.1f} ms ({r['follow_up_ttft_s'] / r['fresh_ttft_s']:.1%})")


if __name__ == "__main__":
    main()
