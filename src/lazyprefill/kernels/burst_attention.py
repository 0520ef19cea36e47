"""Attention for a burst of revived rows that reads only the candidates' K/V: a Triton flash-attention forward.

Legend: B sequences, H / Hkv query / key-value heads, G = H / Hkv (Gp: G padded to a power of two),
R query rows per sequence, T keys laid out (positions [0, T)), P cache slots, dh head size.

In the first decoding steps after a pruned prefill, hundreds to tens of thousands of rows per sequence
come back from the Aux Cache at once. That is a prefill-shaped problem (many rows, split the work by
rows), unlike split_attention's one or few rows. Each row sees a contiguous range [lo, hi) of the
list of S_l's positions (causality: the members at or before the row; a window: minus those too far
back), so the kernel needs no [R, T] mask, and a program reads only the union of its rows' ranges:
keys after every row of a block, or before every row's window, are never loaded (causal block
skipping). Logits and softmax are fp32 (fp32 inputs: exact fp32 products, no tf32). Shapes are static
and nothing is read back to the host, so a launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .split_attention import attend_keys

logger = logging.getLogger(__name__)

# Launch settings, from benchmarks/burst_attention.py's sweep on an H200 (bf16, llama2-7b and llama3-8b heads, bursts
# of 1.7K rows at 8K keys and 6.9K at 32K; benchmarks/results/kernels/): 128 x 128 tiles and 8 warps, as its fastest
# setting, at 160-190 TFLOP/s of causal work, 4-5x SDPA's masked kernel and faster than FlexAttention.
BLOCK_M = 128  # query rows per program: BLOCK_M / Gp rows of each of the Gp heads that share a K/V head
BLOCK_N = 128  # keys per inner iteration, for a K or V tile of 32 KB (bf16, head size 128)
# Larger elements or heads shrink the tiles to these sizes: fp32 at head size 256 then holds a Q tile of 64 KB
# (64 rows) and K and V tiles of 32 KB (32 keys), 192 KB in all with two stages.
Q_TILE_BYTES = 64 * 1024
TILE_BYTES = 32 * 1024
NUM_WARPS = 8
# The sweep's fastest had 3 stages (5.49 ms against 6.62 at 32K), correct on its inputs, but inside the engine
# (queries from the model's projections, real bursts) 3 stages ran into an illegal memory access on the H200
# (Triton 3.6) and 2 stages did not (benchmarks/NOTES.md): 2 stages until a sweep over engine inputs says more.
NUM_STAGES = 2

# Integer arguments that change between calls (rows, lengths, group): compile once, not per value. The strides of
# q, K, V and the output are multiples of the head size and left to Triton to specialize, so that it loads in
# 16-byte vectors and pipelines the loads (split_attention says why).
_RUNTIME_INTS = ["s_ib", "s_lb", "s_hb", "HKV", "G", "R"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _burst_kernel(
    Q, K, V, IDX, LO, HI, O,
    s_qb, s_qh, s_qr,  # q: [B, H, R, dh]
    s_kb, s_kh, s_kt,  # k: [B, Hkv, P, dh]
    s_vb, s_vh, s_vt,  # v: [B, Hkv, P, dh]
    s_ib,  # idx: [B, T] int32
    s_lb, s_hb,  # lo, hi: [B, R] int32
    s_ob, s_oh, s_or,  # o: [B, H, R, dh]
    scaling, HKV, G, R,
    DH: tl.constexpr, GP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // HKV).to(tl.int64)  # batch offsets can pass 2^31 elements
    kvh = bh % HKV
    m = tl.arange(0, GP * BLOCK_R)  # packed row m: head g = m // BLOCK_R, row r of this block = m % BLOCK_R
    g = m // BLOCK_R
    r = tl.program_id(1) * BLOCK_R + m % BLOCK_R
    row_ok = (g < G) & (r < R)
    d = tl.arange(0, DH)
    q_rows = b * s_qb + (kvh * G + g) * s_qh + r * s_qr  # [Gp * BLOCK_R]
    q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    lo = tl.load(LO + b * s_lb + r, mask=row_ok, other=0)
    hi = tl.load(HI + b * s_hb + r, mask=row_ok, other=0)  # a padded row (hi <= lo) sees nothing
    real = lo < hi
    start = tl.min(tl.where(real, lo, 2**31 - 1), 0)  # the union of the block's ranges, tight in position order
    end = tl.max(tl.where(real, hi, 0), 0)
    m_i = tl.full([GP * BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([GP * BLOCK_R], tl.float32)
    acc = tl.zeros([GP * BLOCK_R, DH], tl.float32)
    k_base = K + b * s_kb + kvh * s_kh
    v_base = V + b * s_vb + kvh * s_vh
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        key_ok = j < end
        pos = tl.load(IDX + b * s_ib + j, mask=key_ok, other=0)  # [BLOCK_N] cache positions
        seen = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])  # [M, BLOCK_N]; j < hi implies key_ok
        m_i, l_i, acc = attend_keys(q, k_base, v_base, pos, key_ok, seen, s_kt, s_vt, d, scaling, m_i, l_i, acc, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # a row that saw nothing: 0
    o_rows = b * s_ob + (kvh * G + g) * s_oh + r * s_or
    tl.store(O + o_rows[:, None] + d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])


def burst_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
    scaling: float, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """q: [B, H, R, dh] (any strides); k, v: [B, Hkv, P, dh] a whole cache layer; idx: [B, T] int32, the
    positions of S_l first, ascending; lo, hi: [B, R] int32 -> [B, H, R, dh] in q's dtype.

    Row r of sequence b attends to keys idx[b, j] for lo[b, r] <= j < hi[b, r] (attention.listed_positions
    and row_ranges build them); a row with hi <= lo comes out 0. The output is laid out [B, R, H, dh] (a
    transposed view), so the caller's merge of the heads is free. Launch settings default to the module's
    constants."""
    B, H, R, dh = q.shape
    kv_heads = k.shape[1]
    group = H // kv_heads
    q, k, v, idx = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, idx))
    lo, hi = lo.contiguous(), hi.contiguous()
    gp = triton.next_power_of_2(group)
    block_r = max(1, (block_m or default_block_m(q.dtype, dh)) // gp)
    out = torch.empty(B, R, H, dh, device=q.device, dtype=q.dtype).transpose(1, 2)  # [B, H, R, dh]
    if R == 0:
        return out
    _burst_kernel[(B * kv_heads, triton.cdiv(R, block_r))](
        q, k, v, idx, lo, hi, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), idx.stride(0), lo.stride(0), hi.stride(0), out.stride(0), out.stride(1), out.stride(2),
        scaling, kv_heads, group, R,
        DH=dh, GP=gp, BLOCK_R=block_r, BLOCK_N=block_n or default_block_n(q.dtype, dh),
        IEEE=q.dtype == torch.float32, num_warps=num_warps or NUM_WARPS, num_stages=num_stages or NUM_STAGES,
    )
    return out


def default_block_m(dtype: torch.dtype, head_dim: int) -> int:
    """Query rows per program: BLOCK_M, fewer where a Q tile of them would outgrow Q_TILE_BYTES."""
    return max(16, min(BLOCK_M, Q_TILE_BYTES // (head_dim * dtype.itemsize)))


def default_block_n(dtype: torch.dtype, head_dim: int) -> int:
    """Keys per inner iteration: BLOCK_N, fewer where a K or V tile would outgrow TILE_BYTES."""
    return max(16, min(BLOCK_N, TILE_BYTES // (head_dim * dtype.itemsize)))


@functools.cache  # once a process: every engine builds its runner with it
def warm_up(dtype: torch.dtype, head_dim: int, group: int, device: torch.device) -> bool:
    """Compile for this dtype, head size and group before any CUDA graph capture (compiling while capturing
    is unsafe); one call covers every row count.

    False when the kernel does not fit this head size and dtype on this GPU (shared memory), or the head
    size is not a power of two (Triton's tiles are; the block sizes derived from it then are too): the
    caller then uses the written-out attention, which is exact but reads every key."""
    if head_dim & (head_dim - 1):
        logger.warning("burst attention needs a power-of-two head size, not %d: using the written-out attention",
                       head_dim)
        return False
    q = torch.zeros(1, group, 1, head_dim, device=device, dtype=dtype)
    k = torch.zeros(1, 1, 16, head_dim, device=device, dtype=dtype)
    zero = torch.zeros(1, 16, device=device, dtype=torch.int32)
    try:
        burst_attention(q, k, k, zero, zero[:, :1], zero[:, :1] + 1, 1.0)
    except OutOfResources as err:
        logger.warning("burst attention does not fit head size %d in %s (%s): using the written-out attention",
                       head_dim, dtype, err)
        return False
    return True

