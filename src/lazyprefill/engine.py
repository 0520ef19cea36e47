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

from .adapters import LlamaAdapter
from .cache import LazyCache
from .schedule import Schedule
from .scoring import attention_row, random_scores, select


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
            h = a.finish(l, h, o)
            if self.trace:
                pos_host = _host_positions(rows)
                c.count_writes(l, pos_host)
                trace.candidates.append(pos_host)
                trace.computed.append(pos_host)
            if l not in self.schedule.keep:
                continue
            scores = self._scores(q[:, -1], k)
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
        """Write prefill's depth bookkeeping to the host (after TTFT has been measured)."""
        depth = self.cache.depth
        depth[: self._prefill_len] = self.a.num_layers - 1
        for layer, pos in self._dropped:
            depth[pos.cpu().numpy()] = layer
        self._dropped = []

    # --------------------------------------------------------------- decoding
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
        prev_rows = np.array([t])
        stats, trace = StepStats(), StepTrace()
        cos_q, sin_q = a.rope(torch.tensor([t], device=dev))
        for l in range(L):
            if sched.mode == "static" and sched.keep:
                cand = _with_last(np.flatnonzero(depth[:t] >= l), t)
            full = cand is None
            cand_host = np.arange(t + 1) if full else cand
            rows = cand_host[depth[cand_host] == l - 1]  # enter layer l: stopped just before it
            n_rows = rows.shape[0]
            stats.computed.append(n_rows)
            stats.candidates.append(cand_host.shape[0])
            stats.revived.append(int(np.setdiff1d(rows, prev_rows, assume_unique=True).shape[0]))
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
            if full:
                k, v = c.k[l, :, : t + 1], c.v[l, :, : t + 1]  # [Hkv, t+1, dh] views
                cand_dev = None
            else:
                cand_dev = torch.from_numpy(cand_host).to(dev)
                k, v = c.k[l][:, cand_dev], c.v[l][:, cand_dev]  # [Hkv, |S_l|, dh]
            mask = None
            if n_rows > 1:  # revived rows attend causally by original position
                key_pos = cand_dev if cand_dev is not None else torch.arange(t + 1, device=dev)
                mask = key_pos[None, :] <= rows_dev[:, None]  # [n_rows, |S_l|]
            o = F.scaled_dot_product_attention(
                q[None], k[None], v[None], attn_mask=mask, scale=a.scaling, enable_gqa=a.num_heads != a.num_kv_heads
            )[0]
            h = a.finish(l, h, o)
            c.aux[rows_dev] = h
            depth[rows] = l
            prev_rows = rows
            if self.trace:
                trace.candidates.append(cand_host.copy())
                trace.computed.append(rows.copy())
            if l in sched.keep and sched.mode != "static":
                scores = self._scores(q[:, -1], k)
                kept, _ = select(scores, sched.kept_count(l, cand_host.shape[0]))
                if self.trace:
                    trace.scores[l] = (cand_host.copy(), scores.cpu().numpy())
                cand = cand_host[kept.cpu().numpy()]
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


def _with_last(positions: np.ndarray, t: int) -> np.ndarray:
    return np.append(positions, t)
