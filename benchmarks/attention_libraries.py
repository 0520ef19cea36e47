"""The Triton kernels against what the libraries on the GPU offer, on the attention a decoding step runs.

Decoding (one query row per sequence over S_l, a subset of T cached keys): split_attention (S_l's K/V through a
list of positions) against FlexAttention (compiled; a block mask whose mask_mod reads S_l's membership) and SDPA
with a boolean [B, 1, 1, T] mask on each backend that takes one (cuDNN: what transformers' compiled static
cache runs; memory-efficient), plus SDPA's flash kernel with no mask where S_l is every key (the dense bound).
A burst (thousands of revived rows): burst_attention against FlexAttention (S_l and causality by position in
the mask_mod, so its block mask skips what lies after a block of rows) and SDPA's masked kernel.

Device time: CUDA graphs of 10 calls, median of 7 replays (decode); median of 5 events (bursts). Bandwidth counts
the K/V bytes a kernel must read (decode: S_l's keys, or all T for the kernels that read every key and mask).
Error: relative to float64 on the first rows. Prints a table and writes JSON.
Run: PYTHONPATH=src python benchmarks/attention_libraries.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from burst_attention import burst_case, device_ms
from decode_attention import median_ms
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from lazyprefill.attention import decode_mask, listed_positions, row_ranges
from lazyprefill.kernels import burst_attention as ba
from lazyprefill.kernels import split_attention as sa

SHAPES = {"llama2-7b": (32, 32), "llama3-8b": (32, 8)}  # (H, Hkv)
DH, SCALING = 128, 128**-0.5
# (shape, batch, keys T, fraction of keys in S_l): the decoding cases
DECODE = [("llama2-7b", 1, 8192, 1.0), ("llama2-7b", 1, 8192, 0.34), ("llama2-7b", 1, 32768, 1.0),
          ("llama2-7b", 8, 8192, 1.0), ("llama3-8b", 1, 8192, 1.0), ("llama3-8b", 1, 32768, 0.34)]
BURSTS = [("llama2-7b", 8192), ("llama3-8b", 8192), ("llama2-7b", 32768)]

_flex = torch.compile(flex_attention, dynamic=False)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x = x[..., : ref.shape[2], :]
    return ((x.double() - ref).norm() / ref.norm()).item()


def reference(q, k, v, mask) -> torch.Tensor:
    """float64 attention; mask: [B, R, T] bool."""
    group = q.shape[1] // k.shape[1]
    kd, vd = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    logits = (q.double() @ kd.transpose(-1, -2) * SCALING).masked_fill(~mask[:, None], float("-inf"))
    return logits.softmax(-1) @ vd


def timed(fn, ref, nbytes: float, timer) -> dict:
    """One variant: device ms, GB/s of `nbytes`, error; or why it did not run."""
    try:
        start = time.perf_counter()
        err = rel(fn(), ref)
        first_s = time.perf_counter() - start  # compilation, for the compiled ones
        ms = timer(fn)
        return {"ms": ms, "gb_per_s": nbytes / ms / 1e6, "rel": err, "first_call_s": first_s}
    except Exception as e:  # a backend that refuses these inputs, or a compile failure: recorded, not fatal
        return {"error": f"{type(e).__name__}: {str(e).strip()[:200]}"}


def decode_case(shape: str, B: int, T: int, frac: float, g: torch.Generator) -> dict:
    heads, kv_heads = SHAPES[shape]
    P = T + 1
    k = torch.randn(B, kv_heads, P, DH, device="cuda", generator=g).bfloat16()
    v = torch.randn(B, kv_heads, P, DH, device="cuda", generator=g).bfloat16()
    q = torch.randn(B, heads, 1, DH, device="cuda", generator=g).bfloat16()
    in_s = torch.rand(B, T, device="cuda", generator=g) < frac
    in_s[:, T - 1] = True
    n_s = in_s.sum(1, dtype=torch.int32)
    listed = listed_positions(in_s)
    qpos = torch.full((B, 1), T - 1, dtype=torch.int32, device="cuda")
    kT, vT = k[:, :, :T], v[:, :, :T]
    ref = reference(q, kT, vT, in_s[:, None])
    per_key = 2 * kv_heads * DH * 2  # K and V bytes of one key
    listed_bytes, all_bytes = float(n_s.sum()) * per_key, B * T * per_key
    mask4 = in_s[:, None, None, :]
    gqa = heads != kv_heads
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: in_s[b, kv_idx], B, None, 1, T, device="cuda")

    def sdpa(backend, mask):
        def run():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, kT, vT, attn_mask=mask, scale=SCALING, enable_gqa=gqa)
        return run

    row = {"shape": shape, "B": B, "T": T, "frac": frac, "keys": int(n_s.sum()),
           "split": timed(lambda: sa.split_attention(q, k, v, listed, n_s, qpos, SCALING), ref, listed_bytes,
                          median_ms),
           "flex": timed(lambda: _flex(q, kT, vT, block_mask=block_mask, scale=SCALING, enable_gqa=gqa), ref,
                         all_bytes, median_ms),
           "sdpa_cudnn_mask": timed(sdpa(SDPBackend.CUDNN_ATTENTION, mask4), ref, all_bytes, median_ms),
           "sdpa_efficient_mask": timed(sdpa(SDPBackend.EFFICIENT_ATTENTION, mask4), ref, all_bytes, median_ms)}
    if frac == 1.0:
        row["sdpa_flash_nomask"] = timed(sdpa(SDPBackend.FLASH_ATTENTION, None), ref, all_bytes, median_ms)
    return row


def burst_row(shape: str, T: int, g: torch.Generator) -> dict:
    heads, kv_heads = SHAPES[shape]
    q, k, v, in_s, rows = burst_case(heads, kv_heads, T, g)
    R = rows.shape[1]
    valid = torch.ones_like(rows, dtype=torch.bool)
    listed, (lo, hi) = listed_positions(in_s), row_ranges(in_s, rows, valid, None)
    kT, vT = k[:, :, :T], v[:, :, :T]
    mask = decode_mask(in_s, rows, T, None)  # [1, R, T]
    ref = reference(q[:, :, :256], kT, vT, mask[:, :256])
    tflop = 4 * heads * DH * int(hi.sum()) / 1e12  # the causal work: q k^T and p v over the pairs attended
    gqa = heads != kv_heads
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: in_s[b, kv_idx] & (kv_idx <= rows[b, q_idx]),
                                   1, None, R, T, device="cuda")

    def sdpa():
        kk, vv = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (kT, vT))
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask[:, None], scale=SCALING)

    row = {"shape": shape, "T": T, "R": R, "keys": int(in_s.sum()), "tflop": tflop,
           "burst": timed(lambda: ba.burst_attention(q, k, v, listed, lo, hi, SCALING), ref, 0.0, device_ms),
           "flex": timed(lambda: _flex(q, kT, vT, block_mask=block_mask, scale=SCALING, enable_gqa=gqa), ref, 0.0,
                         device_ms),
           "sdpa_efficient_mask": timed(sdpa, ref, 0.0, device_ms)}
    for name in ("burst", "flex", "sdpa_efficient_mask"):
        if "ms" in row[name]:
            row[name]["tflops"] = tflop / row[name]["ms"] * 1e3
            del row[name]["gb_per_s"]
    return row


def show(label: str, row: dict, unit: str) -> None:
    parts = []
    for name, r in row.items():
        if isinstance(r, dict):
            parts.append(f"{name} {r['ms'] * 1e3:.0f} us {r[unit]:.0f} {unit} rel {r['rel']:.1e}" if "ms" in r
                         else f"{name}: {r['error'][:60]}")
    print(label + " | " + " | ".join(parts), flush=True)


def plot(result: dict, path: str) -> None:
    """Device time per variant: decoding cases (left, us) and bursts (right, ms); a variant that did not run has
    no bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    for ax, kind, scale, unit in ((axes[0], "decode", 1e3, "us"), (axes[1], "bursts", 1.0, "ms")):
        rows = result[kind]
        names = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, dict)))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            x = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
            ax.bar(x, [r.get(name, {}).get("ms", 0) * scale for r in rows], width, label=name, color=f"C{i}")
        labels = [f"{r['shape']} x{r['B']}\n{r['T'] // 1024}K keys, S_l {r['frac']:.0%}" if kind == "decode"
                  else f"{r['shape']}\n{r['T'] // 1024}K keys, {r['R']} rows" for r in rows]
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel(f"device time ({unit})")
        ax.set_title("one decoding row per sequence" if kind == "decode" else "a burst of revived rows")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"{result['device']}, torch {result['torch']}: Triton kernels against the libraries' attention")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json", help="write the results here, and a plot beside it (.png)")
    p.add_argument("--no-bursts", action="store_true")
    p.add_argument("--replot", metavar="JSON", help="only draw the plot of a saved result")
    args = p.parse_args()
    if args.replot:
        with open(args.replot) as f:
            plot(json.load(f), args.replot.removesuffix(".json") + ".png")
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "decode": [], "bursts": []}

    def save() -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    for case in DECODE:
        row = decode_case(*case, g)
        result["decode"].append(row)
        show(f"decode {case}", row, "gb_per_s")
        save()
    for case in [] if args.no_bursts else BURSTS:
        row = burst_row(*case, g)
        result["bursts"].append(row)
        show(f"burst {case} R={row['R']}", row, "tflops")
        save()
    if args.json:
        plot(result, args.json.removesuffix(".json") + ".png")


if __name__ == "__main__":
    main()
