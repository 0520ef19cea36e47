"""Host decisions of a decoding step: which layers run together, how many rows and keys to lay out.

No torch here (nano-vllm's split): the device side (decoding.py) runs what this plans, with shapes
fixed by it, so that each piece can be captured as a CUDA graph and replayed.

Why segments: at the start of a step `depth` holds -1 (not yet computed), a pruning layer index or
L-1, because a token stops only where it is dropped or at the last layer. So new rows can enter only
at layer 0 (q) and right after a pruning layer p (tokens reselected whose depth is p); between those
layers the rows that run are fixed. A step is therefore a few segments of layers, each run on one
row set, and only a segment's first layer needs a decision about rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schedule import Schedule


@dataclass(frozen=True)
class Segment:
    """Layers first..last run on one row set; `prunes`: `last` is a pruning layer (it selects after running)."""

    first: int
    last: int
    prunes: bool

    @property
    def layers(self) -> range:
        return range(self.first, self.last + 1)


def segments(num_layers: int, pruning_layers: list[int]) -> list[Segment]:
    """Split 0..L-1 after every pruning layer: {3, 7} over 10 layers -> 0-3, 4-7, 8-9."""
    cuts = sorted(pruning_layers)
    starts = [0] + [p + 1 for p in cuts]
    ends = [*cuts, num_layers - 1]
    return [Segment(s, e, e in cuts) for s, e in zip(starts, ends, strict=True)]


# Rows per sequence that a segment lays out: few sizes, so that few CUDA graphs are captured; small ones
# close together because a step usually revives few rows, and a projection of 32 rows costs what 1 costs
# (the weights dominate the bytes read).
ROW_BUCKETS = (1, 8, 32, 128, 512)
# More rows than this in a segment run eagerly at their exact count (engine.decode): no bucket, no graph.
GRAPH_MAX_ROWS = ROW_BUCKETS[-1]


def row_bucket(n: int) -> int:
    """The smallest bucket holding n rows: ROW_BUCKETS, then powers of two."""
    for size in ROW_BUCKETS:
        if n <= size:
            return size
    return 1 << (n - 1).bit_length()


def layout_rows(n: int, keys: int, buckets: bool = True) -> int:
    """Rows per sequence a segment lays out for n entering: a bucket, no larger than `keys` (only positions
    below it can enter), or n itself for a burst (over GRAPH_MAX_ROWS), which runs eagerly at its exact size.
    Buckets exist so that few CUDA graphs serve many steps; without graphs (`buckets=False`) every segment runs
    at its exact size, since padding costs compute there (on the CPU `paper` decoded 93 -> 75 ms/token)."""
    if not buckets:
        return max(n, 1)
    return n if n > GRAPH_MAX_ROWS else min(row_bucket(n), keys)


# A revival bound (scoring.Revive) of up to this many rows lays every segment after a pruning layer out at the bound,
# so that a step reads no count from the device mid-step: up to 32 rows cost about what one costs (the weights
# dominate the bytes a segment reads). A larger bound waits for the count and lays out what enters.
BOUNDED_MAX_ROWS = 32


def waits_mid_step(schedule: Schedule) -> bool:
    """Whether a decoding step must learn from the device how many rows enter a segment: only after a pruning
    layer that reselects (otherwise only q enters)."""
    return bool(schedule.keep) and schedule.scorer.reselects


def key_length(n_keys: int, capacity: int) -> int:
    """Keys a step attends over: n_keys rounded up to a multiple of ~1/16 of it (at least 256), within capacity.

    Rounding keeps a captured graph valid for many steps (its shapes include this length) at the cost
    of at most ~6% more keys read; the keys past each sequence's length are masked out.
    """
    grain = max(256, 1 << max(n_keys.bit_length() - 5, 0))
    return min(capacity, -(-n_keys // grain) * grain)


@dataclass
class StepPlan:
    """What the host knows about a decoding step before running it (B: sequences of the batch).

    t: [B] position of each sequence's q (its length before the step); active: [B] bool, the
    sequences that take a step; sizes: [B, L] |S_l| of each active sequence (0 for the others);
    keep: [n_pruning, B] |S| after each pruning layer; keys: positions attended, [0, keys).
    """

    t: np.ndarray
    active: np.ndarray
    sizes: np.ndarray
    keep: np.ndarray
    keys: int


def plan_step(
    schedule: Schedule,
    reselects: bool,
    lengths: np.ndarray,
    seqs: list[int],
    num_layers: int,
    capacity: int,
    prefill_sizes: np.ndarray,
    prompt_lengths: np.ndarray,
    pruned: np.ndarray,
) -> StepPlan:
    """Candidate-set sizes follow from the lengths alone, so the host knows them without asking the device.

    pruned: [B] False for a sequence whose prompt is below the schedule's `min_prompt_tokens`: it keeps every token.
    Reselecting: |S_0| = t + 1 and each pruning layer keeps ceil(r |S_l|). Otherwise (prefill-only
    pruning) S_l is the tokens whose K/V at l exists plus q: the prompt tokens prefill kept up to l
    (`prefill_sizes[b, l]`, q's predecessor included) and every generated token.
    """
    B = lengths.shape[0]
    active = np.zeros(B, dtype=bool)
    active[seqs] = True
    t = lengths.copy()
    sizes = np.zeros((B, num_layers), dtype=np.int64)
    pruning = list(schedule.keep)
    keep = np.zeros((len(pruning), B), dtype=np.int64)
    for b in seqs:
        if not pruned[b]:  # a prompt below the schedule's min_prompt_tokens runs dense: nothing is dropped
            sizes[b] = t[b] + 1
        elif reselects:
            n = int(t[b]) + 1
            for l in range(num_layers):
                sizes[b, l] = n
                if l in schedule.keep:
                    n = schedule.kept_count(l, n)
        else:
            sizes[b] = prefill_sizes[b] + (t[b] - prompt_lengths[b]) + 1
        keep[:, b] = [sizes[b, p + 1] for p in pruning]
    return StepPlan(t=t, active=active, sizes=sizes, keep=keep, keys=key_length(int(t[seqs].max()) + 1, capacity))
