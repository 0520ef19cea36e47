"""Preallocated K/V storage and the Aux Cache of a batch, with their bookkeeping, all on the device.

Legend: L layers, B sequences, Hkv key/value heads, dh head size, d hidden size, C capacity
(positions per sequence), P = C + 1 slots: slot C is a scratch slot that padded rows of a decoding
step write to and that nothing reads, so that static-shape kernels need no masked writes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .adapters import LlamaAdapter


class WriteCounter:
    """How many times K/V of (layer, sequence, position) was written, on the host (tests check <= 1).

    Waits for the device at every write: only for traced runs.
    """

    def __init__(self, num_layers: int, batch: int, capacity: int) -> None:
        self.capacity = capacity
        self.counts = np.zeros((num_layers, batch, capacity), dtype=np.int32)

    def __call__(self, layer: int, seq: torch.Tensor, pos: torch.Tensor) -> None:
        s, p = seq.cpu().numpy(), pos.cpu().numpy()
        real = p < self.capacity  # the scratch slot is not a position
        np.add.at(self.counts[layer], (s[real], p[real]), 1)


def _uncounted(layer: int, seq: torch.Tensor, pos: torch.Tensor) -> None:
    """The default: K/V writes are not counted."""


class LazyCache:
    """K/V for every (layer, sequence, position) up to `capacity`, plus one Aux Cache slot per token.

    `depth[b, i]` is the deepest layer whose K/V exists for token i of sequence b (-1: none), so the
    token has K/V at layer l exactly when l <= depth[b, i] (prefix-closed). `aux[b, i]` is the output
    of layer depth[b, i], the hidden state from which the token resumes at layer depth[b, i] + 1 if a
    later step selects it again.

    Allocation does not clear anything, so that the prefill's time does not grow with the room left
    for new tokens: `clear(...)` (called by `Engine.settle`, after the first token) sets depth and
    zeroes the K/V that decoding may read before it is written. Decoding attends over a whole block of
    positions and masks out what a sequence may not see, and masked-out garbage (NaN * 0) would
    still poison the sum.
    """

    def __init__(self, adapter: LlamaAdapter, batch: int, capacity: int, count_writes: bool = False) -> None:
        L, kv, dh = adapter.num_layers, adapter.num_kv_heads, adapter.head_dim
        dev, dt = adapter.device, adapter.dtype
        self.capacity = capacity
        self.scratch = capacity  # slot index of the scratch slot
        P = capacity + 1
        self.k = torch.empty(L, batch, kv, P, dh, device=dev, dtype=dt)  # [L, B, Hkv, P, dh]
        self.v = torch.empty(L, batch, kv, P, dh, device=dev, dtype=dt)  # [L, B, Hkv, P, dh]
        self.aux = torch.empty(batch, P, adapter.hidden_size, device=dev, dtype=dt)  # [B, P, d]
        self.depth_device = torch.empty(batch, P, device=dev, dtype=torch.int32)  # [B, P], set by `clear`
        self.length = np.zeros(batch, dtype=np.int64)  # tokens seen so far, per sequence (host)
        counter = WriteCounter(L, batch, capacity) if count_writes else None
        self.writes: np.ndarray | None = None if counter is None else counter.counts  # [L, B, C]
        self._count: Callable[[int, torch.Tensor, torch.Tensor], None] = counter or _uncounted

    @property
    def depth(self) -> np.ndarray:
        """[B, C] depth on the host (a copy; waits for the device)."""
        return self.depth_device[:, : self.capacity].cpu().numpy().copy()

    def write_kv(self, layer: int, seq: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V of rows (sequence `seq`, position `pos`: [n] each); k, v: [n, Hkv, dh]. The only K/V writer."""
        self.k[layer][seq, :, pos] = k
        self.v[layer][seq, :, pos] = v
        self._count(layer, seq, pos)

    def clear(self, prompt_lengths: list[int], dropped: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """After prefill: depth L-1 for the prompts, -1 past them, `layer` for each (layer, seq, pos) dropped;
        K/V zeroed past each prompt and above each dropped token's depth. Enqueued only: never waits."""
        L = self.k.shape[0]
        self.depth_device.fill_(-1)
        for b, n in enumerate(prompt_lengths):
            self.depth_device[b, :n] = L - 1
            self.k[:, b, :, n:] = 0
            self.v[:, b, :, n:] = 0
        for layer, seq, pos in dropped:
            self.depth_device[seq, pos] = layer
            self.k[layer + 1 :][:, seq, :, pos] = 0
            self.v[layer + 1 :][:, seq, :, pos] = 0
