"""Where the time goes: torch.profiler over one prefill per method and over decoding steps.

For each method prints the wall time (CUDA events), the summed kernel time and the top kernels, and
the host calls that stall the host (stream syncs, blocking copies). A wall time well above the kernel
time means the host is the bottleneck; kernels other than the model's GEMMs and attention are overhead.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lazyprefill import bench, decoding
from lazyprefill.adapters import adapter_for
from lazyprefill.engine import DecodeOptions, Engine
from lazyprefill.schedule import parse_schedule, split_list

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
    p.add_argument("--batch", type=int, default=1, help="random prompts of --length decoding together")
    p.add_argument("--decode-steps", type=int, default=64, help="timed decoding steps per method")
    p.add_argument("--warmup-steps", type=int, default=16, help="untimed steps first (graph captures happen here)")
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--graphs", choices=["auto", "off"], default="auto", help="off: DecodeOptions(graphs=False)")
    p.add_argument("--attention", choices=["auto", "masked"], default="auto",
                   help="masked: DecodeOptions(split_kernel=False)")
    for name in ("burst-kernel", "compile"):
        p.add_argument(f"--{name}", action=argparse.BooleanOptionalAction,
                       help=f"DecodeOptions({name.replace('-', '_')}=True / False; default: by device)")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--host-profile", type=int, default=0, metavar="N",
                   help="also N prefills of each method under cProfile: where the host's time goes")
    p.add_argument("--methods", type=split_list,
                   help="transformers, dense, presets and schedule specs, comma-separated (default: transformers, "
                        "dense and the presets)")
    p.add_argument("--split-setting", help="JSON of split_attention launch settings (from decode_attention.py)")
    bench.add_compile_arguments(p)
    p.add_argument("--json", help="write the decoding timings here")
    p.add_argument("--kernel-table", help="write every kernel of a profiled step, per method side by side, here")
    args = p.parse_args()
    if args.split_setting:
        use_split_setting(args.split_setting)
    bench.use_compile_arguments(args)
    model = bench.random_model(args.model, "cuda", torch.bfloat16)
    adapter = adapter_for(model)
    prompts = bench.random_prompts(args.length, adapter.vocab_size, args.batch, torch.device("cuda"), 0)
    if not args.no_prefill:
        profile_prefill(model, adapter, prompts[0], args.host_profile)
    options = DecodeOptions(graphs=None if args.graphs == "auto" else False,
                            split_kernel=None if args.attention == "auto" else False,
                            burst_kernel=args.burst_kernel, compile=args.compile)
    rows, kernels = [], {}
    with torch.inference_mode():
        for name, step in decoders(model, adapter, prompts, args.warmup_steps + args.decode_steps + args.profile_steps,
                                   options, args.methods):
            for _ in range(args.warmup_steps):
                step()
            ms, revived = step_times(step, args.decode_steps)
            rows.append({"method": name, "graphs": args.graphs, "attention": args.attention,
                         "burst_kernel": args.burst_kernel, "compile": args.compile,
                         "median_ms": statistics.median(ms), "mean_ms": sum(ms) / len(ms),
                         "revived_per_step": revived, "steps_ms": ms})
            print(f"decode {name}: median {rows[-1]['median_ms']:.2f} ms/token, mean {rows[-1]['mean_ms']:.2f}",
                  flush=True)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(args.profile_steps):
                    step()
                torch.cuda.synchronize()
            label = (f"decode after {args.batch} x {args.length} {name} "
                     f"(graphs {args.graphs}, attention {args.attention})")
            summarize(prof, label, sum(ms) / len(ms) * args.profile_steps, args.profile_steps)
            kernels[name] = per_step_kernels(prof, args.profile_steps)
            del step  # its cache goes before the next method's is allocated
    print(f"\n{'method':<14} {'graphs':<6} {'median ms/token':>16} {'mean':>8} {'revived/step':>13}")
    for r in rows:
        print(f"{r['method']:<14} {r['graphs']:<6} {r['median_ms']:>16.2f} {r['mean_ms']:>8.2f} "
              f"{r['revived_per_step']:>13.1f}")
    if args.kernel_table:
        Path(args.kernel_table).write_text(kernel_table(kernels, " ".join(sys.argv)))
    if args.json:
        info = {"model": args.model, "length": args.length, "batch": args.batch, "device": torch.cuda.get_device_name(),
                "torch": torch.__version__, "compile_options": decoding.COMPILE_OPTIONS,
                "compile_selection": decoding.COMPILE_SELECTION, "command": " ".join(sys.argv)}
        Path(args.json).write_text(json.dumps({**info, "decode": rows}, indent=1))


def per_step_kernels(prof, steps: int) -> dict[str, tuple[float, float]]:
    """Kernel name -> (launches, device microseconds) per step."""
    return {e.key: (e.count / steps, e.self_device_time_total / steps) for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0}


def kernel_table(kernels: dict[str, dict[str, tuple[float, float]]], command: str) -> str:
    """Every kernel's launches and time per step, one column per method, the costliest first: what a method adds
    to another's step, kernel by kernel."""
    methods = list(kernels)
    names = sorted({k for t in kernels.values() for k in t}, key=lambda k: -max(t.get(k, (0, 0))[1]
                                                                                  for t in kernels.values()))
    lines = [f"# {command}", f"{'kernel (per step: launches, us)':<70} " + " ".join(f"{m[:23]:>23}" for m in methods)]
    for k in names:
        cells = (kernels[m].get(k, (0, 0)) for m in methods)
        lines.append(f"{k[:70]:<70} " + " ".join(f"{n:>8.0f}x {us:>11.1f}us" for n, us in cells))
    lines.append("total us/step " + " ".join(f"{sum(v[1] for v in kernels[m].values()):.0f}" for m in methods)
                 + "; kernels/step " + " ".join(f"{sum(v[0] for v in kernels[m].values()):.0f}" for m in methods))
    return "\n".join(lines) + "\n"


def use_split_setting(path: str) -> None:
    """Set split_attention's launch constants from a JSON file written by decode_attention.py --setting."""
    from lazyprefill.kernels import split_attention

    for name, value in json.loads(Path(path).read_text()).items():
        setattr(split_attention, name.upper(), value)
    print("split_attention settings:", Path(path).read_text())


def profile_prefill(model, adapter, ids: torch.Tensor, host_calls: int = 0) -> None:
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
            summarize(prof, f"prefill {ids.shape[0]} {name}", wall, 1)
            if host_calls:
                host_profile(lambda fn=fn: fn([ids]), host_calls, f"prefill {ids.shape[0]} {name}")


def host_profile(fn, calls: int, label: str) -> None:
    """The Python functions that take the host's time over `calls` calls: a prefill whose wall time exceeds its
    kernels' by more than the ATen ops' host time spends it in Python around them."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    print(f"\n== host profile, {label}: {calls} calls")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)


def step_times(step, steps: int) -> tuple[list[float], float]:
    """Milliseconds of each of `steps` decoding steps on the device's clock (gaps included), revived rows per step.
    Each step's stats are read after the last one, so that no step waits for its own (as in a generation, which
    enqueues the next step before reading one's tokens)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    revived = []
    events[0].record()
    for i in range(steps):
        revived.append(step())
        events[i + 1].record()
    events[-1].synchronize()
    return [a.elapsed_time(b) for a, b in pairwise(events)], sum(r() for r in revived) / steps


def decoders(model, adapter, prompts: list[torch.Tensor], steps: int, options: DecodeOptions,
             methods: list[str] | None = None) -> Iterator[tuple[str, Callable[[], int]]]:
    """(name, one greedy decoding step of every prompt per call) after their prefill: transformers' forward with its
    cache, and ours; `methods`: names and schedule specs (None: transformers, dense and the presets). Each call
    returns a function that reads the rows it revived (waiting for that step). Made one at a time, so that only one
    cache is held."""
    for name in methods or [bench.TRANSFORMERS, *bench.schedules_for(adapter.num_layers)]:
        if name == bench.TRANSFORMERS:
            yield name, transformers_step(model, prompts)
            continue
        engine = Engine(adapter, parse_schedule(name, adapter.num_layers), capacity=prompts[0].shape[0] + steps + 8,
                        decode=options, batch=len(prompts))
        logits, _ = engine.prefill(prompts)
        engine.settle()
        yield name, engine_step(engine, logits.argmax(dim=-1))
        del engine
        torch.cuda.empty_cache()


def transformers_step(model, prompts: list[torch.Tensor]) -> Callable[[], Callable[[], int]]:
    """A greedy decoding step of transformers' forward with its cache per call, after a prefill of `prompts`."""
    out = model(torch.stack(prompts), use_cache=True, logits_to_keep=1)
    state = {"past": out.past_key_values, "tokens": out.logits[:, -1].argmax(dim=-1)}  # tokens: [B]

    def hf_step() -> Callable[[], int]:
        res = model(state["tokens"][:, None], past_key_values=state["past"], use_cache=True)
        state["tokens"] = res.logits[:, -1].argmax(dim=-1)
        return lambda: 0

    return hf_step


def engine_step(engine: Engine, token: torch.Tensor) -> Callable[[], Callable[[], int]]:
    """A greedy decoding step of every sequence of `engine` per call, starting from `token`: [B]; the tokens stay on
    the device, and the step's stats are read only when its returned function is called."""
    state = {"token": token}
    seqs = list(range(token.shape[0]))

    def step() -> Callable[[], int]:
        logits, stats = engine.step(state["token"], seqs)
        state["token"] = logits.argmax(dim=-1)
        return lambda: sum(sum(s.revived) for s in stats.get())

    return step


if __name__ == "__main__":
    main()
