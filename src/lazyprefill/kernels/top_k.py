"""A decoding step's selection without a sort: each sequence's keep[b] best candidates by a radix select.

decoding.top_k ranks the candidates with one stable sort over positions. On CUDA that sort is a CUB radix sort of
T (score, index) pairs, seven kernels (a histogram, a scan, four passes, the reverse indices) with the gathers,
running counts and scatter around it. A selection needs less than an order: only the key of the keep-th best
candidate. One program per sequence finds it digit by digit (four passes of 8 bits over the candidates' keys, each a
256-bin histogram of the digit among the candidates whose higher digits match those found so far), then keeps the
candidates above it and, of those equal to it, the earliest: the sort's tie order, so the set is the same. Under a
revival bound the same select first picks the allowance[b] best of the bounded candidates. One launch a pruning
layer. Imported only where Triton runs (CUDA, or its interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Candidates a program reads at once: a 32 KB tile of fp32 scores. Longer rows loop over tiles (nine sweeps: the
# bounded select's four passes, the keep count's four, the write).
BLOCK = 8192
NUM_WARPS = 16


@triton.jit
def _tile(S, MEM, ISQ, BND, row_s, row_m, row_q, row_b, j, ok, thr1, take1, seen1,
          PHASE: tl.constexpr, HAS_BOUND: tl.constexpr):
    """Tile j's keys ([0, 2^32), ordered as the scores, q's +inf) and which of its candidates the select of PHASE
    ranks (1: the bounded ones; 2: those the bound leaves, given phase 1's threshold thr1 and ties taken take1),
    with the count of bounded candidates tied at thr1 up to the tile's end (seen1 before it)."""
    x = tl.load(S + row_s + j, mask=ok, other=0.0)
    is_q = tl.load(ISQ + row_q + j, mask=ok, other=0) != 0
    bits = tl.where(is_q, float("inf"), x).to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(bits < 0, -1 - bits, bits + 2147483648)  # negative floats reversed below the positive ones
    inset = (tl.load(MEM + row_m + j, mask=ok, other=0) != 0) & ok
    if HAS_BOUND:
        bounded = (tl.load(BND + row_b + j, mask=ok, other=0) != 0) & inset
        if PHASE == 1:
            inset = bounded
        else:
            tie = bounded & (key == thr1)
            rank = seen1 + tl.cumsum(tie.to(tl.int32), 0)
            kept = (key > thr1) | (tie & (rank <= take1))
            inset = inset & ~(bounded & ~kept)
            seen1 += tl.sum(tie.to(tl.int32), 0)
    return key, inset, seen1


@triton.jit
def _select(S, MEM, ISQ, BND, row_s, row_m, row_q, row_b, T, k, thr1, take1,
            PHASE: tl.constexpr, HAS_BOUND: tl.constexpr, BLOCK: tl.constexpr):
    """The k best of PHASE's set as (thr, take): a candidate is kept when its key is above thr, or equal to it and
    among the first `take` such by position. All of the set when it has k or fewer; none when k <= 0."""
    offs = tl.arange(0, BLOCK)
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], tl.int64)  # the digits of the k-th key found so far
    need = k.to(tl.int64)  # how many of the candidates matching `prefix` are still to be kept
    total = tl.zeros([], tl.int32)
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], tl.int32)  # bin i: digit 255 - i, so the best come first
        seen1 = tl.zeros([], tl.int32)
        for start in range(0, T, BLOCK):
            j = start + offs
            key, inset, seen1 = _tile(S, MEM, ISQ, BND, row_s, row_m, row_q, row_b, j, j < T, thr1, take1, seen1,
                                      PHASE, HAS_BOUND)
            match = inset & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            digit = tl.where(match, 255 - ((key >> shift) & 255), 0).to(tl.int32)
            hist += tl.histogram(digit, 256)
            hist -= tl.where(bins == 0, tl.sum((~match).to(tl.int32), 0), 0)  # the others were counted in bin 0
        if p == 0:
            total = tl.sum(hist, 0)
        cum = tl.cumsum(hist, 0)
        above = tl.sum((cum < need).to(tl.int32), 0)  # bins wholly kept: the k-th is in the next one
        need -= tl.sum(tl.where(bins < above, hist, 0), 0)
        prefix += (255 - tl.minimum(above, 255)).to(tl.int64) << shift
    thr = tl.where(total <= k, -1, tl.where(k <= 0, 4294967296, prefix))
    take = tl.where((total <= k) | (k <= 0), 0, need)
    return thr, take


@triton.jit(do_not_specialize=["T", "s_s", "s_m", "s_q", "s_b", "s_o"])
def _top_k_kernel(
    S, MEM, ISQ, BND, KEEP, ALLOW, OUT,
    s_s, s_m, s_q, s_b, s_o,  # row strides of scores, in_s, is_q, bounded, out: [B, T], positions contiguous
    T, HAS_BOUND: tl.constexpr, BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row_s, row_m, row_q, row_b, row_o = b * s_s, b * s_m, b * s_q, b * s_b, b * s_o
    thr1 = tl.full([], -1, tl.int64)
    take1 = tl.zeros([], tl.int64)
    if HAS_BOUND:
        thr1, take1 = _select(S, MEM, ISQ, BND, row_s, row_m, row_q, row_b, T, tl.load(ALLOW + b), thr1, take1,
                              1, HAS_BOUND, BLOCK)
    thr, take = _select(S, MEM, ISQ, BND, row_s, row_m, row_q, row_b, T, tl.load(KEEP + b), thr1, take1,
                        2, HAS_BOUND, BLOCK)
    offs = tl.arange(0, BLOCK)
    seen1 = tl.zeros([], tl.int32)
    seen = tl.zeros([], tl.int32)
    for start in range(0, T, BLOCK):
        j = start + offs
        ok = j < T
        key, inset, seen1 = _tile(S, MEM, ISQ, BND, row_s, row_m, row_q, row_b, j, ok, thr1, take1, seen1,
                                  2, HAS_BOUND)
        tie = inset & (key == thr)
        rank = seen + tl.cumsum(tie.to(tl.int32), 0)
        tl.store(OUT + row_o + j, inset & ((key > thr) | (tie & (rank <= take))), mask=ok)
        seen += tl.sum(tie.to(tl.int32), 0)


def top_k(
    scores: torch.Tensor, in_s: torch.Tensor, is_q: torch.Tensor, keep: torch.Tensor,
    bounded: torch.Tensor | None = None, allowance: torch.Tensor | None = None, block: int | None = None,
) -> torch.Tensor:
    """decoding.top_k in one launch, the same set: scores [B, T] fp32; in_s, is_q, bounded [B, T] bool; keep,
    allowance [B] int64 -> [B, T] bool. `block`: candidates read at once (tests shrink it to cross tiles)."""
    B, T = scores.shape
    tensors = [scores, in_s, is_q, in_s if bounded is None else bounded]
    scores, in_s, is_q, bounded_or_in_s = (x if x.stride(1) == 1 else x.contiguous() for x in tensors)
    out = torch.empty(B, T, dtype=torch.bool, device=scores.device)
    _top_k_kernel[(B,)](
        scores, in_s, is_q, bounded_or_in_s, keep, keep if allowance is None else allowance, out,
        scores.stride(0), in_s.stride(0), is_q.stride(0), bounded_or_in_s.stride(0), out.stride(0), T,
        HAS_BOUND=bounded is not None, BLOCK=block or BLOCK, num_warps=NUM_WARPS,
    )
    return out
