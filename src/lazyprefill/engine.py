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

from collections.abc import Generator
from dataclasses import dataclass, fields
from functools import partial

import numpy as np
import torch
from torch.nn.attention import SDPBackend

from .adapters import LlamaAdapter
from .attention import masked_kernels, prefill_attention, sdpa
from .cache import LazyCache
from .decoding import Graphs, SegmentRunner, eager, top_k
from .env import triton_runs_on
from .packing import Packing, upload
from .plan import (
    BOUNDED_MAX_ROWS,
    GRAPH_MAX_ROWS,
    Segment,
    layout_rows,
    plan_step,
    segments,
    waits_mid_step,
)
from .recording import Recorder, StepStats, StepTrace, TraceRecorder
from .schedule import Schedule
from .scoring import ScoreInput, select
from .sparse import sparse_attention

__all__ = ["DECODE_ATTENTION", "DecodeOptions", "Engine", "Held", "PendingStats", "StepStats", "StepTrace"]

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
    they differ in speed. Each default is what measured fastest on the device kind (benchmarks/NOTES.md, "The
    whole answer on the H200"): None means on with CUDA and off on the CPU.

    graphs: replay segments as CUDA graphs (needs CUDA and no tracing, whose recorder reads the device
        mid-step). split_kernel: the Triton kernel that reads only S_l's K/V for a few rows per sequence;
        otherwise the written-out masked attention over every position.
    burst_kernel: many rows (revival bursts) through the Triton flash kernel over S_l's positions with
        per-row key ranges, instead of SDPA with an [R, T] mask.
    compile: the layer halves of decoding steps through torch.compile (decoding.CompiledLayers), fusing the
        small kernels that a step's many short layers launch; the first call in a process compiles.
    ahead: LazyLLM enqueues each decoding step before it reads the previous step's tokens, so that the device
        never waits for the host between steps; a sequence that stops at EOS or a stop string has then taken one
        step more than its tokens show (its output drops it). Pays only where the device runs on its own (CUDA).
    graph_layout: lay each step out as CUDA graphs need it: every slot computes, rows come in buckets and a small
        revival bound is laid out in full, so that no count is read from the device mid-step. None: exactly when
        graphs run. On without graphs, the same layout runs eagerly: how the CPU covers the GPU's data path, and
        how a failure on the GPU is told apart between capture and layout. Off turns graphs off by default.
    """

    graphs: bool | None = None
    split_kernel: bool | None = None
    burst_kernel: bool | None = None
    compile: bool | None = None
    ahead: bool | None = None
    graph_layout: bool | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, bool) or value is None):
                raise ValueError(f"DecodeOptions.{f.name} must be True, False or None (the default: by device), "
                                 f"got {value!r}")
        if self.graphs and self.graph_layout is False:
            raise ValueError("CUDA graphs need the graph layout: with graphs=True leave graph_layout None or True")

    def check(self, device: torch.device, trace: bool = False) -> None:
        """Refuse what cannot run on `device` (with tracing, whose recorder reads the device mid-step): before a
        server takes requests, not at its first engine."""
        if self.graphs and not (device.type == "cuda" and not trace):
            raise ValueError("CUDA graphs need a CUDA model and trace=False")
        if (self.split_kernel or self.burst_kernel) and not triton_runs_on(device):
            raise ValueError("the Triton attention kernels need a CUDA model")


@dataclass(frozen=True)
class Held:
    """A sequence's tokens as computed so far, copied out of its slot (Engine.hold): k, v: [L, Hkv, n, dh], aux:
    [n, d], depth: [n] (int32, on the device), pruned: whether its prompt was pruned or attended sparsely (not a
    dense schedule, and at least Schedule.min_prompt_tokens long)."""

    k: torch.Tensor
    v: torch.Tensor
    aux: torch.Tensor
    depth: torch.Tensor
    pruned: bool

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.aux, self.depth))


class Engine:
    """Runs a batch of sequences through prefill and decoding steps under one schedule and its scorer;
    `decode` says how decoding steps run (DecodeOptions).

    The cache has `batch` slots of `capacity` positions, allocated once: by the constructor when `batch` is
    given (outside any timed prefill), else by the first prefill, for its batch. An engine outlives a
    generation: a later prefill into the same slots reuses the cache, the compiled kernels and the captured
    CUDA graphs (LazyLLM keeps one engine per batch shape), and a prefill into some slots while others decode
    is how requests join a running batch.
    """

    def __init__(
        self, adapter: LlamaAdapter, schedule: Schedule, capacity: int, trace: bool = False,
        decode: DecodeOptions = DecodeOptions(), batch: int | None = None,
    ) -> None:
        self.a = adapter
        self.schedule = schedule
        self.capacity = capacity  # positions per sequence: longest prompt + new tokens
        self.trace = trace
        self.reselects = schedule.scorer.reselects
        on_cuda = adapter.device.type == "cuda"
        decode.check(adapter.device, trace)
        by_device = on_cuda and not trace and decode.graph_layout is not False
        self.graphs = by_device if decode.graphs is None else decode.graphs
        self.graph_layout = self.graphs if decode.graph_layout is None else decode.graph_layout
        self.split_kernel = on_cuda if decode.split_kernel is None else decode.split_kernel
        self.burst_kernel = on_cuda if decode.burst_kernel is None else decode.burst_kernel
        self.compile_layers = on_cuda if decode.compile is None else decode.compile
        self.segments = segments(adapter.num_layers, list(schedule.keep))
        self.min_prompt = schedule.min_prompt(adapter.device.type)
        # Revive: every step after a pruning layer computes at most this many rows a sequence, so a step laid out
        # in buckets (graphs) needs no count from the device to be laid out: no wait mid-step. Only for bounds
        # that cost about what one row costs (a larger one waits and lays out what it needs)
        bound = schedule.scorer.revival_rows
        fixed = bound is not None and bound <= BOUNDED_MAX_ROWS and self.graph_layout and waits_mid_step(schedule)
        self._bounded = [1] + [bound] * (len(self.segments) - 1) if fixed else None
        self.recorder: Recorder = Recorder()
        self.cache: LazyCache | None = None
        if batch is not None:
            self._allocate(batch)

    def _allocate(self, batch: int) -> None:
        """The cache of `batch` slots, the device side of decoding steps (its kernels compiled) and the
        per-slot host state: once per engine."""
        L = self.a.num_layers
        c = self.cache = LazyCache(self.a, batch, self.capacity, count_writes=self.trace)
        self.runner = SegmentRunner(self.a, c, self.reselects, len(self.schedule.keep), self.split_kernel,
                                    self.burst_kernel, self.compile_layers, compact=not self.graph_layout,
                                    revival_rows=self.schedule.scorer.revival_rows,
                                    ratios=tuple(self.schedule.keep.values()))
        self._run_segment = Graphs() if self.graphs else eager
        self._prompt_lengths = np.zeros(batch, dtype=np.int64)  # [B] per slot
        self._pruned = np.zeros(batch, dtype=bool)  # [B] whether the slot's prompt reached min_prompt (else: dense)
        self._prefill_sizes = np.zeros((batch, L), dtype=np.int64)  # [B, L] |S_l| of each slot's prefill
        # prefills since the last settle: (their slots, the (layer, slots, positions) each dropped)
        self._unsettled: list[tuple[list[int], list[tuple[int, torch.Tensor, torch.Tensor]]]] = []

    @property
    def graphs_captured(self) -> int:
        """CUDA graphs this engine has captured so far (0 without graphs): a generation that adds none replayed
        graphs captured by an earlier one."""
        return self._run_segment.captured if isinstance(self._run_segment, Graphs) else 0

    @property
    def traces(self) -> list[list[StepTrace]]:
        """[sequence][step] what each step did, token by token (empty unless tracing)."""
        return self.recorder.traces

    # ---------------------------------------------------------------- prefill
    def prefill(
        self, prompts: list[torch.Tensor], slots: list[int] | None = None, ids: list[int] | None = None
    ) -> tuple[torch.Tensor, list[StepStats]]:
        """prompts: token-id tensors [n_b] on the model's device, into cache `slots` (default: the first ones)
        -> last-token logits [len(prompts), vocab], stats. The sequences of other slots (they may be decoding)
        are untouched. `ids`: each prompt's place in its own batch, for scorers that draw per sequence (`random`;
        default: its slot), so that a server's request draws as it would alone.

        Never waits on the device: selection sizes are known on the host, and the slots are made ready for
        decoding by `settle()`, once the first tokens' logits exist.
        """
        run = self.prefill_layers(prompts, slots, ids)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def prefill_layers(
        self, prompts: list[torch.Tensor], slots: list[int] | None = None, ids: list[int] | None = None
    ) -> Generator[int, None, tuple[torch.Tensor, list[StepStats]]]:
        """`prefill`, one layer at a time: yields the rows each layer computed and returns what `prefill` returns,
        so that a server can run decoding steps of other slots between layers and bound how long a new request's
        prefill holds them up. Its slots count as prefilled only once the last layer has run: a prefill dropped
        midway leaves nothing for `settle` to apply."""
        a, L, dev = self.a, self.a.num_layers, self.a.device
        counts = [p.shape[0] for p in prompts]
        if self.cache is None:
            self._allocate(len(prompts))
        c = self.cache
        slots = list(range(len(prompts))) if slots is None else list(slots)
        if self.trace and slots != list(range(c.batch)):
            raise ValueError("a traced engine prefills its whole batch at once, into slots 0..B-1")
        # an earlier prefill into these slots that never settled (its caller failed before) must not settle later
        self._unsettled = [(s, d) for s, d in self._unsettled if not set(s) & set(slots)]
        self.recorder = TraceRecorder(c.batch) if self.trace else self.recorder
        stats = [StepStats() for _ in prompts]
        self.recorder.begin(slots)
        c.ensure_clean(max(counts))
        rows = Packing(counts, dev)
        seqs = upload(np.asarray(slots + (slots if ids is None else list(ids)), dtype=np.int64), dev)
        seqs, ids_dev = seqs.split(len(slots))  # [B'] each prompt's cache slot, its sequence id
        self.runner.ids[seqs] = ids_dev
        slot_of = seqs[rows.seq]  # [N] each row's cache slot
        pos = rows.slot  # [N] original position of each active row
        kv_index = c.kv_index(slot_of, pos)  # [N * Hkv] where the rows' K/V go, until a pruning layer drops some
        h = a.embed(torch.cat(prompts))  # [N, d]
        cos, sin = a.rope(pos)  # [N, dh]
        firsts = {seg.first: len(seg.layers) for seg in self.segments}
        pruned = [n >= self.min_prompt for n in counts]  # [B'] the rest run dense (Schedule.min_prompt_tokens)
        sparse = self.schedule.sparse
        dropped_at: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (layer, slots, positions)
        for l in range(L):
            for s, n in zip(stats, rows.counts):
                s.computed.append(n)
                s.candidates.append(n)
                s.revived.append(0)
            if l in firsts:
                padded_pos = rows.pad(pos)
                self.recorder.layers(firsts[l], padded_pos, rows.valid, padded_pos, rows.valid)
            q, k, v = a.qkv(l, h, cos, sin)  # q: [N, H, dh], k/v: [N, Hkv, dh]
            c.write_kv(l, slot_of, pos, k, v, kv_index)
            qp, kp, vp = (rows.pad(x).transpose(1, 2) for x in (q, k, v))  # [B, heads, width, dh]
            blocks = sparse.block_mask(qp, kp, rows.counts, a.scaling, pruned) \
                if sparse is not None and sparse.applies(l, a.window(l)) else None
            if blocks is None:
                o = prefill_attention(qp, kp, vp, rows.pad(pos), a.window(l), max(counts), a.scaling)  # [B, H, W, dh]
            else:
                o = sparse_attention(qp, kp, vp, blocks, a.scaling)
            pruning = l in self.schedule.keep and any(pruned)
            scores = self._prefill_scores(l, qp, kp, rows, pos, max(counts), ids_dev) if pruning else None
            del q, k, v, qp, kp, vp  # free them before the MLP's activations: lower peak memory, as in transformers
            o = rows.unpad(o.transpose(1, 2))  # [N, H, dh]
            h = a.finish(l, h, o)
            yield rows.total
            if scores is None:
                continue
            keep = [self.schedule.kept_count(l, n) if p else n for n, p in zip(rows.counts, pruned)]
            kept, dropped = select(scores, rows, keep)
            self.recorder.scores(l, rows.pad(pos), rows.valid, scores)
            slot_dropped, pos_dropped = slot_of[dropped], pos[dropped]
            c.aux[slot_dropped, pos_dropped] = h[dropped]
            dropped_at.append((l, slot_dropped, pos_dropped))
            rows = Packing(keep, dev)
            pos, h, cos, sin, slot_of = pos[kept], h[kept], cos[kept], sin[kept], slot_of[kept]
            kv_index = c.kv_index(slot_of, pos)
        c.length[slots] = counts
        self.recorder.end()
        self._prompt_lengths[slots] = counts
        self._pruned[slots] = pruned
        self._prefill_sizes[slots] = [s.candidates for s in stats]
        self._unsettled.append((slots, dropped_at))
        return a.logits(h[rows.last]), stats

    def settle(self) -> None:
        """Make the slots prefilled since the last call ready for decoding (after TTFT has been measured):
        their depth. Never waits for the device in one process; under tensor parallelism it checks that every rank
        dropped the same tokens at the same layers (one all-reduce and a wait)."""
        for slots, dropped in self._unsettled:
            self.cache.settle(slots, self._prompt_lengths[slots].tolist(), dropped)
        if self._unsettled and self.a.tp is not None:  # only these slots: an unused one holds whatever its memory held
            settled = sorted({slot for slots, _ in self._unsettled for slot in slots})
            self.a.check_same("the tokens each prefill dropped, and where", self.cache.depth_device[settled])
        self._unsettled = []

    # ------------------------------------------------------------ continuing a prompt already in the cache
    def extend(self, slot: int, tokens: torch.Tensor) -> tuple[torch.Tensor, StepStats]:
        """Prefill `tokens` [m] after what `slot` already holds (a follow-up question over a document prefilled
        once) -> the last token's logits [1, vocab] and the chunk's stats. The slot must have settled.

        The new rows run every layer, as a decoding step's q does, and at layer l attend causally to the earlier
        tokens whose K/V exists there: with nothing deferred (dense, or a prompt below min_prompt_tokens) this is
        the fresh prefill of the whole sequence, split in two. A pruned slot is treated as a decoding step treats
        its context: at each pruning layer the new rows' last queries score the held tokens that reached it, keep
        as many as a decoding step would (the new rows all go on), and the kept ones that stopped there resume from
        the Aux Cache; a one-token continuation is that decoding step. Without this the new question would see only
        what the document's own last token chose: on Gemma 3 at 4K a reused recall answer scored 0.43 against a
        fresh prefill's 0.85 (issue 25). So no (token, layer) is computed twice and the held prefix is never
        computed again.
        """
        run = self.extend_layers(slot, tokens)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def extend_layers(self, slot: int, tokens: torch.Tensor) -> Generator[int, None, tuple[torch.Tensor, StepStats]]:
        """`extend`, one layer at a time (as `prefill_layers`, for a server's bounded prefill chunks); the slot
        holds the new tokens only once the last layer has run."""
        if self.trace:
            raise ValueError("a traced engine records one generation from its prefill: extend an untraced one")
        a, c, L = self.a, self.cache, self.a.num_layers
        start, m = int(c.length[slot]), tokens.shape[0]
        end = start + m
        if end > self.capacity:
            raise ValueError(f"{start} tokens held + {m} new = {end} exceed the engine's room of {self.capacity}")
        reselect = self.prunes(slot) and self.schedule.scorer.reselects
        c.ensure_clean(end)
        pos = torch.arange(start, end, device=a.device)  # [R] the rows computed: resumed held tokens, then the new
        keys = torch.arange(end, device=a.device)  # [T]
        held = c.depth_device[slot, :end].clone()  # [T] each token's deepest layer with K/V; rows computed: L-1
        held[start:] = L - 1
        chosen = torch.ones(end, dtype=torch.bool, device=a.device)  # [T] what the new rows may attend to
        computed, resumed, candidates = [], [], []  # per layer; candidates on the device until the end
        revived = 0  # rows resumed from the Aux Cache at this layer
        h = a.embed(tokens)  # [R, d]
        cos, sin = a.rope(pos)
        seq = torch.full_like(pos, slot)
        kv_index = c.kv_index(seq, pos)  # [R * Hkv], until the rows change
        for l in range(L):
            q, k, v = a.qkv(l, h, cos, sin)  # q: [R, H, dh], k/v: [R, Hkv, dh]
            c.write_kv(l, seq, pos, k, v, kv_index)
            window = a.window(l)
            visible = chosen & (held >= l)  # [T]
            seen = (keys <= pos[:, None]) & visible  # [R, T]
            if window is not None:
                seen &= keys > pos[:, None] - window
            with masked_kernels(q):  # not around the loop: it yields to the caller between layers
                o = sdpa(q.transpose(0, 1)[None], c.k[l, slot, :, :end][None], c.v[l, slot, :, :end][None],
                         attn_mask=seen[None, None], scale=a.scaling)  # [1, H, R, dh]
            h = a.finish(l, h, o[0].transpose(0, 1))
            computed.append(pos.shape[0])
            resumed.append(revived)
            candidates.append(visible.sum())
            yield pos.shape[0]
            revived = 0
            if reselect and l in self.schedule.keep:  # the rows change: resumed ones join or stop
                h, pos, revived = self._reselect(l, slot, q[-m:], h, pos, keys, held, chosen, start)
                cos, sin = a.rope(pos)
                seq = torch.full_like(pos, slot)
                kv_index = c.kv_index(seq, pos)
        c.depth_device[slot, :end] = held
        c.length[slot] = end
        a.check_same("the tokens a continuation revived, and where they stopped", held)  # under tensor parallelism
        return a.logits(h[-1:]), StepStats(computed, torch.stack(candidates).tolist(), resumed)

    def _reselect(
        self, layer: int, slot: int, q: torch.Tensor, h: torch.Tensor, pos: torch.Tensor, keys: torch.Tensor,
        held: torch.Tensor, chosen: torch.Tensor, start: int,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A continuation's selection at a pruning layer: the new rows' last queries (q: [m, H, dh]) rank the held
        tokens that reached `layer`; the kept ones that stopped there resume from the Aux Cache, and resumed rows
        not kept stop here (their hidden state goes to the Aux Cache). Under a revival bound (Revive) the held
        tokens computed after the layer are at most m times a decoding step's rows besides q, as m steps would
        allow (a one-token continuation is still that decoding step): with random weights a follow-up question
        over a 16K document otherwise revived most of what the document deferred (23% of a fresh prefill's time on
        an H100, against dense's 5.8%: benchmarks/NOTES.md, "Eighth GPU session"). Updates `held` and `chosen`
        ([T]) in place and returns the rows that go on (h: [R', d], pos: [R'], resumed rows first) and how many
        resume here. keys: [T] the positions 0..T-1."""
        a, c, m = self.a, self.cache, q.shape[0]
        end = held.shape[0]
        w = min(self.schedule.scorer.query_rows, m)
        visible = chosen & (held >= layer)  # [T]
        x = ScoreInput(q[-w:].transpose(0, 1)[None], pos[-w:][None], c.k[layer, slot, :, :end][None], keys[None],
                       visible[None], a.scaling, layer, end, seq=self.runner.ids[slot : slot + 1],
                       reduce_heads=a.reduce_heads)
        scores = self.schedule.scorer.score(x)[0].float()  # [T]
        candidates = visible.clone()
        candidates[start:] = False  # the new rows all go on
        # the held tokens keep what a decoding step's q leaves its context: ceil(r * (n + 1)) - 1 (one wait)
        kept = self.schedule.kept_count(layer, int(candidates.sum()) + 1) - 1
        # Revive: a decoding step computes at most `bound` rows after this layer, q included, so the m new rows
        # (m steps' worth) allow m * (bound - 1) held tokens there
        bound, bounded = self.schedule.scorer.revival_rows, None
        if bound is not None:
            bounded = candidates & (held == layer)  # [T] held tokens that would take a row next: resumed here
            bounded[pos[:-m]] = True  # or resumed at an earlier pruning layer (candidates: held L-1) and going on
        picked = top_k(scores[None], candidates[None], torch.zeros_like(candidates[None]),  # no q among them
                       torch.tensor([kept], device=held.device), None if bounded is None else bounded[None],
                       None if bound is None else torch.tensor([m * (bound - 1)], device=held.device))
        chosen[:start] = picked[0, :start]
        resumed, new = pos[:-m], slice(-m, None)  # rows of held tokens resumed at earlier pruning layers
        stays = chosen[resumed]
        stop = resumed[~stays]
        c.aux[slot, stop] = h[:-m][~stays]
        held[stop] = layer
        revive = (chosen & (held == layer)).nonzero()[:, 0]  # [n] kept, and stopped at this layer before
        held[revive] = a.num_layers - 1
        return (torch.cat([h[:-m][stays], c.aux[slot, revive], h[new]]),
                torch.cat([resumed[stays], revive, pos[new]]), revive.shape[0])

    def hold(self, slot: int, length: int) -> Held:
        """A copy of `slot`'s first `length` tokens as computed so far (K/V, Aux Cache, depth), kept apart from
        the slots: a server's cached prefix, which `resume` puts back into any slot of an engine of the same
        schedule."""
        c = self.cache
        return Held(c.k[:, slot, :, :length].clone(), c.v[:, slot, :, :length].clone(),
                    c.aux[slot, :length].clone(), c.depth_device[slot, :length].clone(), self.prunes(slot))

    def prunes(self, slot: int) -> bool:
        """Whether `slot`'s prompt was pruned or attended sparsely (so continuing it is not a fresh prefill)."""
        return bool(self._pruned[slot]) and not self.schedule.is_dense

    def resume(self, slot: int, held: Held, length: int) -> None:
        """Make `slot` hold the first `length` tokens of `held`, settled, ready for `extend`: a K/V row depends
        only on the tokens before it, so any prefix of a held sequence is a valid prompt state."""
        c = self.cache
        c.ensure_clean(length)
        c.k[:, slot, :, :length] = held.k[:, :, :length]
        c.v[:, slot, :, :length] = held.v[:, :, :length]
        c.aux[slot, :length] = held.aux[:length]
        c.depth_device[slot] = -1
        c.depth_device[slot, :length] = held.depth[:length]
        c.length[slot] = length
        depth = held.depth[:length].cpu().numpy()
        self._prompt_lengths[slot] = length  # later tokens run every layer, as `plan_step` counts them
        self._prefill_sizes[slot] = [(depth >= l).sum() for l in range(self.a.num_layers)]
        self._pruned[slot] = held.pruned
        self._unsettled = [(s, d) for s, d in self._unsettled if slot not in s]

    def truncate(self, slot: int, length: int) -> None:
        """Forget `slot`'s tokens from position `length` on (a continuation and its answer), keeping the prompt
        before it with everything computed for it since, revived tokens included: a K/V row depends only on the
        tokens before it."""
        if not 0 < length <= self.cache.length[slot]:
            raise ValueError(f"can keep 1 to {int(self.cache.length[slot])} tokens of slot {slot}, not {length}")
        self.cache.depth_device[slot, length:] = -1
        self.cache.length[slot] = length

    def _prefill_scores(
        self, layer: int, qp: torch.Tensor, kp: torch.Tensor, rows: Packing, pos: torch.Tensor, span: int,
        seqs: torch.Tensor,
    ) -> torch.Tensor:
        """The scorer's [B, width] scores of every active row, from the last `query_rows` rows' queries.

        qp: [B, H, width, dh], kp: [B, Hkv, width, dh] padded as `rows.pad` lays rows out; pos: [N] packed;
        seqs: [B] each sequence's id (Engine.prefill's `ids`).
        """
        w = self.schedule.scorer.query_rows
        slots = rows.last_slot[:, None] - torch.arange(w - 1, -1, -1, device=pos.device)  # [B, w], q last
        present = slots >= 0
        slots = slots.clamp(min=0)
        q = qp.gather(2, slots[:, None, :, None].expand(-1, qp.shape[1], -1, qp.shape[3]))  # [B, H, w, dh]
        pos_p = rows.pad(pos)  # [B, width]
        q_pos = pos_p.gather(1, slots).masked_fill(~present, -1)
        x = ScoreInput(q, q_pos, kp, pos_p, rows.valid, self.a.scaling, layer, span, seq=seqs,
                       reduce_heads=self.a.reduce_heads)
        return self.schedule.scorer.score(x)

    # --------------------------------------------------------------- decoding
    def decode(self, tokens: torch.Tensor, seqs: list[int]) -> tuple[torch.Tensor, list[StepStats]]:
        """`step`, then its stats: tokens [A] -> logits [A, vocab], stats of each sequence in `seqs`."""
        logits, stats = self.step(tokens, seqs)
        return logits, stats.get()

    def step(self, tokens: torch.Tensor, seqs: list[int]) -> tuple[torch.Tensor, PendingStats]:
        """tokens: [A] the newest token of each sequence in `seqs` (ascending; the rest have stopped), on the device
        -> their logits [A, vocab] and the step's stats, read when asked for. Each token becomes its sequence's q at
        position length.

        Plan (host: sizes), then one static-shape segment run after another. How many rows enter after a
        pruning layer that reselects is known only on the device, so the host waits for that count before
        laying out the next segment; under a revival bound (Revive) with buckets, every segment is laid out at
        the bound instead, and the step never waits: its counts are copied to the host behind its kernels, so
        that a caller can enqueue the next step before reading this one's tokens (LazyLLM.stream).
        """
        c = self.cache
        plan = plan_step(self.schedule, self.reselects, c.length, seqs, self.a.num_layers, self.capacity,
                         self._prefill_sizes, self._prompt_lengths, self._pruned)
        c.ensure_clean(plan.keys)
        c.length[seqs] += 1
        self.runner.load(tokens, seqs, plan)
        self.recorder.begin(seqs)
        if self._bounded is not None:
            for index, n in enumerate(self._bounded):
                self._run(index, layout_rows(n, plan.keys, self.graph_layout), plan.keys)
            counts = PendingStats.copy(self.runner.counts)
        else:
            counts = np.zeros((len(self.segments), 3, c.batch), dtype=np.int64)  # entering each segment, revived, |S|
            counts[:, 0, seqs] = 1  # q alone, unless a pruning layer that reselects brings more (read from the device)
            counts[:, 2] = plan.sizes[:, [seg.first for seg in self.segments]].T  # as planned
            for index in range(len(self.segments)):
                if index > 0 and self.reselects:
                    counts[index] = self.runner.counts[index].tolist()  # a wait per pruning layer
                self._run(index, layout_rows(int(counts[index, 0].max()), plan.keys, self.graph_layout), plan.keys)
        self.recorder.end()
        if self.a.tp is not None:  # every rank took this step with the same tokens and selected alike (a wait)
            stepped = self.runner.seqs
            self.a.check_same("a decoding step's tokens and selections", tokens, c.depth_device[stepped],
                              self.runner.in_s[stepped])
        return self.a.logits(self.runner.q_hidden()), PendingStats(self.segments, list(seqs), counts)

    def _run(self, index: int, R: int, keys: int) -> None:
        """Segment `index` on R rows per sequence (plan.layout_rows), keys [0, keys).

        A burst of revived rows is a one-off shape whose work dwarfs its launches: it runs as it is, exactly
        sized, rather than captured as a graph used once."""
        run = eager if R > GRAPH_MAX_ROWS else self._run_segment
        run((index, R, keys), partial(self.runner.run, self.segments[index], index, R, keys, self.schedule.scorer,
                                      self.recorder))


class PendingStats:
    """A decoding step's per-layer counts, read from the device only when asked for (`get`).

    counts: [segments, 3 (entering, revived, |S|), B], on the host, or a device tensor whose copy to the host is
    enqueued behind the step (`copy`), so that reading it waits for that step and nothing later."""

    def __init__(self, segments: list[Segment], seqs: list[int], counts: np.ndarray | tuple) -> None:
        self.segments, self.seqs, self._counts = segments, seqs, counts

    @staticmethod
    def copy(counts: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """A host copy of `counts` enqueued on the current stream (pinned memory on CUDA), and its event."""
        if counts.device.type != "cuda":
            return counts.clone(), None
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event

    def get(self) -> list[StepStats]:
        """Per-layer counts of each stepping sequence (waits for the step if its counts are still on the way)."""
        if isinstance(self._counts, tuple):
            host, event = self._counts
            if event is not None:
                event.synchronize()
            self._counts = host.numpy()
        stats = []
        for b in self.seqs:
            s = StepStats()
            for seg, (entering, revived, candidates) in zip(self.segments, self._counts[:, :, b].tolist()):
                n = len(seg.layers)
                s.candidates += [candidates] * n
                s.computed += [entering] * n
                s.revived += [revived] + [0] * (n - 1)
            stats.append(s)
        return stats
