"""Where a decoding step's time goes on the CPU: torch's profiler over steps of a real model answering a real prompt.

The GPU's step profile (profile_stages.py) takes random weights and CUDA; on the CPU a pruned step's cost depends on
how many rows a step computes after a pruning layer, which real weights on real text decide. Each schedule decodes
a warm-up answer first (compilation), then `--steps` profiled steps after `--skip` others; prints ms a step and the
operators by self time.

    PYTHONPATH=src python benchmarks/cpu_step_profile.py --model smollm2 --task recall --length 2048 \
        dense 'revive(rows=1):balanced' 'revive(rows=2):balanced' balanced
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lazyprefill.engine import DecodeOptions
from lazyprefill.eval import tasks
from lazyprefill.generation import LazyLLM
from lazyprefill.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("schedules", nargs="+", help="schedule specs, e.g. dense balanced 'revive(rows=2):balanced'")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--task", default="recall", help="the eval task whose first sample is the prompt")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--skip", type=int, default=5, help="decoding steps before the profiled ones")
    p.add_argument("--steps", type=int, default=30, help="profiled decoding steps")
    p.add_argument("--rows", type=int, default=25, help="operators listed")
    args = p.parse_args()
    model, tokenizer = load_model(args.model)
    ids = torch.tensor(tasks.build(args.task, tokenizer, args.length, 1)[0].prompt_ids)  # [n]
    first, last = args.skip, args.skip + args.steps
    for spec in args.schedules:
        lazy = LazyLLM(model, spec, decode=DecodeOptions(compile=True))
        list(lazy.stream([ids], max_new_tokens=12, eos_token_id=[]))  # compiles what the profiled run replays
        prof, stamps = profile(activities=[ProfilerActivity.CPU]), []
        for i, _ in enumerate(lazy.stream([ids], max_new_tokens=last + 1, eos_token_id=[])):
            stamps.append(time.perf_counter())
            if i == first:
                prof.start()
            elif i == last:
                prof.stop()
        print(f"== {spec}: {(stamps[last] - stamps[first]) / args.steps * 1e3:.1f} ms a step under the profiler")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
