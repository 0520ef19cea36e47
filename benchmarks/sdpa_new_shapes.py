"""What attention kernels cost at a sequence length they have not met (benchmarks/NOTES.md, "Eleventh GPU session").

Causal attention with llama3-8b's heads (32 query, 8 K/V, 128 wide) in bf16 on CUDA:
  builds   the first call at each of a few new lengths against the same call again, for the cuDNN and flash
           backends, in the heads-major layout ([B, H, S, dh] contiguous) and the engine's rows-major one (a
           [B, S, H, dh] tensor seen as [B, H, S, dh]); then 40 new lengths in a row, with the host memory they leave;
  bucketed the engine's causal prefill call (attention.causal_attention, rows laid out in steps of CAUSAL_ROWS_STEP)
           at new lengths: a length in a bucket already met should build nothing;
  masked   a continuation's attention (Engine.extend: 48 new rows against every held key, a boolean mask) at new
           numbers of keys, with SDPA choosing its backend (cuDNN: a build per length) and through
           attention.masked_kernels (the memory-efficient kernel, as Engine.extend and windowed slices now run it);
  kernels  each backend's steady time at 2K-32K;
  flex     the `long` preset's block-sparse attention (sparse.py's pattern and BlockMask) at new lengths from 16K,
           through FlexAttention compiled per shape (dynamic=False, as sparse.py did until the twelfth GPU session),
           with dynamic shapes (as it did then), with dynamic shapes told that the rows fill the kernel's tiles, and
           sparse.py's own call (which pads the rows and tells it so): the first call, the median of five after it,
           and how far the outputs lie from the per-shape version's.
Run it twice to see PyTorch's opt-in that reuses cuDNN graphs across lengths:

    PYTHONPATH=src python3 benchmarks/sdpa_new_shapes.py builds bucketed masked kernels flex
    TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1 python3 benchmarks/sdpa_new_shapes.py builds
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)


def inputs(n: int, rows_major: bool) -> tuple[torch.Tensor, ...]:
    def make(heads: int) -> torch.Tensor:
        if rows_major:
            return torch.randn(1, n, heads, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        return torch.randn(1, heads, n, 128, device="cuda", dtype=torch.bfloat16)

    return make(32), make(8), make(8)


def elapsed_ms(call: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def timed_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: SDPBackend) -> float:
    with sdpa_kernel([backend]):
        return elapsed_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))


def resident_mb() -> float:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024


def builds() -> None:
    for rows_major in (False, True):
        layout = "rows-major" if rows_major else "heads-major"
        for backend in BACKENDS:
            timed_ms(*inputs(4096, rows_major), backend)  # the backend's own first call
            cells = []
            for n in (5000, 5311, 8191, 1229, 16001, 32000):
                x = inputs(n, rows_major)
                cells.append(f"{n}: first {timed_ms(*x, backend):.1f}, again {timed_ms(*x, backend):.2f}")
            print(f"{layout} {backend.name} (ms) " + "; ".join(cells), flush=True)
    for backend in BACKENDS:
        before, start = resident_mb(), time.perf_counter()
        for i in range(40):
            timed_ms(*inputs(3000 + 37 * i, True), backend)
        print(f"{backend.name}: 40 new lengths in {time.perf_counter() - start:.2f} s, "
              f"host memory +{resident_mb() - before:.0f} MB", flush=True)


def bucketed() -> None:
    from lazyprefill.attention import causal_attention

    for bucket in (False, True):
        cells = []
        for n in (5000, 5011, 5100, 8000, 8191, 16001, 16100, 32000):
            call = partial(causal_attention, *inputs(n, True), 128**-0.5, bucket)
            cells.append(f"{n}: first {elapsed_ms(call):.1f}, again {elapsed_ms(call):.2f}")
        print(f"causal_attention bucket={bucket} (ms): " + "; ".join(cells), flush=True)


def masked() -> None:
    from lazyprefill.attention import masked_kernels, sdpa  # with a mask, K/V repeated: no fused kernel takes GQA

    def chosen(q, k, v, m):
        with masked_kernels(q):
            return sdpa(q, k, v, attn_mask=m)

    calls = {"as SDPA chooses": lambda q, k, v, m: sdpa(q, k, v, attn_mask=m), "masked_kernels": chosen}
    for name, attend in calls.items():
        cells = []
        for n in (5000, 5311, 8191, 16001, 32000):
            q = inputs(48, True)[0]
            _, k, v = inputs(n, True)
            mask = torch.ones(48, n, dtype=torch.bool, device="cuda").tril(n - 48)  # the new rows are the last keys
            call = partial(attend, q, k, v, mask[None, None])
            cells.append(f"{n}: first {elapsed_ms(call):.1f}, again {elapsed_ms(call):.2f}")
        print(f"masked, 48 rows, {name} (ms): " + "; ".join(cells), flush=True)


def kernels() -> None:
    for n in (2048, 8192, 16384, 32768):
        x = inputs(n, True)
        cells = []
        for backend in BACKENDS:
            timed_ms(*x, backend)
            cells.append(f"{backend.name} {sorted(timed_ms(*x, backend) for _ in range(3))[1]:.2f} ms")
        print(f"{n}: " + "; ".join(cells), flush=True)


def flex() -> None:
    from torch.nn.attention.flex_attention import flex_attention

    from lazyprefill.sparse import Sparse, sparse_attention

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)  # as sparse.py sets it
    per_shape, dynamic = torch.compile(flex_attention, dynamic=False), torch.compile(flex_attention, dynamic=True)
    scale = 128**-0.5
    versions = {  # the first three on rows padded to whole blocks (the mask's width), sparse.py's call on the rows
        "per shape": lambda q, k, v, m: per_shape(q, k, v, block_mask=m, scale=scale, enable_gqa=True),
        "dynamic": lambda q, k, v, m: dynamic(q, k, v, block_mask=m, scale=scale, enable_gqa=True),
        "dynamic+IS_DIVISIBLE": lambda q, k, v, m: dynamic(q, k, v, block_mask=m, scale=scale, enable_gqa=True,
                                                           kernel_options={"IS_DIVISIBLE": True}),
    }
    for n in (16001, 20000, 32000, 65000):
        q, k, v = inputs(n, True)
        mask = Sparse().block_mask(q, k, [n], scale)
        padded = [F.pad(x, (0, 0, 0, mask.seq_lengths[0] - n)) for x in (q, k, v)]
        outs, cells = [], []
        calls = {name: partial(attend, *padded, mask) for name, attend in versions.items()}
        calls["sparse_attention"] = partial(sparse_attention, q, k, v, mask, scale)
        for name, call in calls.items():
            first = elapsed_ms(call)
            steady = sorted(elapsed_ms(call) for _ in range(5))[2]
            outs.append(call()[:, :, :n].float())
            cells.append(f"{name} first {first:.0f}, median {steady:.2f}")
        diff = max((out - outs[0]).abs().max().item() for out in outs[1:])
        print(f"flex {n} (ms): " + "; ".join(cells) + f"; max |difference| from per shape {diff:.2e}", flush=True)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}, "
          f"TORCH_CUDNN_SDPA_AVOID_RECOMPILE={os.environ.get('TORCH_CUDNN_SDPA_AVOID_RECOMPILE')}")
    parts = {"builds": builds, "bucketed": bucketed, "masked": masked, "kernels": kernels, "flex": flex}
    for part in sys.argv[1:] or list(parts):
        parts[part]()
