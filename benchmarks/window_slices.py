"""Dense TTFT of a sliding-window model with its windowed layers in one masked attention call against in slices
(attention.WINDOW_ROWS), and the largest difference of their first-token logits.

    PYTHONPATH=src python3 benchmarks/window_slices.py --model gemma3-270m --lengths 4096 --threads 1 \\
        --out benchmarks/results/long/window-slices-gemma3-cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

import lazyprefill as lp
from lazyprefill import attention
from lazyprefill.bench import machine_info
from lazyprefill.models import load_model

ONE_CALL = 1 << 40  # rows per call: every row in one call, as before the slices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--lengths", default="4096")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, device=args.device)
    sliced = attention.WINDOW_ROWS
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(n))
        ttft: dict[str, list[float]] = {"one call": [], "slices": []}
        logits = {}
        for _ in range(args.repeats):  # interleaved, so that load on the machine hits both alike
            for name, per_call in (("one call", ONE_CALL), ("slices", sliced)):
                attention.WINDOW_ROWS = per_call
                out = lp.LazyLLM(model, None).generate(ids, max_new_tokens=1, return_logits=True)
                ttft[name].append(out.ttft_s)
                logits[name] = out.logits[0]
        attention.WINDOW_ROWS = sliced
        rows.append({"tokens": n, "ttft_s": ttft, "median_s": {k: statistics.median(v) for k, v in ttft.items()},
                     "max_abs_logit_diff": (logits["one call"] - logits["slices"]).abs().max().item()})
        print(rows[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "model": args.model, "rows_per_call": sliced,
                                    "machine": machine_info(model.device), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
