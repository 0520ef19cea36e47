"""A lone request's TTFT through the server's scheduler against the same prompt's prefill by `LazyLLM.generate`, per
schedule: does serving cost a pruned prefill what it does not cost a dense one? (benchmarks/NOTES.md, "Eleventh GPU
session": under load on an H100, `balanced` gained 1.0-1.1x over dense below about 10K tokens, where the engine alone
gains 1.22x at 8K.)

In one process, with no HTTP: for each schedule a `Scheduler` like `lazyprefill serve`'s, and each request submitted
only once the one before it has finished, so that it is alone; its TTFT runs from the request's submission to its
first token, as the server's does. Every request has a length the process has not met (the length asked + 1 + 37 i),
as a server's requests have, and then the same prompt goes through `LazyLLM.generate` (TTFT: ids on the device to
the first token), which meets that length a second time: where the two differ by tens of milliseconds, something is
built per length (SDPA's cuDNN graphs were: attention.CAUSAL_ROWS_STEP). Both take the median of --repeats prompts
after a warm-up. Writes JSON and a markdown table.

    PYTHONPATH=src python3 benchmarks/serve_probe.py --shape llama3-8b --device cuda --dtype bfloat16 \\
        --lengths 8192,16384 --schedules dense,balanced --out /root/keep/serve-probe
    PYTHONPATH=src python3 benchmarks/serve_probe.py --shape tiny --lengths 512 --repeats 2 --out /tmp/probe  # CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from pathlib import Path

import torch
from tqdm import tqdm

import lazyprefill as lp
from lazyprefill.bench import random_model
from lazyprefill.bench.config import SHAPES
from lazyprefill.engine import DecodeOptions
from lazyprefill.env import DTYPES, machine_info
from lazyprefill.generation import SamplingParams
from lazyprefill.schedule import split_list
from lazyprefill.serving import Event, Scheduler, ServeConfig, ServeRequest


class NoText:
    """The scheduler's tokenizer: the probe reads token ids and times, never text (random weights)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return ""


def served(scheduler: Scheduler, ids: list[int]) -> float:
    """One request alone through the scheduler -> its TTFT (submission to first token), in seconds."""
    done = threading.Event()

    def emit(event: Event) -> None:
        if event.finish_reason is not None:
            done.set()

    request = ServeRequest(ids, 2, SamplingParams(), "", (), emit)
    scheduler.submit(request)
    done.wait()
    if request.first_token_s is None:
        raise RuntimeError(f"the request ended without a token ({len(ids)} tokens)")
    return request.first_token_s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--lengths", default="8192,16384")
    p.add_argument("--schedules", default="dense,balanced")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    lengths = [int(n) for n in split_list(args.lengths)]
    model = random_model(args.shape, args.device, DTYPES[args.dtype])
    vocab = model.config.vocab_size
    prompts = {n: [torch.randint(0, vocab, (n + 1 + 37 * i,), generator=torch.Generator().manual_seed(i)).tolist()
                   for i in range(args.repeats + 1)] for n in lengths}  # [0]: the warm-up
    config = {"max_batch": 4, "max_prompt_tokens": max(len(p) for ps in prompts.values() for p in ps),
              "max_new_tokens": 2, "min_reuse_tokens": 0}
    rows = []
    for spec in split_list(args.schedules):
        scheduler = Scheduler(model, NoText(), ServeConfig(schedule=spec, **config), DecodeOptions(), eos=set())
        lazy = lp.LazyLLM(model, None if spec == "dense" else spec)
        try:
            for n in tqdm(lengths, desc=spec):
                times: dict[str, list[float]] = {"served_ms": [], "generate_ms": []}
                for i, ids in enumerate(prompts[n]):
                    s = served(scheduler, ids)
                    g = lazy.generate(torch.tensor(ids), max_new_tokens=1, eos_token_id=[]).ttft_s
                    if i:
                        times["served_ms"].append(s * 1e3)
                        times["generate_ms"].append(g * 1e3)
                rows.append({"schedule": spec, "tokens": n, **times})
        finally:
            scheduler.close()
            lazy.release()
    for r in rows:
        r.update({f"{k}_median_ms": statistics.median(r[f"{k}_ms"]) for k in ("served", "generate")})
    dense = {r["tokens"]: r for r in rows if r["schedule"] == "dense"}
    lines = ["| schedule | tokens | served TTFT ms (a new length) | generate TTFT ms (the same again) | "
             "served vs dense | generate vs dense |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = dense.get(r["tokens"])
        vs = [f"{d[k] / r[k]:.2f}x" if d else "—" for k in ("served_median_ms", "generate_median_ms")]
        lines.append(f"| {r['schedule']} | {r['tokens']} | {r['served_median_ms']:.1f} | "
                     f"{r['generate_median_ms']:.1f} | {vs[0]} | {vs[1]} |")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/serve_probe.py " + " ".join(sys.argv[1:])
    result = {"command": command, "machine": machine_info(torch.device(args.device)), "rows": rows}
    (args.out / "serve-probe.json").write_text(json.dumps(result, indent=1))
    (args.out / "serve-probe.md").write_text(f"`{command}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
