"""How a batch's rows are laid out: packed for the row-wise work, padded for attention and selection.

Every sequence of a batch keeps a different number of tokens at every layer (pruning is per
sequence), so the engine packs the active rows of all sequences into one [N, ...] tensor, sequence
after sequence and each in original position order. Projections, norms and the MLP run on those
rows with no compute spent on padding. Attention and top-k selection need one sequence per batch
entry: `pad` scatters the rows into a right-padded [B, width, ...] block and `unpad` gathers them
back. When every sequence has the same count (batch 1, or equal prompts before any pruning) both
are free views.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class Packing:
    """`counts[b]` packed rows belong to sequence b; rows of sequence b are [ends[b] - counts[b], ends[b])."""

    def __init__(self, counts: Sequence[int], device: torch.device) -> None:
        c = np.asarray(counts, dtype=np.int64)
        self.counts: list[int] = c.tolist()
        self.batch = len(self.counts)
        self.ends = np.cumsum(c)  # [B], host
        self.total = int(self.ends[-1])
        self.width = int(c.max())
        self.uniform = bool((c == self.width).all())
        seq = np.repeat(np.arange(self.batch), c)
        slot = np.arange(self.total) - np.repeat(self.ends - c, c)
        index = upload(np.concatenate([seq, slot, self.ends - 1, c]), device)  # one host-to-device copy
        self.seq, self.slot, self.last, counts_dev = index.split([self.total, self.total, self.batch, self.batch])
        # seq, slot: [N] each row's sequence and index within it; last: [B] packed index of each
        # sequence's last row (meaningless for a sequence with no rows); last_slot: [B] its slot.
        self.last_slot = counts_dev - 1
        self.flat = self.seq * self.width + self.slot  # [N] index into a flattened [B, width] block
        arange = torch.arange(self.width, device=device)
        self.valid = None if self.uniform else arange[None, :] < counts_dev[:, None]  # [B, width], None: all

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, ...] packed rows -> [B, width, ...], zeros after each sequence's rows."""
        if self.uniform:
            return x.view(self.batch, self.width, *x.shape[1:])
        out = x.new_zeros(self.batch, self.width, *x.shape[1:])
        out[self.seq, self.slot] = x
        return out

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """y: [B, width, ...] -> [N, ...], the rows `pad` placed."""
        if self.uniform:
            return y.reshape(self.total, *y.shape[2:])
        return y[self.seq, self.slot]


def upload(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`, without making the host wait for queued GPU work."""
    t = torch.from_numpy(values)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
