"""Preallocated K/V storage and the Aux Cache, with their bookkeeping.

Device tensors hold what the layers read (K/V, auxiliary hidden states); the host holds `depth`,
because every selection decision is bookkept there anyway and keeping it on the host lets decoding
build its index sets without a device round trip per layer.
"""

from __future__ import annotations

import numpy as np
import torch

from .adapters import LlamaAdapter


class LazyCache:
    """K/V for every (layer, position) up to `capacity`, plus one Aux Cache slot per token.

    `depth[i]` is the deepest layer whose K/V exists for token i (-1: none), so token i has K/V at
    layer l exactly when l <= depth[i] (prefix-closed). `aux[i]` is the output of layer depth[i], the
    hidden state from which token i resumes at layer depth[i] + 1 if a later step selects it again.
    """

    def __init__(self, adapter: LlamaAdapter, capacity: int, track_writes: bool = False) -> None:
        L, kv, dh = adapter.num_layers, adapter.num_kv_heads, adapter.head_dim
        dev, dt = adapter.device, adapter.dtype
        self.capacity = capacity
        self.k = torch.empty(L, kv, capacity, dh, device=dev, dtype=dt)  # [L, Hkv, T, dh]
        self.v = torch.empty(L, kv, capacity, dh, device=dev, dtype=dt)  # [L, Hkv, T, dh]
        self.aux = torch.empty(capacity, adapter.hidden_size, device=dev, dtype=dt)  # [T, d]
        self.depth = np.full(capacity, -1, dtype=np.int32)  # [T], host
        self.length = 0  # tokens seen so far
        # writes[l, i]: how many times K/V of token i at layer l was written (tests check <= 1).
        self.writes = np.zeros((L, capacity), dtype=np.int32) if track_writes else None

    def write_kv(self, layer: int, pos: torch.Tensor | slice, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V of the rows at `pos` (an index tensor [n] or a slice); k, v: [Hkv, n, dh]."""
        if isinstance(pos, slice):
            self.k[layer, :, pos] = k
            self.v[layer, :, pos] = v
        else:
            self.k[layer].index_copy_(1, pos, k)
            self.v[layer].index_copy_(1, pos, v)

    def count_writes(self, layer: int, pos: np.ndarray) -> None:
        if self.writes is not None:
            self.writes[layer, pos] += 1
