"""Which keys each attention row may see: causality and sliding windows, both by original position.

Pruning keeps original positions, so after a pruning layer a row's index says nothing about how far
back it may look: a sliding-window layer (Gemma 3, Mistral) lets a row at position p see keys in
(p - window, p] (transformers' `sliding_window_overlay`: `kv_idx > q_idx - window`), and the masks
here are built from positions, never from indices. Both functions return None when the plain
causal call is already exact, so full-attention layers and prompts shorter than the window keep
SDPA's unmasked kernels.

Legend: B sequences, H query heads, Hkv key/value heads, W padded rows of a sequence, r rows of a
decoding step, T cached positions, dh head size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    window: int | None,
    longest: int,
    scaling: float,
) -> torch.Tensor:
    """Causal attention over a right-padded, compacted batch: q: [B, H, W, dh], k/v: [B, Hkv, W, dh] -> [B, H, W, dh].

    pos: [B, W] original position of each row (any value in padding); window: the layer's window or
    None; longest: the longest prompt (host int), so that no mask is built when the window cannot bite.
    Rows are in original order, so causality by index is causality by position; the window is not.
    """
    gqa = q.shape[1] != k.shape[1]
    if window is None or longest <= window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
    W = pos.shape[1]
    causal = torch.ones(W, W, dtype=torch.bool, device=pos.device).tril()  # [W, W] by index
    in_window = pos[:, None, :] > pos[:, :, None] - window  # [B, W (rows), W (keys)]
    mask = (causal & in_window)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)


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
