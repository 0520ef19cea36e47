"""What a step did, per sequence: counts always (StepStats), token by token only when tracing (StepTrace).

Tracing is a recorder object the engine always calls; the default `Recorder` does nothing, so the
layer loops hold no `if trace` branch and the untraced path does no host work for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class StepStats:
    """Per-layer token counts of one sequence in one step (prefill or one decoding step)."""

    computed: list[int] = field(default_factory=list)  # rows that ran layer l
    candidates: list[int] = field(default_factory=list)  # |S_l|
    revived: list[int] = field(default_factory=list)  # rows resumed from the Aux Cache at layer l


@dataclass
class StepTrace:
    """What a step did to one sequence, token by token: recorded only when tracing (tests, `inspect`).

    Layers of one segment (between pruning layers) share one array object, so a step keeps
    O(pruning layers x tokens) host memory, not O(layers x tokens).
    """

    candidates: list[np.ndarray] = field(default_factory=list)  # S_l positions, per layer
    computed: list[np.ndarray] = field(default_factory=list)  # positions that ran layer l
    scores: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # l -> (pos, s)


class Recorder:
    """Receives what each step does and keeps nothing (the untraced default)."""

    def __init__(self) -> None:
        self.traces: list[list[StepTrace]] = []  # [sequence][step]

    def begin(self, seqs: list[int]) -> None:
        """A step of the sequences `seqs` starts."""

    def layers(self, n: int, cands: torch.Tensor, cand_ok: torch.Tensor | None, rows: torch.Tensor,
               row_ok: torch.Tensor | None) -> None:
        """The next n layers of this step attend over `cands` and run `rows`: [B, width] positions each,
        with [B, width] bool validity (None: all valid)."""

    def scores(self, layer: int, cands: torch.Tensor, cand_ok: torch.Tensor | None, s: torch.Tensor) -> None:
        """Importance s: [B, width] of the candidates [B, width] at a pruning layer."""

    def end(self) -> None:
        """The step is over."""


class TraceRecorder(Recorder):
    """Keeps a StepTrace per sequence and step, on the host (waits for the device at every call)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.traces = [[] for _ in range(batch)]
        self.seqs: list[int] = []
        self.step: list[StepTrace] = []

    def begin(self, seqs: list[int]) -> None:
        self.seqs, self.step = list(seqs), [StepTrace() for _ in seqs]

    def layers(self, n, cands, cand_ok, rows, row_ok) -> None:
        for tr, c, r in zip(self.step, _per_seq(cands, cand_ok, self.seqs), _per_seq(rows, row_ok, self.seqs)):
            tr.candidates += [c] * n
            tr.computed += [r] * n

    def scores(self, layer, cands, cand_ok, s) -> None:
        pos = _per_seq(cands, cand_ok, self.seqs)
        val = _per_seq(s, cand_ok, self.seqs)
        for tr, p, v in zip(self.step, pos, val, strict=True):
            tr.scores[layer] = (p, v)

    def end(self) -> None:
        for b, tr in zip(self.seqs, self.step, strict=True):
            self.traces[b].append(tr)


def _per_seq(x: torch.Tensor, ok: torch.Tensor | None, seqs: list[int]) -> list[np.ndarray]:
    """[B, width] (row b: sequence b) or [len(seqs), width] (row i: seqs[i], a step run on its sequences alone)
    -> the valid entries of each sequence in `seqs`, as host arrays."""
    x = x.cpu().numpy()
    ok = np.ones(x.shape, dtype=bool) if ok is None else ok.cpu().numpy()
    rows = range(len(seqs)) if x.shape[0] == len(seqs) else seqs
    return [x[r][ok[r]] for r in rows]
