"""The layer loop: LazyLLM prefill and decoding steps over a batch of sequences.

Every sequence has its own candidate sets, Aux Cache slots and revivals; the batch shares kernel
launches, never a selection. Rows are packed (packing.py): projections, norms and the MLP run on
exactly the rows each sequence needs, and attention sees one right-padded sequence per batch entry.

Prefill runs compacted: after a pruning layer only each sequence's survivors go on, in original
order and with original position ids. Right padding keeps every layer one plain causal SDPA call on
its fast kernels: with is_causal=True a real row only sees keys at or before its own index, which
are all real, so no mask is needed, and the padded rows' outputs are thrown away. We pad rather
than call a variable-length kernel because SDPA has none (on CPU or GPU) and a masked call would
lose the flash kernel; the padding costs attention work only, never MLP work.

A decoding step runs only the rows that enter each layer (each sequence's new token q plus its
tokens revived from the Aux Cache) against the K/V of that sequence's candidate set S_l. Its
selection state (depth, S_l membership) stays on the device; the host plans (plan.py) and the
device runs a few segments of layers with static shapes (decoding.py), replayed as CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import torch
from torch.nn.attention import SDPBackend

from .adapters import LlamaAdapter
from .attention import prefill_attention
from .cache import LazyCache
from .decoding import Graphs, SegmentRunner, eager
from .env import triton_runs_on
from .packing import Packing
from .plan import (
    GRAPH_MAX_ROWS,
    StepPlan,
    first_overflow,
    guess_rows,
    layout_rows,
    plan_step,
    segments,
    waits_mid_step,
)
from .recording import Recorder, StepStats, StepTrace, TraceRecorder
from .schedule import Schedule
from .scoring import ScoreInput, select

__all__ = ["DECODE_ATTENTION", "DecodeOptions", "Engine", "StepStats", "StepTrace"]

# Decoding calls SDPA only for bursts of revived rows, with the kernel choice scoped to the call
# (decoding._sdpa_attention). `bench` uses this order for transformers
# `generate`: cuDNN attention, SDPA's first choice on Hopper, plans a new graph per key length (~1.3 ms of
# host time per call, measured on an H100), so flash attention first (benchmarks/NOTES.md).
DECODE_ATTENTION = [
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH
]


@dataclass(frozen=True)
class DecodeOptions:
    """How decoding steps run. Every choice computes the same thing (SPEC.md) up to floating-point rounding;
    they differ in speed. A default of None is what measured fastest on the device kind; an option still
    False by default is not yet timed on a GPU (benchmarks/NOTES.md).

    graphs: replay segments as CUDA graphs (default: on CUDA unless tracing, whose recorder reads the
        device mid-step). split_kernel: the Triton kernel that reads only S_l's K/V for a few rows per
        sequence (default: on CUDA); otherwise the written-out masked attention over every position.
    burst_kernel: many rows (revival bursts) through the Triton flash kernel over S_l's positions with
        per-row key ranges, instead of SDPA with an [R, T] mask (CUDA); off until it is timed on a GPU.
    speculate: lay out a step's segments before their row counts are known, so that the host waits once a
        step, not once per pruning layer that reselects (where a wait idles the GPU); off until timed.
    compile: the layer halves of decoding steps through torch.compile (decoding.CompiledLayers), fusing the
        small kernels that a step's many short layers launch; off until timed.
    """

    graphs: bool | None = None
    split_kernel: bool | None = None
    burst_kernel: bool = False
    speculate: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value, by_device = getattr(self, f.name), f.default is None
            if not (isinstance(value, bool) or (by_device and value is None)):
                allowed = "True, False or None (the default: by device)" if by_device else "True or False"
                raise ValueError(f"DecodeOptions.{f.name} must be {allowed}, got {value!r}")


class Engine:
    """Runs a batch of sequences through prefill and decoding steps under one schedule and its scorer;
    `decode` says how decoding steps run (DecodeOptions)."""

    def __init__(
        self, adapter: LlamaAdapter, schedule: Schedule, capacity: int, trace: bool = False,
        decode: DecodeOptions = DecodeOptions(),
    ) -> None:
        self.a = adapter
        self.schedule = schedule
        self.capacity = capacity  # positions per sequence: longest prompt + new tokens
        self.trace = trace
        self.reselects = schedule.scorer.reselects
        on_cuda = adapter.device.type == "cuda"
        if decode.graphs and not (on_cuda and not trace):
            raise ValueError("CUDA graphs need a CUDA model and trace=False")
        self.graphs = on_cuda and not trace if decode.graphs is None else decode.graphs
        if (decode.split_kernel or decode.burst_kernel) and not triton_runs_on(adapter.device):
            raise ValueError("the Triton attention kernels need a CUDA model")
        self.split_kernel = on_cuda if decode.split_kernel is None else decode.split_kernel
        self.burst_kernel = decode.burst_kernel
        self.compile_layers = decode.compile
        self.segments = segments(adapter.num_layers, list(schedule.keep))
        self.speculate = decode.speculate and waits_mid_step(schedule)  # nothing to guess otherwise
        self.cache: LazyCache | None = None  # allocated by prefill, once the batch is known
        self.recorder: Recorder = Recorder()

    @property
    def traces(self) -> list[list[StepTrace]]:
        """[sequence][step] what each step did, token by token (empty unless tracing)."""
        return self.recorder.traces

    # ---------------------------------------------------------------- prefill
    def prefill(self, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, list[StepStats]]:
        """prompts: B token-id tensors [n_b] on the model's device -> last-token logits [B, vocab], stats.

        Never waits on the device: selection sizes are known on the host, and the cache is cleared by
        `settle()` once the first tokens' logits exist.
        """
        a, L, dev = self.a, self.a.num_layers, self.a.device
        counts = [p.shape[0] for p in prompts]
        B = len(prompts)
        c = self.cache = LazyCache(a, B, self.capacity, count_writes=self.trace)
        self.recorder = TraceRecorder(B) if self.trace else Recorder()
        stats = [StepStats() for _ in range(B)]
        self.recorder.begin(list(range(B)))
        rows = Packing(counts, dev)
        pos = rows.slot  # [N] original position of each active row
        h = a.embed(torch.cat(prompts))  # [N, d]
        cos, sin = a.rope(pos)  # [N, dh]
        self._dropped: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        firsts = {seg.first: len(seg.layers) for seg in self.segments}
        for l in range(L):
            for s, n in zip(stats, rows.counts):
                s.computed.append(n)
                s.candidates.append(n)
                s.revived.append(0)
            if l in firsts:
                padded_pos = rows.pad(pos)
                self.recorder.layers(firsts[l], padded_pos, rows.valid, padded_pos, rows.valid)
            q, k, v = a.qkv(l, h, cos, sin)  # q: [N, H, dh], k/v: [N, Hkv, dh]
            c.write_kv(l, rows.seq, pos, k, v)
            qp, kp, vp = (rows.pad(x).transpose(1, 2) for x in (q, k, v))  # [B, heads, width, dh]
            o = prefill_attention(qp, kp, vp, rows.pad(pos), a.window(l), max(counts), a.scaling)  # [B, H, W, dh]
            scores = self._prefill_scores(l, qp, kp, rows, pos, max(counts)) if l in self.schedule.keep else None
            del q, k, v, qp, kp, vp  # free them before the MLP's activations: lower peak memory, as in transformers
            o = rows.unpad(o.transpose(1, 2))  # [N, H, dh]
            h = a.finish(l, h, o)
            if scores is None:
                continue
            keep = [self.schedule.kept_count(l, n) for n in rows.counts]
            kept, dropped = select(scores, rows, keep)
            self.recorder.scores(l, rows.pad(pos), rows.valid, scores)
            seq_dropped, pos_dropped = rows.seq[dropped], pos[dropped]
            c.aux[seq_dropped, pos_dropped] = h[dropped]
            self._dropped.append((l, seq_dropped, pos_dropped))
            rows = Packing(keep, dev)
            pos, h, cos, sin = pos[kept], h[kept], cos[kept], sin[kept]
        c.length[:] = counts
        self.recorder.end()
        self._prompt_lengths = np.array(counts, dtype=np.int64)
        self._prefill_sizes = np.array([s.candidates for s in stats], dtype=np.int64)  # [B, L]
        return a.logits(h[rows.last]), stats

    def settle(self) -> None:
        """Clear the cache for decoding (after TTFT has been measured): depth, and K/V that decoding may read
        before writing it. Never waits for the device."""
        c = self.cache
        c.clear(self._prompt_lengths.tolist(), self._dropped)
        self._dropped = []
        self.runner = SegmentRunner(self.a, c, self.reselects, len(self.schedule.keep), self.split_kernel,
                                    self.burst_kernel, self.compile_layers, self.speculate)
        self._run_segment = Graphs() if self.graphs else eager
        self._guess: list[int] | None = None  # rows to lay out per segment of the next step (speculating)

    def _prefill_scores(
        self, layer: int, qp: torch.Tensor, kp: torch.Tensor, rows: Packing, pos: torch.Tensor, span: int
    ) -> torch.Tensor:
        """The scorer's [B, width] scores of every active row, from the last `query_rows` rows' queries.

        qp: [B, H, width, dh], kp: [B, Hkv, width, dh] padded as `rows.pad` lays rows out; pos: [N] packed.
        """
        w = self.schedule.scorer.query_rows
        slots = rows.last_slot[:, None] - torch.arange(w - 1, -1, -1, device=pos.device)  # [B, w], q last
        present = slots >= 0
        slots = slots.clamp(min=0)
        q = qp.gather(2, slots[:, None, :, None].expand(-1, qp.shape[1], -1, qp.shape[3]))  # [B, H, w, dh]
        pos_p = rows.pad(pos)  # [B, width]
        q_pos = pos_p.gather(1, slots).masked_fill(~present, -1)
        x = ScoreInput(q, q_pos, kp, pos_p, rows.valid, self.a.scaling, layer, span)
        return self.schedule.scorer.score(x)

    # --------------------------------------------------------------- decoding
    def decode(self, tokens: torch.Tensor, seqs: list[int]) -> tuple[torch.Tensor, list[StepStats]]:
        """tokens: [A] the newest token of each sequence in `seqs` (ascending; the rest have stopped)
        -> their logits [A, vocab] and stats. Each token becomes its sequence's q at position length.

        Plan (host: sizes), then one static-shape segment run after another. How many rows enter after a
        pruning layer that reselects is known only on the device: when speculating, every segment is laid
        out at the size the previous step suggests and the host waits once, at the end; a segment that
        overflowed its guess did nothing, and it and the rest are run again at their real sizes, waiting
        for the count before each (as every step does without speculation).
        """
        c = self.cache
        plan = plan_step(self.schedule, self.reselects, c.length, seqs, self.a.num_layers, self.capacity,
                         self._prefill_sizes, self._prompt_lengths)
        c.length[seqs] += 1
        self.runner.load(tokens, seqs, plan)
        self.recorder.begin(seqs)
        n_seg = len(self.segments)
        counts = np.zeros((n_seg, 2, c.length.shape[0]), dtype=np.int64)  # rows entering each segment, revived
        counts[:, 0, seqs] = 1  # q alone, unless a pruning layer that reselects brings more (read from the device)
        start = 0
        if self._guess is not None:
            rows = [layout_rows(n, plan.keys) for n in self._guess]
            for index, R in enumerate(rows):
                self._run(index, R, plan.keys)
            counts = np.array(self.runner.counts.tolist())  # the step's one wait
            start = first_overflow(counts[:, 0].max(axis=1), rows)
            if start is None:
                start = n_seg
            else:  # that segment and the later ones changed nothing: run them at their real sizes
                self.runner.fits.fill_(True)
                self.recorder.rewind(self.segments[start].first)
        for index in range(start, n_seg):
            if index > start and self.reselects:
                counts[index] = self.runner.counts[index].tolist()  # a wait per pruning layer
            self._run(index, layout_rows(int(counts[index, 0].max()), plan.keys), plan.keys)
        if self.speculate:
            self._guess = guess_rows(counts[:, 0].max(axis=1))
        self.recorder.end()
        return self.a.logits(self.runner.q_hidden()), self._stats(plan, seqs, counts)

    def _run(self, index: int, R: int, keys: int) -> None:
        """Segment `index` on R rows per sequence (plan.layout_rows), keys [0, keys).

        A burst of revived rows is a one-off shape whose work dwarfs its launches: it runs as it is, exactly
        sized, rather than captured as a graph used once."""
        run = eager if R > GRAPH_MAX_ROWS else self._run_segment
        run((index, R, keys), partial(self.runner.run, self.segments[index], index, R, keys, self.schedule.scorer,
                                      self.recorder))

    def _stats(self, plan: StepPlan, seqs: list[int], counts: np.ndarray) -> list[StepStats]:
        """Per-layer counts of each stepping sequence from `counts`: [segments, 2 (entering, revived), B]."""
        stats = []
        for b in seqs:
            s = StepStats(candidates=plan.sizes[b].tolist())
            for seg, (entering, revived) in zip(self.segments, counts[:, :, b].tolist()):
                n = len(seg.layers)
                s.computed += [entering] * n
                s.revived += [revived] + [0] * (n - 1)
            stats.append(s)
        return stats
