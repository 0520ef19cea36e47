"""Token importance (the last token's attention row) and top-k percentile selection."""

from __future__ import annotations

import torch


def attention_row(q_last: torch.Tensor, k: torch.Tensor, scaling: float) -> torch.Tensor:
    """Importance of each candidate: q's post-softmax attention to it, averaged over query heads.

    Recomputed beside the main SDPA call (which never exposes probabilities) at O(H * n * dh) cost.
    q_last: [H, dh] post-RoPE query of the last token; k: [Hkv, n, dh] keys of the candidates.
    Returns s: [n] float32. GQA: each query head scores with its shared K/V head.
    """
    kv_heads, n, dh = k.shape
    q = q_last.view(kv_heads, -1, dh)  # [Hkv, H/Hkv, dh]
    logits = torch.matmul(q, k.transpose(1, 2)).float() * scaling  # [Hkv, H/Hkv, n]
    return logits.softmax(dim=-1).mean(dim=(0, 1))


def select(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split candidates into the `keep` best and the rest, both in original order, the last one kept.

    scores: [n] (the last candidate is the query token q). Returns (kept: [keep], dropped: [n-keep])
    as indices into the candidates. A full argsort gives both halves with host-known sizes, so
    prefill never waits for the device to learn which rows were dropped.
    """
    scores = scores.clone()
    scores[-1] = float("inf")
    order = torch.argsort(scores, descending=True, stable=True)
    return order[:keep].sort().values, order[keep:].sort().values


def random_scores(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Uniform scores for the `random` baseline: same keep counts, chosen blindly."""
    return torch.rand(n, generator=generator, device=device)
