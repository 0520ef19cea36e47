"""Decoding attention over a candidate set S_l, one query row (or a few), llama2-7b / llama3-8b dims on a GPU.

For S_l = 100%, 70% and 34% of 8K keys: error of the written-out masked attention (decoding.masked_attention,
reads every key) and of the Triton split-K kernel (split_attention, reads S_l's keys only) against float64,
and their device times (CUDA graphs of 10 calls, median of 7 replays) with a sweep of the kernel's launch
settings. Prints a table and writes JSON to --json, the fastest correct setting to --setting.
Run: PYTHONPATH=src python benchmarks/decode_attention.py --json out.json --setting setting.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
from sweep import report

from lazyprefill.decoding import masked_attention
from lazyprefill.kernels import split_attention as sa

FIELDS = ("block_n", "programs_per_sm", "num_warps", "num_stages", "merge_kernel")
DEFAULT = (sa.BLOCK_N, sa.PROGRAMS_PER_SM, sa.NUM_WARPS, sa.NUM_STAGES, sa.MERGE_KERNEL)
SHAPES = {"llama2-7b": (32, 32), "llama3-8b": (32, 8)}  # (H, Hkv)
# block_n, programs per SM, warps, stages, merge kernel: split_attention's launch settings
SETTINGS = list(itertools.product((64, 128), (2, 4, 8), (4, 8), (2, 3, 4), (True,)))


def median_ms(fn, calls: int = 10, reps: int = 7) -> float:
    """Device time of one call: `calls` calls captured in a CUDA graph (as the engine runs them), median of
    `reps` replays. Timing eager calls one by one would time the host's launches instead."""
    for _ in range(2):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / calls


def case(heads: int, kv_heads: int, T: int, frac: float, R: int, g: torch.Generator):
    dh, P = 128, T + 1
    k = torch.randn(1, kv_heads, P, dh, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, kv_heads, P, dh, device="cuda", generator=g).bfloat16()
    q = torch.randn(1, heads, R, dh, device="cuda", generator=g).bfloat16()
    in_s = torch.rand(T, device="cuda", generator=g) < frac
    rows = torch.arange(T - R, T, device="cuda")[None]  # the last R positions
    in_s[rows[0]] = True
    in_s = in_s[None]
    mask = in_s[:, None, :] & (torch.arange(T, device="cuda") <= rows[:, :, None])
    n_s = in_s.sum(1, dtype=torch.int32)
    listed = torch.zeros(1, T, dtype=torch.int32, device="cuda")
    listed[0, : int(n_s)] = in_s[0].nonzero()[:, 0].int()
    # float64 reference
    qd, kd, vd = (x.double() for x in (q, k[:, :, :T], v[:, :, :T]))
    kd, vd = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (kd, vd))
    logits = (qd @ kd.transpose(-1, -2) * 0.088).masked_fill(~mask[:, None], float("-inf"))
    ref = logits.softmax(-1) @ vd
    return q, k, v, mask, listed, n_s, rows.int(), ref


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--setting", help="write the fastest correct launch setting here (JSON)")
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for shape, (heads, kv_heads), T, R in [("llama2-7b", SHAPES["llama2-7b"], 8257, 1),
                                           ("llama2-7b", SHAPES["llama2-7b"], 8256, 8),
                                           ("llama3-8b", SHAPES["llama3-8b"], 8257, 1),
                                           ("llama2-7b", SHAPES["llama2-7b"], 32769, 1)]:
        for frac in (1.0, 0.7, 0.34):
            q, k, v, mask, listed, n_s, qpos, ref = case(heads, kv_heads, T, frac, R, g)
            def masked(q=q, k=k, v=v, mask=mask, T=T):
                return masked_attention(q, k[:, :, :T], v[:, :, :T], mask, 0.088)

            row = {"shape": shape, "T": T, "R": R, "frac": frac, "keys": int(n_s),
                   "masked_rel": rel(masked(), ref), "masked_ms": median_ms(masked)}
            gb = int(n_s) * kv_heads * 128 * 2 * 2 / 1e9
            timings = []
            for setting in SETTINGS:
                def split(setting=setting, inputs=(q, k, v, listed, n_s, qpos)):
                    return sa.split_attention(*inputs, 0.088, *setting)
                timings.append((setting, median_ms(split), rel(split(), ref)))
            best = min(timings, key=lambda x: x[1])
            default = next(t for t in timings if t[0] == DEFAULT)
            row |= {"split_default_ms": default[1], "split_rel": default[2], "best_setting": best[0],
                    "best_ms": best[1], "best_rel": best[2], "S_l_GB": gb,
                    "sweep": [[list(s), ms, r] for s, ms, r in timings]}
            out.append(row)
            print(f"{shape} T={T} R={R} |S|={frac:.0%}: masked {row['masked_ms'] * 1e3:.0f} us "
                  f"(rel {row['masked_rel']:.1e}) "
                  f"| split default {default[1] * 1e3:.0f} us (rel {default[2]:.1e}) | best {best[0]} "
                  f"{best[1] * 1e3:.0f} us = {gb / best[1] * 1e3:.0f} GB/s of S_l's K/V", flush=True)
    report(out, SETTINGS, DEFAULT, FIELDS, args.setting, args.json)


if __name__ == "__main__":
    main()
