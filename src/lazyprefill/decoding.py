"""The device side of a decoding step: one segment of layers (plan.py) over a static [B, R] block of rows.

Legend: B sequences, R rows laid out per sequence (plan.layout_rows: a bucket, or a burst's exact count),
T keys attended (positions [0, T), plan.key_length), P cache slots (capacity + the scratch slot), H / Hkv
query / key-value heads, dh head size.

A segment run reads its inputs from buffers that live as long as the engine (the step's tokens and
positions, the candidate-set membership `in_s`, the cache) and writes only into them, with shapes
fixed by (segment, R, T). So on CUDA each such run is captured once as a CUDA graph and replayed; on
the CPU the same code runs eagerly. Padded rows point at the scratch slot: they compute garbage that
nothing reads, and no write needs a mask.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import numpy as np
import torch
import torch._dynamo.config as dynamo_config
import torch.fx.experimental._config as fx_config
from torch._dynamo.exc import BackendCompilerFailed

from .adapters import LlamaAdapter
from .attention import decode_mask, listed_positions, masked_kernels, row_ranges, sdpa
from .cache import LazyCache, kv_rows
from .plan import Segment, StepPlan
from .recording import Recorder
from .scoring import ScoreInput, Scorer

logger = logging.getLogger(__name__)


class SegmentRunner:
    """Runs the segments of decoding steps for one batch and cache."""

    def __init__(
        self, adapter: LlamaAdapter, cache: LazyCache, reselects: bool, num_pruning: int, split_kernel: bool,
        burst_kernel: bool = False, compile_layers: bool = False, compact: bool = False,
        revival_rows: int | None = None, ratios: tuple[float, ...] = (),
    ) -> None:
        B, P = cache.depth_device.shape
        dev, long = adapter.device, torch.long
        self.a, self.cache, self.reselects = adapter, cache, reselects
        self.compact = compact  # runs are never captured: a step takes only the sequences that step (`run`)
        self.partial = False  # this step leaves some slots out
        self.layers: LlamaAdapter | CompiledLayers = CompiledLayers.of(adapter) if compile_layers else adapter
        # the Triton kernels that read only S_l's K/V (CUDA): few rows per sequence, and bursts of many
        self.split = self.burst = None
        if split_kernel:
            from .kernels import split_attention

            if split_attention.warm_up(adapter.dtype, adapter.head_dim, dev):
                self.split = split_attention
        if burst_kernel:
            from .kernels import burst_attention

            group = adapter.num_heads // adapter.num_kv_heads
            if burst_attention.warm_up(adapter.dtype, adapter.head_dim, group, dev):
                self.burst = burst_attention
        # On the CPU a sliding-window layer reads only the keys its rows' windows reach: where the earliest row is
        # costs a host read there, nothing more (on CUDA it would wait for the device, and graphs cannot read)
        self.clip_windows = dev.type == "cpu"
        self.positions = torch.arange(P, device=dev)  # [P]
        self.batch = torch.arange(B, device=dev)  # [B]
        # inputs of a step, written by `load`
        self.tokens = torch.zeros(B, dtype=long, device=dev)  # [B] each sequence's newest token
        self.t = torch.full((B,), cache.scratch, dtype=long, device=dev)  # [B] its q position (scratch: inactive)
        self.active = torch.zeros(B, dtype=torch.bool, device=dev)  # [B]
        self.keep = torch.zeros(num_pruning, B, dtype=long, device=dev)  # [n_pruning, B] |S| after each pruning
        # under a revival bound (Revive): [B] how many candidates that stopped at a pruning layer a step may keep,
        # and [n_pruning] each pruning layer's keep ratio, applied to the candidates the bound left
        self.revive = torch.full((B,), (revival_rows or 1) - 1, dtype=long, device=dev)
        self.ratios = torch.tensor(ratios, dtype=torch.float64, device=dev)
        self.seqs = self.batch  # [A] the sequences taking this step
        self.ids = torch.arange(B, device=dev)  # [B] each slot's sequence id (Engine.prefill's `ids`)
        # state carried from one segment to the next
        self.in_s = torch.zeros(B, P, dtype=torch.bool, device=dev)  # [B, P] membership of S_l
        # [segments, 3, B] rows entering each segment, how many of them are revived, and |S| there: segment 0 takes
        # q alone among every token (`load`), a pruning segment writes the next one's
        self.counts = torch.zeros(num_pruning + 1, 3, B, dtype=long, device=dev)
        # a segment's small tensor work (its rows, the attention's position lists, the selection), through
        # torch.compile with the layer halves (COMPILE_SELECTION); under tensor parallelism the scorer's head
        # reduction is an all-reduce (LlamaAdapter.reduce_heads), which stays out of compiled code
        compiled = compile_layers and COMPILE_SELECTION
        self._rows = compile_dynamic(segment_rows) if compiled else segment_rows
        self._listed = compile_dynamic(listed_positions) if compiled else listed_positions
        self._split_lists = compile_dynamic(split_lists) if compiled else split_lists
        select_compiled = compiled and adapter.tp is None
        self._select = compile_dynamic(score_and_reselect) if select_compiled else score_and_reselect

    def load(self, tokens: torch.Tensor, seqs: list[int], plan: StepPlan) -> None:
        """Copy a step's inputs into the buffers (one host-to-device copy). tokens: [A] for `seqs`."""
        t = np.where(plan.active, plan.t, self.cache.scratch)
        host = np.concatenate([t, plan.active, plan.keep.reshape(-1), seqs]).astype(np.int64)
        values = torch.from_numpy(host)
        if self.a.device.type == "cuda":
            values = values.pin_memory()
        values = values.to(self.a.device, non_blocking=True)
        B = t.shape[0]
        t_dev, active, keep, self.seqs = values.split([B, B, plan.keep.size, len(seqs)])
        self.partial = len(seqs) < B
        self.t.copy_(t_dev)
        self.active.copy_(active.bool())
        self.keep.copy_(keep.view_as(self.keep))
        self.tokens.index_copy_(0, self.seqs, tokens)
        self.counts.zero_()
        self.counts[0, 0] = self.active
        self.counts[0, 2] = torch.where(self.active, self.t + 1, 0)

    def q_hidden(self) -> torch.Tensor:
        """[A, d] the last layer's output for each stepping sequence's q."""
        return self.cache.aux[self.seqs, self.t[self.seqs]]

    def run(self, seg: Segment, index: int, R: int, T: int, scorer: Scorer, recorder: Recorder) -> None:
        """Layers seg.first..seg.last on the rows entering seg.first (at most R per sequence), keys [0, T).

        `index`: the segment's place in the step (and which pruning layer seg.last is, when it prunes). A
        pruning segment leaves in `counts[index + 1]` the rows that enter the next segment (at most R there, by
        the host's count or a revival bound).

        A run that is never captured (`compact`) takes only the sequences that step (`seqs`): a server's idle
        slots would otherwise cost as much as busy ones (CPU, 8 slots, 1 busy: 149 against 60 ms a step).
        Captured runs take every slot, for their static shapes (an idle slot's q is the scratch slot).
        """
        # bs: [b] the sequences this run takes (their ids index the cache); sel indexes per-sequence tensors with
        # them, a slice when it is every slot, so that those stay views (the captured runs' buffers)
        if self.compact and self.partial:
            bs, sel = self.seqs, self.seqs
        else:
            bs, sel = self.batch, slice(None)
        in_s = self.in_s[sel, :T]  # [b, T]: a view, or a copy written back below
        self._run(seg, index, R, T, scorer, recorder, bs, sel, in_s)
        if isinstance(sel, torch.Tensor):
            self.in_s[sel, :T] = in_s

    def _run(self, seg: Segment, index: int, R: int, T: int, scorer: Scorer, recorder: Recorder,
             bs: torch.Tensor, sel: torch.Tensor | slice, in_s: torch.Tensor) -> None:
        a, c = self.a, self.cache
        b, H, dh = bs.shape[0], a.num_heads, a.head_dim
        t = self.t[sel]  # [b]
        if seg.first == 0:
            c.aux[bs, t] = a.embed(self.tokens[sel])
        self._start_membership(seg, T, in_s, sel, t)
        keys = self.positions[:T].expand(b, T)
        rows, valid, count, seq, pos, kv_index, h, cos, sin = self._rows(  # SegmentRows
            in_s, c.depth_device[sel, :T], seg.first - 1, R, c.scratch, self.positions, bs, c.aux, c.k.shape[2],
            c.k.shape[3], a.rope)
        recorder.layers(len(seg.layers), keys, in_s, rows, valid)
        attend = self._attention(in_s, rows, valid, T, sel)
        for l in seg.layers:
            q, kv = self.layers.qkv_pair(l, h, cos, sin)  # q: [b * R, H, dh], kv: [2, b * R, Hkv, dh]
            c.write_kv_pair(l, seq, pos, kv, kv_index)
            o = attend(l, q.view(b, R, H, dh).transpose(1, 2))  # [b, H, R, dh]
            h = self.layers.finish(l, h, o.transpose(1, 2).reshape(b * R, H, dh))
        c.aux[seq, pos] = h
        c.depth_device[seq, pos] = torch.full_like(pos, seg.last, dtype=torch.int32)  # a device value: capturable
        if not (seg.prunes and self.reselects):
            return
        q_last = q.view(b, R, H, dh)[self.batch[:b], (count - 1).clamp(0, R - 1)]  # [b, H, dh]: q is each last row
        x = ScoreInput(q_last[:, :, None], t[:, None], c.k[seg.last, sel, :, :T], keys, in_s, a.scaling, seg.last, T,
                       seq=self.ids[sel], reduce_heads=a.reduce_heads)
        ratio = self.ratios[index] if scorer.revival_rows is not None else None
        scores, chosen, counts = self._select(scorer, x, c.depth_device[sel, :T], self.keep[index, sel], ratio,
                                              self.revive[sel], rows, valid)
        recorder.scores(seg.last, keys, in_s, scores)
        in_s.copy_(chosen)
        self.counts[index + 1][:, sel] = counts

    def _attention(
        self, in_s: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor, T: int, sel: torch.Tensor | slice
    ) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """How this segment's rows attend, causally by position, to S_l (in_s: [b, T]; rows, valid: [b, R]; the
        run's sequences `sel`): (layer, q [b, H, R, dh]) -> [b, H, R, dh]. The Triton kernels read S_l's K/V
        through a list of positions built once per segment: the split kernel for a few rows (no window), the
        burst kernel for many (each row's range of the list carries causality and a window). The written-out
        attention reads the keys with a mask, which also carries a window (by original position, attention.py):
        all T, or on the CPU a windowed layer's from the first that its rows' windows reach (_first_key)."""
        c, a, scaling = self.cache, self.a, self.a.scaling
        masks: dict[int | None, tuple[int, torch.Tensor]] = {}  # window -> first key, [b, R or 1, T - first]

        def masked(l: int, q: torch.Tensor) -> torch.Tensor:
            window = a.window(l)
            if window not in masks:
                lo = self._first_key(rows, valid, T, window)
                masks[window] = lo, decode_mask(in_s, rows, T, window)[..., lo:]
            lo, mask = masks[window]
            return masked_attention(q, c.k[l, sel, :, lo:T], c.v[l, sel, :, lo:T], mask, scaling)

        few = rows.shape[1] * a.num_heads // a.num_kv_heads <= SPLIT_MAX_ROWS
        if (self.split if few else self.burst) is None:
            return masked
        def kv(l: int) -> tuple[torch.Tensor, torch.Tensor]:  # [b, Hkv, P or T, dh]: every slot's, or the run's
            return (c.k[l], c.v[l]) if isinstance(sel, slice) else (c.k[l, sel, :, :T], c.v[l, sel, :, :T])

        if few:
            listed, n_s, qpos = self._split_lists(in_s, rows)  # [b, T], [b], [b, R]

            def split(l: int, q: torch.Tensor) -> torch.Tensor:
                if a.window(l) is not None:  # the kernel knows no window
                    return masked(l, q)
                return self.split.split_attention(q, *kv(l), listed, n_s, qpos, scaling)

            return split
        listed = self._listed(in_s)  # [b, T]
        ranges: dict[int | None, tuple[torch.Tensor, torch.Tensor]] = {}  # window -> lo, hi: [b, R] each

        def burst(l: int, q: torch.Tensor) -> torch.Tensor:
            window = a.window(l)
            if window not in ranges:
                ranges[window] = row_ranges(in_s, rows, valid, window)
            return self.burst.burst_attention(q, *kv(l), listed, *ranges[window], scaling)

        return burst

    def _first_key(self, rows: torch.Tensor, valid: torch.Tensor, T: int, window: int | None) -> int:
        """The first of T keys that a layer of this window lets the rows (rows, valid: [b, R]) attend to; 0 where
        windows are not clipped. A step's rows are mostly its newest tokens, so a window then reads its width, not
        the whole prompt (Gemma 3 at 8K on the CPU: 15 of 18 layers, 512 keys each against 8,192)."""
        if window is None or not self.clip_windows or T <= window:
            return 0
        earliest = int(rows.masked_fill(~valid, T).min())  # padding rows: T
        return max(0, earliest - window + 1)

    def _start_membership(
        self, seg: Segment, T: int, in_s: torch.Tensor, sel: torch.Tensor | slice, t: torch.Tensor
    ) -> None:
        """S_0 is every token so far; without reselection S_l is the tokens whose K/V at l exists, plus q."""
        if seg.first > 0 and self.reselects:
            return  # S was selected at the previous pruning layer
        pos = self.positions[:T]
        members = (pos <= t[:, None]) & self.active[sel, None]
        if not self.reselects:
            members &= (self.cache.depth_device[sel, :T] >= seg.first) | (pos == t[:, None])
        in_s.copy_(members)


class CompiledLayers:
    """An adapter's two layer halves through torch.compile, so that a step's small kernels (RMSNorm's seven,
    RoPE's ten, the residual adds, the MLP's activation and product) fuse into a few.

    The halves that take the layer's module (`block_qkv_pair`, `block_finish`) are compiled, not those that take
    its index, so one compiled version serves every layer. Row counts are dynamic (one row apart: torch
    specializes sizes of 1), so buckets and bursts do not recompile. The first call of a shape compiles:
    Graphs runs every new shape eagerly before capturing it.
    """

    def __init__(self, adapter: LlamaAdapter) -> None:
        self.a = adapter
        self._qkv = torch.compile(adapter.block_qkv_pair, dynamic=True, options=COMPILE_OPTIONS)
        self._finish = torch.compile(adapter.block_finish, dynamic=True, options=COMPILE_OPTIONS)

    @classmethod
    def of(cls, adapter: LlamaAdapter) -> CompiledLayers:
        """The adapter's compiled halves under the current COMPILE_OPTIONS, made once and kept on the adapter (they
        live and go with it): building torch.compile wrappers takes milliseconds of host time, which every engine
        paid (a server's pools, a call with a new batch size, each prefill that `bench` times)."""
        made: dict[str, CompiledLayers] = adapter.__dict__.setdefault("_compiled_layers", {})
        key = repr(sorted(COMPILE_OPTIONS.items()))
        if key not in made:
            made[key] = cls(adapter)
        return made[key]

    def qkv_pair(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As LlamaAdapter.qkv_pair. h: [n, d] -> q: [n, H, dh], kv: [2, n, Hkv, dh]."""
        return self._qkv(self.a.layers[layer], h, *self.a.layer_rope(layer, cos, sin))

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """As LlamaAdapter.finish. h: [n, d], attn_out: [n, H, dh] -> [n, d]. attn_out is made contiguous
        (o_proj copies a strided one anyway), so that its strides, which differ with the batch, do not
        recompile."""
        return self._finish(self.a.layers[layer], h, attn_out.contiguous())


def top_k(
    scores: torch.Tensor, in_s: torch.Tensor, is_q: torch.Tensor, keep: torch.Tensor,
    bounded: torch.Tensor | None = None, allowance: torch.Tensor | None = None,
) -> torch.Tensor:
    """The keep[b] best candidates of each sequence, q always kept -> [B, T] bool. With `bounded` ([B, T] bool),
    only the allowance[b] best of those candidates may be among them (Revive: rows a step may compute), and the
    keep count is filled from the others.

    scores, in_s, is_q: [B, T] over positions; keep, allowance: [B]. One stable sort over positions ranks every
    candidate (ties go to the earlier position, as scoring.select breaks them over packed candidates in position
    order); the bound and the keep count are then running counts along that order.
    """
    s = scores.masked_fill(~in_s, float("-inf")).masked_fill(is_q, float("inf"))
    order = torch.argsort(s, dim=1, descending=True, stable=True)  # [B, T]
    member = in_s.gather(1, order)  # [B, T] in rank order
    if bounded is not None:
        over = bounded.gather(1, order)
        member &= ~(over & (over.cumsum(1) > allowance[:, None]))
    return torch.zeros_like(in_s).scatter_(1, order, member & (member.cumsum(1) <= keep[:, None]))


@functools.cache
def compile_dynamic(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn through torch.compile with every size its own symbol, one wrapper per function in a process (building one
    takes host time that every new engine would pay: benchmarks/results/profiles/engine-build-cpu-2026-12-07.txt).
    With duck sizing, sizes that happen to be equal when it first compiles (the batch, the pruning layers, a view's
    offset into its buffer) would be guarded equal, and another batch or layer would compile it again.
    score_and_reselect compiles its versions per scorer (a row or more, a sequence or more), so a process that
    decodes with several scorers (`tune`'s search) needs more versions of one function than Dynamo keeps by default
    (8): RECOMPILE_LIMIT.

    Where the compiler fails on a version, fn runs eagerly from then on in this process, every version of it (it
    computes the same; a warning says which error): torch 2.11's Triton code generation failed on
    score_and_reselect over several sequences at once (a symbolic batch) on an H200, which ended every request of a
    server's step (benchmarks/NOTES.md, "Ninth GPU session"). Part of fn may have run before the failure (a graph
    break), so what goes through here must be pure: it returns new tensors and writes nothing it was given."""
    compiled = torch.compile(fn, dynamic=True)
    eager = False

    def call(*args: Any) -> Any:
        nonlocal eager
        if eager:
            return fn(*args)
        try:
            with fx_config.patch(use_duck_shape=False), dynamo_config.patch(recompile_limit=RECOMPILE_LIMIT):
                return compiled(*args)
        except BackendCompilerFailed as err:
            cause = getattr(err, "inner_exception", err)
            logger.warning("torch.compile failed on %s; it runs eagerly from now on: %s: %s",
                           fn.__name__, type(cause).__name__, (str(cause).splitlines() or [""])[0])
            eager = True
            return fn(*args)

    return call


def entering_rows(
    in_s: torch.Tensor, depth: torch.Tensor, stopped_at: int, R: int, scratch: int, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The candidates (in_s: [b, T]) that stopped at layer `stopped_at` (depth: [b, T]), which enter the next one:
    [b, R] positions in order (the scratch slot where padded), [b, R] bool real, [b] count (at most R enter).
    positions: [P] the runner's 0, 1, 2, ... (P >= T and P >= R)."""
    b, T = in_s.shape
    enter = in_s & (depth == stopped_at)  # [b, T]
    count = enter.sum(1)
    rank = enter.cumsum(1)
    slot = torch.where(enter & (rank <= R), rank - 1, R)  # column R collects the rest and is dropped
    rows = torch.full((b, R + 1), scratch, dtype=torch.long, device=in_s.device)
    rows.scatter_(1, slot, positions[:T].expand(b, T))
    return rows[:, :R], positions[:R] < count[:, None], count


class SegmentRows(NamedTuple):
    """The rows that enter a segment, and what each of its layers reads about them (segment_rows)."""

    rows: torch.Tensor  # [b, R] positions in order, the scratch slot where padded
    valid: torch.Tensor  # [b, R] bool: a real row
    count: torch.Tensor  # [b] how many entered (at most R are laid out)
    seq: torch.Tensor  # [b * R] each row's sequence (slot)
    pos: torch.Tensor  # [b * R] its position
    kv_index: torch.Tensor  # [b * R * Hkv] where its K/V goes (LazyCache.kv_index)
    h: torch.Tensor  # [b * R, d] its hidden state from the Aux Cache
    cos: torch.Tensor  # RoPE's tables for pos (the adapter's rope)
    sin: torch.Tensor


def segment_rows(
    in_s: torch.Tensor, depth: torch.Tensor, stopped_at: int, R: int, scratch: int, positions: torch.Tensor,
    bs: torch.Tensor, aux: torch.Tensor, kv_heads: int, slots: int,
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> SegmentRows:
    """entering_rows for the sequences `bs` ([b]), and what every layer of the segment reads about those rows, in one
    function so that torch.compile fuses their index arithmetic, the Aux Cache read (aux: [B, P, d]) and RoPE's
    tables into a few kernels. kv_heads, slots: the K/V cache's heads and slots a sequence."""
    rows, valid, count = entering_rows(in_s, depth, stopped_at, R, scratch, positions)
    b = rows.shape[0]
    seq, pos = bs[:, None].expand(b, R).reshape(-1), rows.reshape(-1)  # [b * R]
    cos, sin = rope(pos)
    return SegmentRows(rows, valid, count, seq, pos, kv_rows(seq, pos, kv_heads, slots), aux[seq, pos], cos, sin)


def split_lists(in_s: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the split kernel reads about S_l (in_s: [b, T]) and the rows (rows: [b, R]), int32: listed_positions,
    |S_l| [b] and the rows' positions [b, R]."""
    return listed_positions(in_s), in_s.sum(1, dtype=torch.int32), rows.int()


def score_and_reselect(
    scorer: Scorer, x: ScoreInput, depth: torch.Tensor, keep: torch.Tensor, ratio: torch.Tensor | None,
    allowance: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scorer's [b, T] scores of a decoding step's candidates (x.valid: S_l), then `reselect` on them ->
    scores, the new S_l and its counts. One function, so that torch.compile fuses the scorer's masking,
    softmax and head reduction with the selection's own (x.pos == x.q_pos is q)."""
    scores = scorer.score(x)  # [b, T]
    chosen, counts = reselect(scores, x.valid, x.pos == x.q_pos, depth, x.layer, keep, ratio, allowance, rows, valid)
    return scores, chosen, counts


def reselect(
    scores: torch.Tensor, in_s: torch.Tensor, is_q: torch.Tensor, depth: torch.Tensor, last: int, keep: torch.Tensor,
    ratio: torch.Tensor | None, allowance: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoding step's selection at pruning layer `last`, from the scores of S_l's candidates (scores, in_s:
    [b, T]; is_q: [b, T] q's position; depth: [b, T]; keep: [b] the host's keep count) -> the new in_s [b, T] and
    [3, b] the rows that enter the next segment, how many of them are revived, and |S| (SegmentRunner.counts).

    With a revival bound (`ratio`: the layer's keep ratio, a 0-d tensor) the keep count is ceil(r |S_l|) as
    Schedule.kept_count rounds it, of the S_l that reached this layer (an earlier bound may have left it smaller
    than the host planned), and of the candidates that stopped here (they would need rows next) only the
    allowance[b] best may be kept. rows, valid: [b, R] this segment's rows, to count those that stay.
    """
    T = in_s.shape[1]
    stopped = depth == last  # [b, T]
    bounded = None
    if ratio is not None:
        bounded = in_s & stopped & ~is_q
        keep = torch.ceil(torch.round(in_s.sum(1) * ratio, decimals=6)).long().clamp(min=1)
    chosen = top_k(scores, in_s, is_q, keep, bounded, allowance)
    entering = (chosen & stopped).sum(1)
    stayed = (chosen.gather(1, rows.clamp(max=T - 1)) & valid).sum(1)  # rows of this segment still candidates
    return chosen, torch.stack([entering, entering - stayed, chosen.sum(1)])


# Whether DecodeOptions(compile=...) also compiles a segment's small tensor work (segment_rows, score_and_reselect and
# the Triton kernels' position lists), fusing a pruned step's scans, scatters, counts, RoPE tables and the scorer's
# softmax into a few kernels.
# Inductor's options for the compiled layer halves (torch.compile's `options`; empty: its defaults). With the
# defaults a residual add becomes the bias of a cuBLAS addmm, which first copies the residual into the output:
# two device-to-device memcpys a layer, which the pruned steps' CUDA graphs ran on the copy engine;
# {"pattern_matcher": False} keeps mm and add apart (and turns off Inductor's other pattern passes too).
# Together they took a pruned step's excess over a dense one from 0.35 to 0.24 ms at 8K (llama3-8b, H100),
# and dense's own step by 0.08 ms (benchmarks/NOTES.md, "Decoding steps, fifth GPU session").
COMPILE_SELECTION = True
# Versions of one compiled function Dynamo may keep (compile_dynamic): four per scorer, and `tune` tries several.
RECOMPILE_LIMIT = 64
COMPILE_OPTIONS: dict[str, object] = {"pattern_matcher": False}
# Rows x query heads per K/V head up to which the split kernel runs: one of its programs holds all of a K/V
# head's rows in one tile. Above it the burst kernel (when on), which splits the rows instead.
SPLIT_MAX_ROWS = 128
# Above this many attention logits (B x H x rows x keys; 256 MB in fp32) the rows are taken in chunks.
MASKED_ATTENTION_MAX_LOGITS = 2**26
# From this many rows (a burst of revived rows, as in the first steps after prefill) SDPA's memory-efficient
# kernel, which keeps the logits on chip, replaces the written-out logits (benchmarks/NOTES.md, whole answers).
SDPA_MIN_ROWS = 256


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """q: [B, H, R, dh], k/v: [B, Hkv, T, dh], mask: [B, R, T] bool (True: attend) -> [B, H, R, dh].

    Written out as two matmuls around an fp32 softmax because SDPA's masked kernels split the work by
    query rows: with the one or few rows of a decoding step they leave most of the GPU idle (1.3 ms a
    layer at 32K keys on an H100, against about 0.2 ms for this; benchmarks/NOTES.md). A row with
    nothing to attend to (padding) comes out NaN and is never read.
    """
    B, H, R, _ = q.shape
    if R >= SDPA_MIN_ROWS:
        return _sdpa_attention(q, k, v, mask, scaling)
    chunk = max(1, MASKED_ATTENTION_MAX_LOGITS // (B * H * k.shape[2]))
    if R <= chunk:
        return _masked_attention(q, k, v, mask, scaling)
    parts = [_masked_attention(q[:, :, i : i + chunk], k, v, mask[:, i : i + chunk], scaling)
             for i in range(0, R, chunk)]
    return torch.cat(parts, dim=2)


def _sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """masked_attention for many rows: on CUDA the memory-efficient kernel (fp32 accumulation, no graph built per
    shape; attention.sdpa repeats K/V for GQA there, since that kernel takes none). Only the kernel choice is
    scoped; process-wide SDPA state is untouched."""
    with masked_kernels(q):
        return sdpa(q, k, v, attn_mask=mask[:, None], scale=scaling)


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    B, heads, r, dh = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads  # query heads sharing one K/V head (GQA)
    qg = q.reshape(B * kv_heads, group * r, dh)
    logits = fp32_logits(qg, k.reshape(B * kv_heads, n_keys, dh)) * scaling  # [B * Hkv, G * r, T]
    logits = logits.view(B, kv_heads, group, r, n_keys).masked_fill(~mask[:, None, None], float("-inf"))
    p = logits.softmax(dim=-1).to(v.dtype).view(B * kv_heads, group * r, n_keys)
    return torch.bmm(p, v.reshape(B * kv_heads, n_keys, dh)).view(B, heads, r, dh)


def fp32_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q: [n, m, dh], k: [n, T, dh] -> q k^T [n, m, T] in fp32, never rounded to a 16-bit type first.

    cuBLAS accumulates in fp32 and writes fp32 directly (`out_dtype`); elsewhere the operands are upcast.
    """
    if q.dtype == torch.float32:
        return torch.bmm(q, k.transpose(1, 2))
    if q.is_cuda:
        return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
    return torch.bmm(q.float(), k.float().transpose(1, 2))


class Graphs:
    """CUDA graphs of segment runs, one per shape key (segment, rows, keys attended).

    A new key first runs eagerly on a side stream: that run does the step's work and is the warm-up that
    capture needs (cuBLAS handles and workspaces are created, and a compiled layer half compiles for a new
    shape, outside capture). Then it is captured, and replayed from the next call on. Graphs of the
    KEY_LENGTHS key lengths (the key's last item) used most recently are kept: lengths grow within a
    generation, and the next generation of the engine starts again near the last one's. If a capture is refused
    (a scorer that copies from the host mid-step, say), every later call runs eagerly.
    """

    KEY_LENGTHS = 4

    def __init__(self) -> None:
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.lengths: list[int] = []  # key lengths with graphs, least recently used first
        self.pool = None  # one memory pool for all: segments run one after another, never concurrently
        self.captured = 0  # graphs captured so far (a generation that captured none reused every graph)
        self.refused: str | None = None  # why capture failed, if it did

    def __call__(self, key: tuple, fn: Callable[[], None]) -> None:
        if self.refused is not None:
            fn()
            return
        self._use_length(key[-1])
        graph = self.graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        self._warm_up(fn)  # this step's work
        try:
            self.graphs[key] = self._capture(fn)
            self.captured += 1
        except RuntimeError as err:
            self.refused = str(err)

    def _use_length(self, length: int) -> None:
        if self.lengths and self.lengths[-1] == length:
            return
        if length in self.lengths:
            self.lengths.remove(length)
        self.lengths.append(length)
        for old in self.lengths[: -self.KEY_LENGTHS]:
            self.graphs = {k: g for k, g in self.graphs.items() if k[-1] != old}
        del self.lengths[: -self.KEY_LENGTHS]

    def _warm_up(self, fn: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, fn: Callable[[], None]) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.pool = graph.pool()
        return graph


def eager(key: tuple, fn: Callable[[], None]) -> None:
    """Runs a segment as it is (CPU, tracing, or graphs turned off)."""
    fn()
