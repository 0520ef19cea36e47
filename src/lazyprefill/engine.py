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
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from .adapters import LlamaAdapter
from .cache import LazyCache
from .decoding import Graphs, Scorer, SegmentRunner, eager
from .packing import Packing
from .plan import StepPlan, plan_step, row_bucket, segments
from .recording import Recorder, StepStats, StepTrace, TraceRecorder
from .schedule import Schedule
from .scoring import attention_row, random_scores, select

__all__ = ["DECODE_ATTENTION", "Engine", "StepStats", "StepTrace"]

# Decoding no longer calls SDPA (decoding.masked_attention). `bench` uses this order for transformers
# `generate`: cuDNN attention, SDPA's first choice on Hopper, plans a new graph per key length (~1.3 ms of
# host time per call, measured on an H100), so flash attention first (benchmarks/NOTES.md).
DECODE_ATTENTION = [
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH
]


class Engine:
    """Runs a batch of sequences through prefill and decoding steps under one schedule.

    In the `random` baseline, sequence b draws from its own generator seeded `schedule.seed + b`,
    so that what it keeps does not depend on the rest of the batch.

    `graphs`: replay decoding segments as CUDA graphs (None: on CUDA whenever possible; never while
    tracing, whose recorder reads the device mid-step, nor under `random`, whose generators live on
    the host). `split_kernel`: decoding attention through the Triton kernel that reads only S_l's
    K/V (None: on CUDA); otherwise the written-out masked attention over every position.
    """

    def __init__(
        self, adapter: LlamaAdapter, schedule: Schedule, capacity: int, trace: bool = False,
        graphs: bool | None = None, split_kernel: bool | None = None,
    ) -> None:
        self.a = adapter
        self.schedule = schedule
        self.capacity = capacity  # positions per sequence: longest prompt + new tokens
        self.trace = trace
        self.reselects = schedule.mode != "static"
        possible = adapter.device.type == "cuda" and not trace and schedule.mode != "random"
        if graphs and not possible:
            raise ValueError("CUDA graphs need a CUDA model, trace=False and a schedule mode other than random")
        self.graphs = possible if graphs is None else graphs
        on_cuda = adapter.device.type == "cuda"
        if split_kernel and not on_cuda:
            raise ValueError("the split-K attention kernel (Triton) needs a CUDA model")
        self.split_kernel = on_cuda if split_kernel is None else split_kernel
        self.segments = segments(adapter.num_layers, list(schedule.keep))
        self.cache: LazyCache | None = None  # allocated by prefill, once the batch is known
        self.recorder: Recorder = Recorder()
        self.generators: list[torch.Generator] = []

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
        if self.schedule.mode == "random":
            self.generators = [torch.Generator(device=dev).manual_seed(self.schedule.seed + b) for b in range(B)]
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
            o = F.scaled_dot_product_attention(
                qp, kp, vp, is_causal=True, scale=a.scaling, enable_gqa=a.num_heads != a.num_kv_heads
            )
            scores = None
            if l in self.schedule.keep and self.generators:
                scores = self._random_scores(rows)
            elif l in self.schedule.keep:
                scores = attention_row(q[rows.last], kp, a.scaling, rows.valid)  # [B, width]
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

    def _random_scores(self, rows: Packing) -> torch.Tensor:
        """[B, width] draws for the `random` baseline, each sequence from its own generator."""
        active = [g for g, n in zip(self.generators, rows.counts) if n]
        return rows.pad(random_scores([n for n in rows.counts if n], active, self.a.device))

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
        score = self._step_scorer(plan, seqs)
        for index, seg in enumerate(self.segments):
            R = row_bucket(int(entering[0].max()))
            self._run_segment((index, R, plan.keys), partial(self.runner.run, seg, index, R, plan.keys, score,
                                                              self.recorder))
            n = len(seg.layers)
            for b in seqs:
                stats[b].computed += [int(entering[0, b])] * n
                stats[b].revived += [int(entering[1, b])] + [0] * (n - 1)
            if seg.prunes and self.reselects:
                entering = np.array(self.runner.entering.tolist())  # the step's one wait per pruning layer
        self.recorder.end()
        return self.a.logits(self.runner.q_hidden()), [stats[b] for b in seqs]

    def _step_scorer(self, plan: StepPlan, seqs: list[int]) -> Scorer:
        """The importance of candidates at a pruning layer: q's attention row, or the random baseline's draws."""
        if not self.generators:
            return lambda layer, q_last, k, in_s: attention_row(q_last, k, self.a.scaling, in_s)

        def draws(layer: int, q_last: torch.Tensor, k: torch.Tensor, in_s: torch.Tensor) -> torch.Tensor:
            sizes = [int(plan.sizes[b, layer]) for b in seqs]  # each sequence draws |S_l| values in position order
            flat = random_scores(sizes, [self.generators[b] for b in seqs], self.a.device)
            return torch.zeros(in_s.shape, device=in_s.device).masked_scatter_(in_s, flat)

        return draws
