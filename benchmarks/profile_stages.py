"""Where the time goes: torch.profiler over one prefill per method and over decoding steps.

For each method prints the wall time (CUDA events), the summed kernel time and the top kernels, and
the host calls that stall the host (stream syncs, blocking copies). A wall time well above the kernel
time means the host is the bottleneck; kernels other than the model's GEMMs and attention are overhead.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from lazyprefill import bench
from lazyprefill.adapters import adapter_for
from lazyprefill.engine import Engine

HOST_STALLS = ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaDeviceSynchronize", "cudaEventSynchronize")


def summarize(prof, label: str, wall_ms: float, per: int) -> None:
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    stalls = {e.key: e.count for e in events if e.key in HOST_STALLS}
    print(f"\n== {label}: wall {wall_ms / per:.2f} ms, kernels {kernel_us / 1e3 / per:.2f} ms (per unit; {per} units); "
          f"host calls {stalls}")
    table = events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60)
    print(table)


def timed(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--decode-steps", type=int, default=32)
    args = p.parse_args()
    model = bench.random_model(args.model, "cuda", torch.bfloat16)
    adapter = adapter_for(model)
    ids = bench.random_prompts(args.length, adapter.vocab_size, 1, torch.device("cuda"), 0)[0]
    methods = {bench.TRANSFORMERS: bench.transformers_prefill(model)}
    for name, schedule in bench.schedules_for(adapter.num_layers).items():
        methods[name] = bench.lazy_prefill(adapter, schedule)
    with torch.inference_mode():
        for name, fn in methods.items():
            for _ in range(2):
                fn([ids])
            wall = timed(lambda fn=fn: fn([ids]))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn([ids])
                torch.cuda.synchronize()
            summarize(prof, f"prefill {args.length} {name}", wall, 1)
    steps = args.decode_steps
    with torch.inference_mode():
        for name, step in decoders(model, adapter, ids, steps).items():
            for _ in range(2):
                step()
            wall = timed(lambda step=step: [step() for _ in range(steps)])
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(steps):
                    step()
                torch.cuda.synchronize()
            summarize(prof, f"decode after {args.length} {name}", wall, steps)


def decoders(model, adapter, ids: torch.Tensor, steps: int) -> dict:
    """One greedy decoding step per call, after a prefill of ids: transformers' forward with its cache, and ours."""
    out = model(ids[None], use_cache=True, logits_to_keep=1)
    state = {"past": out.past_key_values, "token": out.logits[0, -1].argmax()}

    def hf_step() -> None:
        res = model(state["token"].view(1, 1), past_key_values=state["past"], use_cache=True)
        state["token"] = res.logits[0, -1].argmax()

    runs = {bench.TRANSFORMERS: hf_step}
    for name, schedule in bench.schedules_for(adapter.num_layers).items():
        engine = Engine(adapter, schedule, capacity=ids.shape[0] + 3 * steps + 8)
        logits, _ = engine.prefill([ids])
        engine.settle()
        runs[name] = engine_step(engine, logits.argmax(dim=-1))
    return runs


def engine_step(engine: Engine, token: torch.Tensor):
    """A greedy decoding step of `engine` per call, starting from `token`."""
    state = {"token": token}

    def step() -> None:
        state["token"] = engine.decode(state["token"], [0])[0].argmax(dim=-1)

    return step


if __name__ == "__main__":
    main()
