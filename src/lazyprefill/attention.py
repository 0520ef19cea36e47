"""Which keys each attention row may see: causality and sliding windows, both by original position.

Pruning keeps original positions, so after a pruning layer a row's index says nothing about how far
back it may look: a sliding-window layer (Gemma 3, Mistral) lets a row at position p see keys in
(p - window, p] (transformers' `sliding_window_overlay`: `kv_idx > q_idx - window`), and the masks
here are built from positions, never from indices. Both functions return None when the plain
causal call is already exact, so full-attention layers and prompts shorter than the window keep
SDPA's unmasked kernels.

The Triton decoding kernels take the same sets as ranges of a list: S_l's positions in order
(listed_positions), of which a row sees a contiguous run (row_ranges), since the window and causality
both cut S_l by position.

Legend: B sequences, H query heads, Hkv key/value heads, W padded rows of a sequence, r rows of a
decoding step, T cached positions, dh head size.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

WINDOW_ROWS = 1024  # rows per call of a sliding-window layer's prefill (at least twice the window)
# SDPA's cuDNN kernel, the fastest on an H100 (0.94 against flash's 1.74 ms a layer at 8K tokens), builds a graph
# for every sequence length it meets: 45-70 ms and 1.4 MB of host memory each (H100, torch 2.11, cuDNN 9.19;
# benchmarks/NOTES.md, "Eleventh GPU session"). Every new prompt length paid it once per row count (a pruned prefill
# has two or more), and a server's memory grew with each. Causal rows are laid out in steps of this many instead:
# at most 255 padded rows, whose extra attention costs less than a build at every length up to 128K.
CAUSAL_ROWS_STEP = 256


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    window: int | None,
    longest: int,
    scaling: float,
    rows_per_call: int | None = None,
    bucket: bool | None = None,
) -> torch.Tensor:
    """Causal attention over a right-padded, compacted batch: q: [B, H, W, dh], k/v: [B, Hkv, W, dh] -> [B, H, W, dh].

    pos: [B, W] original position of each row (any value in padding); window: the layer's window or
    None; longest: the longest prompt (host int), so that no mask is built when the window cannot bite.
    Rows are in original order, so causality by index is causality by position; the window is not.
    bucket: lay the causal call's rows out in steps of CAUSAL_ROWS_STEP (default: on CUDA), so that SDPA's cuDNN
    kernel meets few lengths; the added rows come after every real one, which causality keeps them from seeing.

    A windowed layer runs in slices of `rows_per_call` rows (default: WINDOW_ROWS or twice the window),
    each against only the keys its window can reach: positions are distinct and increasing, so the row at
    index i sees at most `window` keys, the last of them itself, none before index i - window + 1. One
    call over all W keys would compute (and mask away) W^2 scores, and build a [B, W, W] mask: at 32K
    tokens that is most of Gemma 3's prefill, whose layers are five in six windowed.
    """
    if window is None or longest <= window:
        return causal_attention(q, k, v, scaling, q.is_cuda if bucket is None else bucket)
    W = pos.shape[1]
    step = rows_per_call or max(WINDOW_ROWS, 2 * window)
    out = torch.empty_like(q)
    index = torch.arange(W, device=pos.device)
    with masked_kernels(q):
        for start in range(0, W, step):
            end, lo = min(W, start + step), max(0, start - window + 1)
            causal = index[lo:end] <= index[start:end, None]  # [r, keys] by index
            in_window = pos[:, None, lo:end] > pos[:, start:end, None] - window  # [B, r, keys]; the diagonal is in
            mask = (causal & in_window)[:, None]
            out[:, :, start:end] = sdpa(q[:, :, start:end], k[:, :, lo:end], v[:, :, lo:end], attn_mask=mask,
                                        scale=scaling)
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, bucket: bool) -> torch.Tensor:
    """Causal SDPA, q: [B, H, W, dh], k/v: [B, Hkv, W, dh] -> [B, H, W, dh]; with `bucket`, over W rounded up to a
    multiple of CAUSAL_ROWS_STEP (zero rows added after the last, kept in the rows-major layout q/k/v come in)."""
    W = q.shape[2]
    extra = -W % CAUSAL_ROWS_STEP if bucket else 0
    if not extra:
        return sdpa(q, k, v, is_causal=True, scale=scaling)
    q, k, v = (F.pad(x.transpose(1, 2), (0, 0, 0, 0, 0, extra)).transpose(1, 2) for x in (q, k, v))
    return sdpa(q, k, v, is_causal=True, scale=scaling)[:, :, :W]


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """SDPA with grouped K/V (GQA): q: [B, H, W, dh], k/v: [B, Hkv, n, dh] -> [B, H, W, dh].

    Where no fused kernel takes grouped K/V (flash takes no fp32 and no mask, the memory-efficient kernel no GQA),
    SDPA falls back to its math path, which holds every [B, H, W, n] logit: a 43.6 GiB peak for Gemma 3 270M's
    prefill of 32,704 tokens in fp32 on an H100. There K/V are repeated per query head instead (n x dh per head),
    so that the memory-efficient kernel runs.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1 and not fused_gqa(q, attn_mask is not None):
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        group = 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=group > 1, **kwargs)


def masked_kernels(q: torch.Tensor) -> AbstractContextManager:
    """The SDPA kernels for masked attention whose shape changes from prompt to prompt (a continuation's rows against
    all it holds, a sliding-window layer's last slice). On CUDA in 16-bit types SDPA would choose cuDNN there, which
    builds a graph the first time it meets each shape, 80 ms to 1.9 s on an H100 against 0.7-1.6 ms for a 48-row call
    itself (benchmarks/results/profiles/sdpa-new-shapes-h100-2026-12-07b.md), so the memory-efficient kernel, which
    builds nothing, runs it. Entered once around a loop of calls: entering costs about 20 us of host time."""
    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]) if q.is_cuda else nullcontext()


def fused_gqa(q: torch.Tensor, masked: bool) -> bool:
    """Whether a fused SDPA kernel takes grouped K/V for q's device and dtype: on CUDA only flash attention, in
    16-bit types and without a mask; on the CPU its fused kernel, always."""
    return not q.is_cuda or (q.dtype in (torch.float16, torch.bfloat16) and not masked)


def decode_mask(in_s: torch.Tensor | None, rows: torch.Tensor, T: int, window: int | None) -> torch.Tensor | None:
    """The keys each row of a decoding step attends to: [B, r or 1, T] bool (True: attend), or None for all.

    in_s: [B, T] each sequence's candidate set S_l (None: every position); rows: [B, r] the original
    position of each row (q, then revived rows; any value in padding). More than one row needs
    causality by position; a window needs `key > position - window`, checked only when some
    position reaches it (T > window).
    """
    causal, windowed = rows.shape[1] > 1, window is not None and T > window
    if not (causal or windowed):
        return None if in_s is None else in_s[:, None]
    keys = torch.arange(T, device=rows.device)[None, None, :]  # [1, 1, T]
    rows = rows[:, :, None]  # [B, r, 1]
    mask = keys <= rows if causal else torch.ones_like(keys, dtype=torch.bool)
    if windowed:
        mask = mask & (keys > rows - window)
    return mask if in_s is None else mask & in_s[:, None]


def row_ranges(
    in_s: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, window: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """in_s: [B, T] bool S_l; rows: [B, r] positions (any value where padded); valid: [B, r] bool
    -> lo, hi: [B, r] int32, each row's range of listed_positions(in_s): the members in (p - window, p].
    A padded row gets lo = hi = 0 (nothing). Device ops only: no wait for the host."""
    cum = in_s.cumsum(1, dtype=torch.int32)  # [B, T] members at or before each position
    p = rows.clamp(0, in_s.shape[1] - 1)  # padded rows may point past T
    hi = torch.where(valid, cum.gather(1, p), 0)
    if window is None:
        return torch.zeros_like(hi), hi
    back = p - window  # the last position out of the window
    lo = torch.where(valid & (back >= 0), cum.gather(1, back.clamp(min=0)), 0)
    return lo, hi


def listed_positions(in_s: torch.Tensor) -> torch.Tensor:
    """in_s: [B, T] bool -> [B, T] int32 the positions of S_l first, ascending (the rest: 0, never read)."""
    B, T = in_s.shape
    slot = torch.where(in_s, in_s.cumsum(1) - 1, T)  # column T collects the non-members and is dropped
    listed = torch.zeros(B, T + 1, dtype=torch.int32, device=in_s.device)
    listed.scatter_(1, slot, torch.arange(T, dtype=torch.int32, device=in_s.device).expand(B, T))
    return listed[:, :T]
