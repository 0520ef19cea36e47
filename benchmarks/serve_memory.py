"""A server's resident memory as its slots fill for the first time, with and without `LazyCache.reserve`.

The scheduler runs in-process (no HTTP) with the embedded model on the CPU: one request, then two at once (the
warm-up of serve_load.py), then rounds of four concurrent requests of the longest documents. Each mode runs in a
fresh process, so that one's heap does not hide the other's. Writes memory.{json,png} into --out:

    python benchmarks/serve_memory.py --out benchmarks/results/serve/memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import memory, trace

MODES = {"reserved": "the whole cache written when the engine is built (LazyCache.reserve)",
         "lazy": "reserve() skipped: pages become resident when first written"}


def measure(mode: str, args: argparse.Namespace) -> list[dict]:
    """RSS after each phase of `mode`, in this process."""
    import torch

    from lazyprefill.cache import LazyCache
    from lazyprefill.cli import load
    from lazyprefill.generation import SamplingParams
    from lazyprefill.serving import Scheduler, ServeConfig, ServeRequest

    torch.set_num_threads(args.threads)
    if mode == "lazy":
        LazyCache.reserve = lambda self: None
    lm, tokenizer = load(args.model, "cpu", "float32")[:2]
    scheduler = Scheduler(lm, tokenizer, ServeConfig(max_batch=args.max_batch, max_prompt_tokens=args.max_prompt_tokens,
                                                     max_new_tokens=args.new_tokens))
    docs = [doc for _, doc in trace(1.0, 60.0, args.seed, args.chars, args.chars)]
    readings = [{"phase": "model loaded", **memory(os.getpid())}]

    def run(batch: list[str], phase: str) -> None:
        done = [threading.Event() for _ in batch]
        for doc, event in zip(batch, done, strict=True):
            ids = tokenizer(doc + "\nQuestion: what does this code do?")["input_ids"][: args.max_prompt_tokens]
            scheduler.submit(ServeRequest(prompt=ids, max_new_tokens=args.new_tokens, sampling=SamplingParams(),
                                          schedule="", stop=(),
                                          emit=lambda e, event=event: event.set() if e.finish_reason else None))
        for event in done:
            event.wait()
        time.sleep(1)  # idle: the scheduler gives its free heap back
        readings.append({"phase": phase, **memory(os.getpid())})

    run(docs[:1], "one request")
    run(docs[1:3], "two at once (warm-up done)")
    for r in range(args.rounds):
        run(docs[3 + 4 * r: 7 + 4 * r], f"four at once, round {r + 1}")
    scheduler.close()
    return readings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--chars", type=int, default=7000, help="characters of each document")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--mode", choices=list(MODES), help="measure this mode here and print JSON (internal)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve/memory"))
    args = p.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args)))
        return
    runs = {}
    for mode in MODES:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True,
                             capture_output=True, text=True).stdout
        runs[mode] = json.loads(out.strip().splitlines()[-1])
        print(mode, [round(r["rss_mb"]) for r in runs[mode]])
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/serve_memory.py " + " ".join(sys.argv[1:])
    (args.out / "memory.json").write_text(json.dumps(
        {"kind": "serve-memory", "command": command, "config": {k: str(v) for k, v in vars(args).items()},
         "modes": MODES, "runs": runs}, indent=1))
    fig, ax = plt.subplots(figsize=(8, 4))
    for mode, readings in runs.items():
        ax.plot(range(len(readings)), [r["rss_mb"] for r in readings], marker="o", label=f"{mode}: {MODES[mode]}")
    ax.set_xticks(range(len(runs["lazy"])), [r["phase"] for r in runs["lazy"]], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("resident MB (idle after each phase)")
    ax.set_title(f"Server memory as slots fill ({args.model}, CPU, {args.max_batch} slots)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "memory.png", dpi=120)


if __name__ == "__main__":
    main()
