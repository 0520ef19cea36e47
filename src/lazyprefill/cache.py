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


def kv_rows(seq: torch.Tensor, pos: torch.Tensor, kv_heads: int, slots: int) -> torch.Tensor:
    """LazyCache.kv_index for a cache of `kv_heads` K/V heads and `slots` slots a sequence (a function of sizes
    alone, so that decoding's compiled row layout, decoding.segment_rows, computes it in the same kernels)."""
    heads = torch.arange(kv_heads, device=seq.device)  # [Hkv]
    return ((seq[:, None] * kv_heads + heads) * slots + pos[:, None]).reshape(-1)


class LazyCache:
    """K/V for every (layer, sequence, position) up to `capacity`, plus one Aux Cache slot per token.

    `depth[b, i]` is the deepest layer whose K/V exists for token i of sequence b (-1: none), so the
    token has K/V at layer l exactly when l <= depth[b, i] (prefix-closed). `aux[b, i]` is the output
    of layer depth[b, i], the hidden state from which the token resumes at layer depth[b, i] + 1 if a
    later step selects it again.

    Decoding's written-out attention reads a whole block of positions [0, T) and masks out what a sequence
    may not see, and masked-out garbage from `torch.empty` (NaN * 0) would still poison the sum. So positions
    below `clean` hold finite values in every slot and layer (zeros, or K/V some sequence wrote), and
    `ensure_clean(T)` zeroes the block [clean, T) before anything reads or writes it: as T grows with the
    sequences, in chunks, so that neither allocation nor a prefill costs time for the room left for new tokens.
    The slots are reused from one generation to the next; a slot's new sequence overwrites what it reads.
    """

    def __init__(self, adapter: LlamaAdapter, batch: int, capacity: int, count_writes: bool = False) -> None:
        L, kv, dh = adapter.num_layers, adapter.num_kv_heads, adapter.head_dim
        dev, dt = adapter.device, adapter.dtype
        self.capacity = capacity
        self.batch = batch
        self.scratch = capacity  # slot index of the scratch slot
        self.clean = 0  # positions [0, clean) are finite in every slot and layer
        P = capacity + 1
        # K and V in one tensor, so that a decoding step stores a layer's K and V in one copy (write_kv_pair)
        self.kv = torch.empty(2, L, batch, kv, P, dh, device=dev, dtype=dt)  # [2, L, B, Hkv, P, dh]
        self.k, self.v = self.kv[0], self.kv[1]  # [L, B, Hkv, P, dh] each
        self.aux = torch.empty(batch, P, adapter.hidden_size, device=dev, dtype=dt)  # [B, P, d]
        self.depth_device = torch.empty(batch, P, device=dev, dtype=torch.int32)  # [B, P], set by `settle`
        self.length = np.zeros(batch, dtype=np.int64)  # tokens seen so far, per sequence (host)
        counter = WriteCounter(L, batch, capacity) if count_writes else None
        self.writes: np.ndarray | None = None if counter is None else counter.counts  # [L, B, C]
        self._count: Callable[[int, torch.Tensor, torch.Tensor], None] = counter or _uncounted

    @property
    def depth(self) -> np.ndarray:
        """[B, C] depth on the host (a copy; waits for the device)."""
        return self.depth_device[:, : self.capacity].cpu().numpy().copy()

    def kv_index(self, seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[n * Hkv] the rows of one layer's K/V, viewed as [B * Hkv * P, dh], that rows (seq, pos) ([n] each) write,
        head by head: computed once for a set of rows and handed to `write_kv` at every layer."""
        return kv_rows(seq, pos, self.k.shape[2], self.k.shape[3])

    def write_kv(self, layer: int, seq: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 index: torch.Tensor | None = None) -> None:
        """Store K/V of rows (sequence `seq`, position `pos`: [n] each); k, v: [n, Hkv, dh]; `index`: kv_index(seq,
        pos), if already made. With write_kv_pair, the only K/V writers.

        An index_copy_ over the flattened rows rather than `k[layer][seq, :, pos] = k`: that index_put_ took 3.7 us a
        write against 2.5 (H100, a dense step's 64 writes: 237 against 162 us; benchmarks/NOTES.md, "Decoding steps,
        fourth GPU session")."""
        index = self.kv_index(seq, pos) if index is None else index
        dh = self.k.shape[-1]
        self.k[layer].view(-1, dh).index_copy_(0, index, k.reshape(-1, dh))
        self.v[layer].view(-1, dh).index_copy_(0, index, v.reshape(-1, dh))
        self._count(layer, seq, pos)

    def write_kv_pair(self, layer: int, seq: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor,
                      index: torch.Tensor | None = None) -> None:
        """write_kv for K and V stacked (kv: [2, n, Hkv, dh], as a compiled decoding step makes them), in one
        index_copy_: a decoding step's 2 x layers K/V writes were its largest item after the GEMMs and attention
        (170 us of 64 launches a step at 8K on an H100; benchmarks/NOTES.md, "Decoding steps, fifth GPU session")."""
        index = self.kv_index(seq, pos) if index is None else index
        dh = self.k.shape[-1]
        self.kv[:, layer].view(2, -1, dh).index_copy_(1, index, kv.view(2, -1, dh))
        self._count(layer, seq, pos)

    def ensure_clean(self, positions: int) -> None:
        """Zero K/V at positions [clean, positions) of every slot and layer, which no sequence has written: a
        slot's length never passes `clean` before this is called for it. Enqueued only: never waits."""
        if positions <= self.clean:
            return
        self.kv[:, :, :, :, self.clean : positions] = 0
        self.clean = positions

    def reserve(self) -> None:
        """Write every page of K/V and Aux Cache now. A server's slots then hold their memory from the start: on the
        CPU, `torch.empty` pages become resident only when first written, so a server's memory would otherwise grow
        whenever a slot or a position is used for the first time (two 30-minute soaks grew 9.7% and 13.5% this
        way). Enqueued only: never waits."""
        self.ensure_clean(self.capacity + 1)
        self.aux.zero_()

    def settle(self, slots: list[int], prompt_lengths: list[int],
               dropped: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """After a prefill into `slots`: depth L-1 for their prompts, -1 past them, `layer` for each (layer, slot,
        position) dropped. K/V above a dropped token's depth is below `clean`, so finite. Never waits."""
        L = self.k.shape[0]
        for b, n in zip(slots, prompt_lengths, strict=True):
            self.depth_device[b] = -1
            self.depth_device[b, :n] = L - 1
        for layer, seq, pos in dropped:
            self.depth_device[seq, pos] = layer
