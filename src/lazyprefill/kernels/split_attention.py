"""Decoding attention that reads only the candidates' K/V: a Triton split-K ("flash-decoding") kernel.

Legend: B sequences, H / Hkv query / key-value heads, G = H / Hkv, R query rows per sequence,
M = G x R rows per K/V head, T keys laid out, P cache slots, S splits, dh head size.

A decoding step has one or a few query rows per sequence, so a kernel that splits work by query rows
leaves most of the GPU idle. Here each sequence's candidate list is cut into S parts run by separate
programs (one program: one sequence, one K/V head, all M query rows of that head, one part of the
keys), and the parts are merged by their log-sum-exp. Keys are read through the list of S_l's
positions, so a pruned layer reads only its candidates' K/V; the list's length is read on the
device, so the launch has static shapes and can be captured in a CUDA graph. Logits and softmax are
fp32 (fp32 inputs: exact fp32 products, no tf32). Imported only on CUDA.
"""

from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

logger = logging.getLogger(__name__)

# Launch settings: the fastest correct ones of benchmarks/decode_attention.py's sweep on an H200 (bf16, llama2-7b
# and llama3-8b heads, 8K and 32K keys, 34-100% of them listed; benchmarks/results/kernels/): 2.9-4.1 TB/s of
# S_l's K/V for llama2's heads, as fast as SDPA's cuDNN kernel reading every key (benchmarks/NOTES.md).
BLOCK_N = 128  # keys per inner iteration, for a K or V tile of 32 KB (bf16, head size 128)
# Larger elements or heads take more shared memory per key (fp32 at 128 keys x 3 stages asked for 278 KB of
# the H100's 232 KB; Gemma 3's fp32 head of 256 at 64 keys for 296 KB): keys per iteration shrink to keep
# one tile at this size.
TILE_BYTES = 128 * 128 * 2
PROGRAMS_PER_SM = 2
MAX_SPLITS = 64  # parts per (sequence, head): one block size in the merge, so it compiles once
NUM_WARPS = 4
NUM_STAGES = 2
MERGE_KERNEL = True  # merge the parts in one Triton launch: 16-24 us a layer less than ~7 torch kernels (sweep)

# Integer arguments that change between calls (rows, splits, lengths): compile once, not per value. The strides
# of q, K, V and the parts are left to Triton, which specializes them as multiples of 16 (they are multiples of
# the head size): that lets it load K and V in 16-byte vectors through cp.async and pipeline them. Unspecialized
# (as before), every element was a 2-byte scalar load and no load was pipelined (the PTX for sm_90 shows it).
_RUNTIME_INTS = ["s_ib", "s_pb", "s_lb", "s_lh", "s_ls", "HKV", "G", "M", "R", "n_splits"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _split_kernel(
    Q, K, V, IDX, NS, QPOS, O, LSE,
    s_qb, s_qg, s_qr,  # q: [B, H, R, dh] in any layout whose dh is contiguous; M's row g * R + r is head kvh * G + g
    s_kb, s_kh, s_kt,  # k: [B, Hkv, P, dh]
    s_vb, s_vh, s_vt,  # v: [B, Hkv, P, dh]
    s_ib,  # idx: [B, T] int32
    s_pb,  # qpos: [B, R] int32
    s_ob, s_oh, s_os, s_om,  # o: [B, Hkv, S, M, dh] fp32
    s_lb, s_lh, s_ls,  # lse: [B, Hkv, S, M] fp32
    scaling, HKV, G, M, R, n_splits,
    DH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    kvh = bh % HKV
    n = tl.load(NS + b)  # |S_l| of sequence b
    per = tl.cdiv(tl.cdiv(n, n_splits), BLOCK_N) * BLOCK_N
    start = split * per
    end = tl.minimum(start + per, n)
    rows = tl.arange(0, BLOCK_M)
    d = tl.arange(0, DH)
    row_ok = rows < M
    head, r = kvh * G + rows // R, rows % R  # [BLOCK_M] each row's query head and step row
    q = tl.load(Q + b * s_qb + head[:, None] * s_qg + r[:, None] * s_qr + d[None, :], mask=row_ok[:, None], other=0.0)
    qpos = tl.load(QPOS + b * s_pb + rows % R, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DH], tl.float32)
    k_base = K + b * s_kb + kvh * s_kh
    v_base = V + b * s_vb + kvh * s_vh
    for j0 in range(start, end, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        key_ok = j < end
        pos = tl.load(IDX + b * s_ib + j, mask=key_ok, other=0)
        seen = key_ok[None, :] & (pos[None, :] <= qpos[:, None])  # [BLOCK_M, BLOCK_N]
        m_i, l_i, acc = attend_keys(q, k_base, v_base, pos, key_ok, seen, s_kt, s_vt, d, scaling, m_i, l_i, acc, IEEE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # an empty part: 0, and weight 0 in the merge
    tl.store(O + b * s_ob + kvh * s_oh + split * s_os + rows[:, None] * s_om + d[None, :], out,
             mask=row_ok[:, None])
    tl.store(LSE + b * s_lb + kvh * s_lh + split * s_ls + rows, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def attend_keys(q, k_base, v_base, pos, key_ok, seen, s_kt, s_vt, d, scaling, m_i, l_i, acc, IEEE: tl.constexpr):
    """One block of keys (cache positions `pos`) into the online softmax of rows q: [M, dh]: K and V gathered
    through the positions, fp32 logits masked by `seen` [M, BLOCK_N], running max m_i, sum l_i and output acc
    rescaled. Shared by this module's kernel and burst_attention's."""
    k = tl.load(k_base + pos[:, None] * s_kt + d[None, :], mask=key_ok[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(seen, s * scaling, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet stays empty
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + pos[:, None] * s_vt + d[None, :], mask=key_ok[:, None], other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["s_lb", "s_lh", "s_ls", "HKV", "G", "M", "R", "n_splits"])
def _merge_kernel(
    O, LSE, OUT,
    s_ob, s_oh, s_os, s_om,  # o: [B, Hkv, S, M, dh] fp32
    s_lb, s_lh, s_ls,  # lse: [B, Hkv, S, M] fp32
    s_xb, s_xg, s_xr,  # out: [B, H, R, dh] in the model's dtype, any layout whose dh is contiguous
    HKV, G, M, R, n_splits,
    DH: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)  # one (sequence, K/V head, row)
    m = pid % M
    b = pid // M // HKV
    kvh = pid // M % HKV
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, DH)
    lse = tl.load(LSE + b * s_lb + kvh * s_lh + s * s_ls + m, mask=s < n_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))  # parts that saw nothing weigh 0
    o = tl.load(O + b * s_ob + kvh * s_oh + s[:, None] * s_os + m * s_om + d[None, :], mask=(s < n_splits)[:, None],
                other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(OUT + b * s_xb + (kvh * G + m // R) * s_xg + (m % R) * s_xr + d, out.to(OUT.dtype.element_ty))


def split_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, n_s: torch.Tensor, qpos: torch.Tensor,
    scaling: float, block_n: int | None = None, programs_per_sm: int | None = None, num_warps: int | None = None,
    num_stages: int | None = None, merge_kernel: bool | None = None,
) -> torch.Tensor:
    """q: [B, H, R, dh]; k, v: [B, Hkv, P, dh] a whole cache layer; idx: [B, T] int32, the positions of S_l
    first (n_s[b] of them, in any order); n_s: [B] int32; qpos: [B, R] int32 each row's position
    -> [B, H, R, dh]. A row attends to the listed positions at or before its own. Launch settings
    default to the module's constants.

    q is read through its strides and, with the merge kernel (the default), the output is a [B, H, R, dh] view of
    a [B, R, H, dh] tensor: a decoding step's rows come out of the projections as [B, R, H, dh] and go back in that
    layout, so that with several rows neither side needs a copy (two a layer before, 44 us a step at 8 rows on an
    H100)."""
    block_n = block_n or default_block_n(q.dtype, q.shape[-1])
    programs_per_sm = programs_per_sm or PROGRAMS_PER_SM
    num_warps, num_stages = num_warps or NUM_WARPS, num_stages or NUM_STAGES
    merge_kernel = MERGE_KERNEL if merge_kernel is None else merge_kernel
    B, H, R, dh = q.shape
    kv_heads = k.shape[1]
    G = H // kv_heads
    M = G * R
    if q.stride(-1) != 1:
        q = q.contiguous()
    programs = programs_per_sm * _sms(q.device)
    splits = max(1, min(triton.cdiv(idx.shape[1], block_n), triton.cdiv(programs, B * kv_heads), MAX_SPLITS))
    o = torch.empty(B, kv_heads, splits, M, dh, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, kv_heads, splits, M, device=q.device, dtype=torch.float32)
    _split_kernel[(B * kv_heads, splits)](
        q, k, v, idx, n_s, qpos, o, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), idx.stride(0),
        qpos.stride(0), o.stride(0), o.stride(1), o.stride(2), o.stride(3), lse.stride(0), lse.stride(1),
        lse.stride(2), scaling, kv_heads, G, M, R, splits,
        DH=dh, BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if not merge_kernel:
        weight = torch.exp(lse - lse.amax(dim=2, keepdim=True))  # [B, Hkv, S, M]
        out = (o * weight[..., None]).sum(2) / weight.sum(2)[..., None]  # [B, Hkv, M, dh]
        return out.to(q.dtype).view(B, H, R, dh)
    out = torch.empty(B, R, H, dh, device=q.device, dtype=q.dtype).transpose(1, 2)  # [B, H, R, dh]
    _merge_kernel[(B * kv_heads * M,)](
        o, lse, out, o.stride(0), o.stride(1), o.stride(2), o.stride(3), lse.stride(0), lse.stride(1), lse.stride(2),
        out.stride(0), out.stride(1), out.stride(2), kv_heads, G, M, R, splits,
        DH=dh, BLOCK_S=MAX_SPLITS, num_warps=4,
    )
    return out


def default_block_n(dtype: torch.dtype, head_dim: int) -> int:
    """Keys per inner iteration: BLOCK_N, fewer where a tile of them would outgrow TILE_BYTES."""
    return max(16, min(BLOCK_N, TILE_BYTES // (head_dim * dtype.itemsize)))


@functools.cache  # once a process: every engine builds its runner with it
def warm_up(dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    """Compile every row-block size before any CUDA graph capture (compiling while capturing is unsafe).

    False when the kernel does not fit this head size and dtype on this GPU (shared memory), or the head
    size is not a power of two (Triton's tiles are): the caller then uses the written-out attention, which
    is exact but reads every key."""
    if head_dim & (head_dim - 1):
        logger.warning("split-K decoding attention needs a power-of-two head size, not %d: "
                       "using the written-out attention", head_dim)
        return False
    for m in (16, 32, 64, 128):
        q = torch.zeros(1, 1, m, head_dim, device=device, dtype=dtype)
        k = torch.zeros(1, 1, 256, head_dim, device=device, dtype=dtype)
        idx = torch.zeros(1, 256, device=device, dtype=torch.int32)
        try:
            split_attention(q, k, k, idx, torch.ones(1, device=device, dtype=torch.int32),
                            torch.zeros(1, m, device=device, dtype=torch.int32), 1.0)
        except OutOfResources as err:
            logger.warning("split-K decoding attention does not fit head size %d in %s (%s): "
                           "using the written-out attention", head_dim, dtype, err)
            return False
    return True


_SMS: dict[int, int] = {}


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # Triton's interpreter on the CPU: no SMs to count; a few programs still split the keys
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]
