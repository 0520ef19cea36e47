"""The layer loop: LazyLLM prefill and decoding steps over one sequence.

Prefill runs compacted: after a pruning layer only the survivors' rows go on, in original order and
with original position ids, so every layer is a plain causal SDPA call on a shorter sequence.
A decoding step runs only the rows that enter each layer (the new token q plus tokens revived from
the Aux Cache) against the K/V of that layer's candidate set S_l.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .adapters import LlamaAdapter
from .cache import LazyCache
from .schedule import Schedule
from .scoring import attention_row, random_scores, select

# Decoding attends with one or a few query rows to a K/V length that changes every step. cuDNN attention,
# SDPA's first choice on Hopper, plans a new graph per shape (~1.3 ms of host time per call, measured on an
# H100): flash attention first, then memory-efficient attention for masked calls (benchmarks/NOTES.md).
DECODE_ATTENTION = [
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH
]


@dataclass
class StepStats:
    """Per-layer token counts of one step (prefill or one decoding step)."""

    computed: list[int] = field(default_factory=list)  # rows that ran layer l
    candidates: list[int] = field(default_factory=list)  # |S_l|
    revived: list[int] = field(default_factory=list)  # rows resumed from the Aux Cache at layer l


@dataclass
class StepTrace:
    """What a step did, token by token: recorded only when tracing (tests, `inspect`)."""

    candidates: list[np.ndarray] = field(default_factory=list)  # S_l positions, per layer
    computed: list[np.ndarray] = field(default_factory=list)  # positions that ran layer l
    scores: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # l -> (pos, s)


class Engine:
    """Runs one sequence through prefill and decoding steps under a schedule."""

    def __init__(self, adapter: LlamaAdapter, schedule: Schedule, capacity: int, trace: bool = False) -> None:
        self.a = adapter
        self.schedule = schedule
        self.cache = LazyCache(adapter, capacity, track_writes=trace)
        self.trace = trace
        self.traces: list[StepTrace] = []
        self.generator: torch.Generator | None = None
        if schedule.mode == "random":
            self.generator = torch.Generator(device=adapter.device).manual_seed(schedule.seed)

    # ---------------------------------------------------------------- prefill
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, StepStats]:
        """ids: [n] on the model's device -> logits of the last token [vocab], per-layer stats.

        Never waits on the device: selection sizes are known on the host, and the host-side
        depth bookkeeping is settled by `settle()` once the first token's logits exist.
        """
        a, c, L = self.a, self.cache, self.a.num_layers
        n = ids.shape[0]
        stats, trace = StepStats(), StepTrace()
        rows: torch.Tensor | slice = slice(0, n)  # positions of the active rows
        h = a.embed(ids)  # [n_active, d]
        cos, sin = a.rope(torch.arange(n, device=ids.device))  # [n_active, dh]
        self._dropped: list[tuple[int, torch.Tensor]] = []
        for l in range(L):
            n_active = h.shape[0]
            stats.computed.append(n_active)
            stats.candidates.append(n_active)
            stats.revived.append(0)
            q, k, v = a.qkv(l, h, cos, sin)  # q: [H, n_active, dh], k/v: [Hkv, n_active, dh]
            c.write_kv(l, rows, k, v)
            o = F.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=True, scale=a.scaling, enable_gqa=a.num_heads != a.num_kv_heads
            )[0]
            scores = self._scores(q[:, -1], k) if l in self.schedule.keep else None
            del q, k, v  # free them before the MLP's activations: lower peak memory, as in transformers
            h = a.finish(l, h, o)
            if self.trace:
                pos_host = _host_positions(rows)
                c.count_writes(l, pos_host)
                trace.candidates.append(pos_host)
                trace.computed.append(pos_host)
            if scores is None:
                continue
            kept, dropped = select(scores, self.schedule.kept_count(l, n_active))
            if isinstance(rows, slice):
                rows = torch.arange(n, device=ids.device)
            if self.trace:
                trace.scores[l] = (_host_positions(rows), scores.cpu().numpy())
            c.aux.index_copy_(0, rows[dropped], h[dropped])
            self._dropped.append((l, rows[dropped]))
            rows, h, cos, sin = rows[kept], h[kept], cos[kept], sin[kept]
        self._prefill_len = n
        c.length = n
        if self.trace:
            self.traces.append(trace)
        return a.logits(h[-1:])[0], stats

    def settle(self) -> None:
        """Write prefill's depth bookkeeping to the host (after TTFT has been measured).

        Also zeroes the never-computed K/V above each dropped token's depth: decoding attends over
        all cached positions with those masked out, and uninitialised memory could hold NaN.
        """
        c = self.cache
        c.depth[: self._prefill_len] = self.a.num_layers - 1
        for layer, pos in self._dropped:
            c.depth[pos.cpu().numpy()] = layer
            c.k[layer + 1 :].index_fill_(2, pos, 0)
            c.v[layer + 1 :].index_fill_(2, pos, 0)
        self._dropped = []

    # --------------------------------------------------------------- decoding
    @sdpa_kernel(DECODE_ATTENTION, set_priority=True)
    def decode(self, token: torch.Tensor) -> tuple[torch.Tensor, StepStats]:
        """token: [1] the newest token (becomes q at position t) -> its logits [vocab], stats."""
        a, c, L, sched = self.a, self.cache, self.a.num_layers, self.schedule
        t = c.length
        c.length = t + 1
        depth = c.depth
        dev = token.device
        c.aux[t] = a.embed(token)[0]
        depth[t] = -1
        cand: np.ndarray | None = None  # S_l positions; None: every token 0..t
        cand_dev: torch.Tensor | None = None  # the same on the device, updated only when S changes
        in_s: torch.Tensor | None = None  # [t+1] bool: is each position in S_l (masks the attention)
        prev_rows = np.array([t])
        stats, trace = StepStats(), StepTrace()
        cos_q, sin_q = a.rope(torch.tensor([t], device=dev))
        for l in range(L):
            if sched.mode == "static" and sched.keep:
                cand = _with_last(np.flatnonzero(depth[:t] >= l), t)
                cand_dev = torch.from_numpy(cand).to(dev)
                in_s = _membership(cand_dev, t + 1)
            full = cand is None
            cand_host = np.arange(t + 1) if full else cand
            # enter layer l: stopped just before it (a scan of depth is cheaper than a gather when full)
            rows = np.flatnonzero(depth[: t + 1] == l - 1) if full else cand[depth[cand] == l - 1]
            n_rows = rows.shape[0]
            stats.computed.append(n_rows)
            stats.candidates.append(cand_host.shape[0])
            # one row is q alone, which ran the previous layer too
            stats.revived.append(0 if n_rows == 1 else int(np.setdiff1d(rows, prev_rows, assume_unique=True).shape[0]))
            if n_rows == 1:
                rows_dev: torch.Tensor | slice = slice(t, t + 1)
                cos, sin = cos_q, sin_q
            else:
                rows_dev = torch.from_numpy(rows).to(dev)
                cos, sin = a.rope(rows_dev)
            h = c.aux[rows_dev]  # [n_rows, d]
            q, k_new, v_new = a.qkv(l, h, cos, sin)
            c.write_kv(l, rows_dev, k_new, v_new)
            c.count_writes(l, rows)
            # Attend over every cached position and mask out those outside S_l: gathering S_l's K/V
            # instead moves 3x the bytes of S_l per layer (benchmarks/NOTES.md).
            k, v = c.k[l, :, : t + 1], c.v[l, :, : t + 1]  # [Hkv, t+1, dh] views
            mask = None if full else in_s[None]  # [1, t+1]
            if n_rows > 1:  # revived rows attend causally by original position
                causal = torch.arange(t + 1, device=dev)[None, :] <= rows_dev[:, None]  # [n_rows, t+1]
                mask = causal if mask is None else mask & causal
            if mask is None:
                o = F.scaled_dot_product_attention(
                    q[None], k[None], v[None], scale=a.scaling, enable_gqa=a.num_heads != a.num_kv_heads
                )[0]
            else:
                o = _masked_attention(q, k, v, mask, a.scaling)
            h = a.finish(l, h, o)
            c.aux[rows_dev] = h
            depth[rows] = l
            prev_rows = rows
            if self.trace:
                trace.candidates.append(cand_host.copy())
                trace.computed.append(rows.copy())
            if l in sched.keep and sched.mode != "static":
                k_cand = k if full else c.k[l].index_select(1, cand_dev)  # [Hkv, |S_l|, dh]
                scores = self._scores(q[:, -1], k_cand)
                kept, _ = select(scores, sched.kept_count(l, cand_host.shape[0]))
                if self.trace:
                    trace.scores[l] = (cand_host.copy(), scores.cpu().numpy())
                cand = cand_host[kept.cpu().numpy()]
                cand_dev = kept if cand_dev is None else cand_dev[kept]
                in_s = _membership(cand_dev, t + 1)
        if self.trace:
            self.traces.append(trace)
        return a.logits(c.aux[t : t + 1])[0], stats

    def _scores(self, q_last: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.generator is not None:
            return random_scores(k.shape[1], self.generator, k.device)
        return attention_row(q_last, k, self.a.scaling)


def _host_positions(rows: torch.Tensor | slice) -> np.ndarray:
    if isinstance(rows, slice):
        return np.arange(rows.start, rows.stop)
    return rows.cpu().numpy()


# Above this many attention logits (H x rows x keys; 256 MB in fp32) decoding's masked attention goes to
# SDPA instead of writing the logits out.
MASKED_ATTENTION_MAX_LOGITS = 2**26


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """q: [H, r, dh], k/v: [Hkv, T, dh], mask: [r or 1, T] bool (True: attend) -> [H, r, dh].

    Written out as two matmuls around a softmax because SDPA's masked kernels split the work by query
    rows: with the one or few rows of a decoding step they leave most of the GPU idle (1.3 ms a layer
    at 32K keys on an H100, against about 0.2 ms for this; benchmarks/NOTES.md).
    """
    heads, r, dh = q.shape
    kv_heads, n_keys = k.shape[0], k.shape[1]
    group = heads // kv_heads  # query heads sharing one K/V head (GQA)
    if heads * r * n_keys > MASKED_ATTENTION_MAX_LOGITS:  # many revived rows: SDPA's masked kernel suits them
        if group > 1:  # the memory-efficient kernel takes no GQA; without it SDPA would fall back to math
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scaling)[0]
    qg = q.reshape(kv_heads, group * r, dh)
    logits = torch.matmul(qg, k.transpose(1, 2)).float() * scaling  # [Hkv, G*r, T]
    logits = logits.view(kv_heads, group, r, n_keys).masked_fill(~mask, float("-inf"))
    p = logits.softmax(dim=-1).to(v.dtype).view(kv_heads, group * r, n_keys)
    return torch.matmul(p, v).view(heads, r, dh)


def _membership(positions: torch.Tensor, n: int) -> torch.Tensor:
    """positions: [m] -> [n] bool, True at those positions."""
    return torch.zeros(n, dtype=torch.bool, device=positions.device).index_fill_(0, positions, True)


def _with_last(positions: np.ndarray, t: int) -> np.ndarray:
    return np.append(positions, t)
