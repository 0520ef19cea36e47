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

from functools import partial

import numpy as np
import torch
from torch.nn.attention import SDPBackend

from .adapters import LlamaAdapter
from .attention import prefill_attention
from .cache import LazyCache
from .decoding import Graphs, SegmentRunner, eager
from .packing import Packing
from .plan import GRAPH_MAX_ROWS, plan_step, row_bucket, segments
from .recording import Recorder, StepStats, StepTrace, TraceRecorder
from .schedule import Schedule
from .scoring import ScoreInput, select

__all__ = ["DECODE_ATTENTION", "Engine", "StepStats", "StepTrace"]

# Decoding calls SDPA only for bursts of revived rows, with the kernel choice scoped to the call
# (decoding._sdpa_attention). `bench` uses this order for transformers
# `generate`: cuDNN attention, SDPA's first choice on Hopper, plans a new graph per key length (~1.3 ms of
# host time per call, measured on an H100), so flash attention first (benchmarks/NOTES.md).
DECODE_ATTENTION = [
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH
]


class Engine:
    """Runs a batch of sequences through prefill and decoding steps under one schedule and its scorer.

    `graphs`: replay decoding segments as CUDA graphs (None: on CUDA unless tracing, whose recorder
    reads the device mid-step). `split_kernel`: decoding attention through the Triton kernel that
    reads only S_l's K/V (None: on CUDA); otherwise the written-out masked attention over every position.
    """

    def __init__(
        self, adapter: LlamaAdapter, schedule: Schedule, capacity: int, trace: bool = False,
        graphs: bool | None = None, split_kernel: bool | None = None,
    ) -> None:
        self.a = adapter
        self.schedule = schedule
        self.capacity = capacity  # positions per sequence: longest prompt + new tokens
        self.trace = trace
        self.reselects = schedule.scorer.reselects
        possible = adapter.device.type == "cuda" and not trace
        if graphs and not possible:
            raise ValueError("CUDA graphs need a CUDA model and trace=False")
        self.graphs = possible if graphs is None else graphs
        on_cuda = adapter.device.type == "cuda"
        if split_kernel and not on_cuda:
            raise ValueError("the split-K attention kernel (Triton) needs a CUDA model")
        self.split_kernel = on_cuda if split_kernel is None else split_kernel
        self.segments = segments(adapter.num_layers, list(schedule.keep))
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
        self.runner = SegmentRunner(self.a, c, self.reselects, len(self.schedule.keep), self.split_kernel)
        self._run_segment = Graphs() if self.graphs else eager

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

        Plan (host: sizes, rows per segment), then one static-shape segment run after another; the host
        waits for the device only after a pruning layer that reselects, to learn how many rows enter next.
        """
        c, sched = self.cache, self.schedule
        plan = plan_step(sched, self.reselects, c.length, seqs, self.a.num_layers, self.capacity,
                         self._prefill_sizes, self._prompt_lengths)
        c.length[seqs] += 1
        self.runner.load(tokens, seqs, plan)
        self.recorder.begin(seqs)
        stats = {b: StepStats(candidates=plan.sizes[b].tolist()) for b in seqs}
        entering = np.zeros((2, c.length.shape[0]), dtype=np.int64)  # rows entering, of which revived
        entering[0, seqs] = 1  # q alone enters layer 0
        for index, seg in enumerate(self.segments):
            n = int(entering[0].max())
            # A burst of revived rows is a one-off shape whose work dwarfs its launches: run it as it is,
            # exactly sized, rather than pad it to a bucket and capture a graph used once.
            R, run = (n, eager) if n > GRAPH_MAX_ROWS else (row_bucket(n), self._run_segment)
            run((index, R, plan.keys), partial(self.runner.run, seg, index, R, plan.keys, self.schedule.scorer,
                                               self.recorder))
            n = len(seg.layers)
            for b in seqs:
                stats[b].computed += [int(entering[0, b])] * n
                stats[b].revived += [int(entering[1, b])] + [0] * (n - 1)
            if seg.prunes and self.reselects:
                entering = np.array(self.runner.entering.tolist())  # the step's one wait per pruning layer
        self.recorder.end()
        return self.a.logits(self.runner.q_hidden()), [stats[b] for b in seqs]
