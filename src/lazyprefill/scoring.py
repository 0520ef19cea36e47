"""Token importance (the last token's attention row) and top-k percentile selection, per sequence."""

from __future__ import annotations

import numpy as np
import torch

from .packing import Packing, upload


def attention_row(
    q_last: torch.Tensor, k: torch.Tensor, scaling: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Importance of each key: q's post-softmax attention to it, averaged over query heads.

    Recomputed beside the main SDPA call (which never exposes probabilities) at O(H * n * dh) cost.
    q_last: [B, H, dh] post-RoPE query of each sequence's last token; k: [B, Hkv, n, dh] its keys;
    valid: [B, n] bool, the keys each sequence may attend to (None: all). Returns s: [B, n] float32,
    a softmax over each sequence's own keys only: never mixed across the batch. GQA: each query head
    scores with its shared K/V head.
    """
    B, kv_heads, _, dh = k.shape
    q = q_last.view(B, kv_heads, -1, dh)  # [B, Hkv, H/Hkv, dh]
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * scaling  # [B, Hkv, H/Hkv, n]
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=(1, 2))


def select(scores: torch.Tensor, rows: Packing, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep[b]` best candidates of each sequence b (its last one, q, always kept).

    scores: [B, width] padded as `rows.pad` lays them out. Returns (kept, dropped) as packed row
    indices, each in packed order (sequence, then original position). Sizes are known on the host,
    so prefill never waits for the device to learn which rows were dropped.
    """
    B, width = scores.shape
    s = scores.clone()
    s.scatter_(1, rows.last_slot.clamp(min=0)[:, None], float("inf"))
    if rows.valid is not None:
        s.masked_fill_(~rows.valid, float("-inf"))
    order = torch.argsort(s, dim=1, descending=True, stable=True)  # [B, width]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=s.device).expand(B, width))
    limit = upload(np.asarray(keep, dtype=np.int64), s.device)
    kept = (rank < limit[:, None]).view(-1)[rows.flat]  # [N] bool, packed order
    split = torch.argsort((~kept).to(torch.uint8), stable=True)  # kept rows first, both halves in packed order
    n_kept = sum(keep)
    return split[:n_kept], split[n_kept:]


def random_scores(counts: list[int], generators: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """Uniform scores for the `random` baseline, packed [N]: each sequence draws from its own generator."""
    return torch.cat([torch.rand(n, generator=g, device=device) for n, g in zip(counts, generators, strict=True) if n])
