"""Which ops issue a decoding step's device-to-device memcpys (benchmarks/NOTES.md, "Decoding steps, fourth GPU
session"): one eager step per method (no CUDA graph, so every copy is a host call) under torch.profiler, each
`cudaMemcpyAsync` counted under the chain of ops that issued it, beside the step's memcpy events on the device.

    PYTHONPATH=src python benchmarks/copy_sources.py --model llama3-8b --length 4096 --methods dense,balanced
"""

from __future__ import annotations

import argparse
import collections

import torch
from profile_stages import decoders
from torch.profiler import ProfilerActivity, profile

from lazyprefill import bench
from lazyprefill.adapters import adapter_for
from lazyprefill.engine import DecodeOptions
from lazyprefill.schedule import split_list


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--methods", type=split_list, default=["dense", "balanced"])
    bench.add_compile_arguments(p)
    args = p.parse_args()
    bench.use_compile_arguments(args)
    model = bench.random_model(args.model, "cuda", torch.bfloat16)
    adapter = adapter_for(model)
    prompts = bench.random_prompts(args.length, adapter.vocab_size, 1, torch.device("cuda"), 0)
    with torch.inference_mode():
        for name, step in decoders(model, adapter, prompts, 16, DecodeOptions(graphs=False), args.methods):
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            print(f"== {name}: " + ", ".join(f"{n} {k}" for k, n in memcpy_events(prof).items()))
            for chain, n in issuers(prof).most_common():
                print(f"{n:4d}  {chain}")


def memcpy_events(prof: torch.profiler.profile) -> collections.Counter:
    """Host calls and device copies of the profiled step whose name says memcpy."""
    return collections.Counter(e.name for e in prof.events() if "emcpy" in e.name)


def issuers(prof: torch.profiler.profile) -> collections.Counter:
    """Each cudaMemcpyAsync's chain of ops, innermost first (at most three)."""
    chains: collections.Counter = collections.Counter()
    for e in prof.events():
        if e.name == "cudaMemcpyAsync":
            ops, parent = [], e.cpu_parent
            while parent is not None and len(ops) < 3:
                ops.append(parent.name)
                parent = parent.cpu_parent
            chains[" < ".join(ops)] += 1
    return chains


if __name__ == "__main__":
    main()
