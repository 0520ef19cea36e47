"""Attention for a burst of revived rows, llama2-7b / llama3-8b heads on a GPU: the burst kernel against the path
it would replace.

The first decoding step after a `paper` prefill (random weights) revives about 21% of the prompt at each
layer after a pruning layer (NOTES.md: 2,991 rows at 8K, 11,862 at 32K, over three segments), attending to
S_l = 70% of the keys. For such cases: SDPA's memory-efficient kernel with the [R, T] mask
(decoding.masked_attention, today's path for 256 rows or more) and the Triton burst kernel
(burst_attention, keys through S_l's positions, per-row ranges) with a sweep of its launch settings; device
time (CUDA events, median of 5 after 2 warm-ups), the causal work it implies in TFLOP/s, and the error of
the first 256 rows against float64. Prints a table and writes JSON to --json, and to --setting the fastest
setting correct on every case (burst_attention's launch constants, lowercased: copy them into the module once
measured). Nothing here has run yet: written without a GPU.
Run: PYTHONPATH=src python benchmarks/burst_attention.py --json out.json --setting setting.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
from sweep import report

from lazyprefill.attention import decode_mask, listed_positions, row_ranges
from lazyprefill.decoding import masked_attention
from lazyprefill.kernels import burst_attention as ba

FIELDS = ("block_m", "block_n", "num_warps", "num_stages")
DEFAULT = (ba.BLOCK_M, ba.BLOCK_N, ba.NUM_WARPS, ba.NUM_STAGES)
SETTINGS = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))
SHAPES = {"llama2-7b": (32, 32), "llama3-8b": (32, 8)}  # (H, Hkv)
CASES = [("llama2-7b", 8192), ("llama3-8b", 8192), ("llama2-7b", 32768)]  # (shape, prompt tokens)
KEEP, REVIVED = 0.7, 0.21  # |S_l| / T, and rows revived / T, at the layer after the first pruning layer
SCALING, CHECKED = 128**-0.5, 256


def device_ms(fn, reps: int = 5) -> float:
    for _ in range(2):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def burst_case(heads: int, kv_heads: int, T: int, g: torch.Generator):
    """One sequence: S_l a random KEEP of [0, T) plus q at T - 1, rows a random REVIVED * T of its members and q."""
    dh = 128
    in_s = torch.rand(1, T, device="cuda", generator=g) < KEEP
    in_s[0, T - 1] = True
    members = in_s[0].nonzero()[:, 0]
    pick = torch.randperm(members.numel() - 1, device="cuda", generator=g)[: int(REVIVED * T)]
    rows = torch.cat([members[pick].sort().values, members[-1:]])[None]  # [1, R] in position order, q last
    R = rows.shape[1]
    q = torch.randn(1, heads, R, dh, device="cuda", generator=g).bfloat16()
    k = torch.randn(1, kv_heads, T + 1, dh, device="cuda", generator=g).bfloat16()
    v = torch.randn(1, kv_heads, T + 1, dh, device="cuda", generator=g).bfloat16()
    return q, k, v, in_s, rows


def reference(q, k, v, in_s, rows, T):
    """float64 attention of the first CHECKED rows."""
    group = q.shape[1] // k.shape[1]
    qd = q[:, :, :CHECKED].double()
    kd, vd = (x[:, :, :T].double().repeat_interleave(group, dim=1) for x in (k, v))
    mask = decode_mask(in_s, rows[:, :CHECKED], T, None)  # [1, CHECKED, T]
    logits = (qd @ kd.transpose(-1, -2) * SCALING).masked_fill(~mask[:, None], float("-inf"))
    return logits.softmax(-1) @ vd


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x[:, :, :CHECKED].double() - ref).norm() / ref.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--setting", help="write the fastest correct launch setting here (JSON)")
    args = p.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for shape, T in CASES:
        heads, kv_heads = SHAPES[shape]
        q, k, v, in_s, rows = burst_case(heads, kv_heads, T, g)
        valid = torch.ones_like(rows, dtype=torch.bool)
        ref = reference(q, k, v, in_s, rows, T)
        mask = decode_mask(in_s, rows, T, None)
        listed, (lo, hi) = listed_positions(in_s), row_ranges(in_s, rows, valid, None)
        pairs = int(hi.sum())  # (row, key) pairs the rows attend to
        tflop = 4 * heads * 128 * pairs / 1e12  # q k^T and p v

        def sdpa(q=q, k=k, v=v, mask=mask, T=T):
            return masked_attention(q, k[:, :, :T], v[:, :, :T], mask, SCALING)

        row = {"shape": shape, "T": T, "R": rows.shape[1], "keys": int(in_s.sum()), "pairs": pairs,
               "sdpa_ms": device_ms(sdpa), "sdpa_rel": rel(sdpa(), ref)}
        timings = []
        for setting in SETTINGS:
            def burst(setting=setting, inputs=(q, k, v, listed, lo, hi)):
                return ba.burst_attention(*inputs, SCALING, *setting)
            try:
                timings.append((setting, device_ms(burst), rel(burst(), ref)))
            except Exception as err:  # a setting that does not fit (shared memory) or does not compile
                timings.append((setting, None, f"{type(err).__name__}: {str(err)[:120]}"))
        ran = [t for t in timings if t[1] is not None]
        if not ran:
            print(f"{shape} T={T}: no setting ran: {timings[0][2]}")
            continue
        best = min(ran, key=lambda t: t[1])
        default = next(t for t in timings if t[0] == DEFAULT)
        row |= {"burst_default_ms": default[1], "burst_rel": default[2], "best_setting": best[0], "best_ms": best[1],
                "best_rel": best[2], "best_tflops": tflop / best[1] * 1e3,
                "sweep": [[list(s), ms, r] for s, ms, r in timings]}
        out.append(row)
        said = f"{default[1]:.2f} ms (rel {default[2]:.1e})" if default[1] is not None else default[2]
        print(f"{shape} T={T} R={row['R']} |S|={row['keys']}: SDPA masked {row['sdpa_ms']:.2f} ms "
              f"(rel {row['sdpa_rel']:.1e}) | burst default {said} | best {best[0]} {best[1]:.2f} ms "
              f"(rel {best[2]:.1e}) = {row['best_tflops']:.0f} TFLOP/s of causal work", flush=True)
    report(out, SETTINGS, DEFAULT, FIELDS, args.setting, args.json)


if __name__ == "__main__":
    main()
