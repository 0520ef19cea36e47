"""Preallocated K/V storage and the Aux Cache of a batch, with their bookkeeping.

Device tensors hold what the layers read (K/V, auxiliary hidden states); the host holds `depth`,
because every selection decision is bookkept there anyway and keeping it on the host lets decoding
build its index sets without a device round trip per layer.
"""

from __future__ import annotations

import numpy as np
import torch

from .adapters import LlamaAdapter


class LazyCache:
    """K/V for every (layer, sequence, position) up to `capacity`, plus one Aux Cache slot per token.

    `depth[b, i]` is the deepest layer whose K/V exists for token i of sequence b (-1: none), so the
    token has K/V at layer l exactly when l <= depth[b, i] (prefix-closed). `aux[b, i]` is the output
    of layer depth[b, i], the hidden state from which the token resumes at layer depth[b, i] + 1 if a
    later step selects it again.

    Every stored K/V entry is finite, written or zero: decoding attends over a whole [B, T] block and
    masks out what a sequence may not see, and masked-out garbage (NaN * 0) would still poison it. So
    the positions past each prompt are zeroed here, and `Engine.settle` zeroes the layers that a
    pruned prompt token never reached.
    """

    def __init__(
        self, adapter: LlamaAdapter, prompt_lengths: list[int], capacity: int, track_writes: bool = False
    ) -> None:
        L, kv, dh = adapter.num_layers, adapter.num_kv_heads, adapter.head_dim
        B, dev, dt = len(prompt_lengths), adapter.device, adapter.dtype
        self.capacity = capacity
        self.k = torch.empty(L, B, kv, capacity, dh, device=dev, dtype=dt)  # [L, B, Hkv, T, dh]
        self.v = torch.empty(L, B, kv, capacity, dh, device=dev, dtype=dt)  # [L, B, Hkv, T, dh]
        for b, n in enumerate(prompt_lengths):
            self.k[:, b, :, n:] = 0
            self.v[:, b, :, n:] = 0
        self.aux = torch.empty(B, capacity, adapter.hidden_size, device=dev, dtype=dt)  # [B, T, d]
        self.depth = np.full((B, capacity), -1, dtype=np.int32)  # [B, T], host
        self.length = np.zeros(B, dtype=np.int64)  # tokens seen so far, per sequence
        # writes[l, b, i]: how many times K/V of token i of sequence b at layer l was written (tests check <= 1).
        self.writes = np.zeros((L, B, capacity), dtype=np.int32) if track_writes else None

    def write_kv(self, layer: int, seq: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V of packed rows (sequence `seq`, position `pos`: [n] each); k, v: [n, Hkv, dh]."""
        self.k[layer][seq, :, pos] = k
        self.v[layer][seq, :, pos] = v

    def count_writes(self, layer: int, seq: np.ndarray, pos: np.ndarray) -> None:
        if self.writes is not None:
            np.add.at(self.writes[layer], (seq, pos), 1)
