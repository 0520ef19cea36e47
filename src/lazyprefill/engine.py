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
tokens revived from the Aux Cache) against the K/V of that sequence's candidate set S_l.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .adapters import LlamaAdapter
from .attention import decode_mask, prefill_attention
from .cache import LazyCache
from .packing import Packing, upload
from .schedule import Schedule
from .scoring import ScoreInput, select

# Decoding attends with one or a few query rows to a K/V length that changes every step. cuDNN attention,
# SDPA's first choice on Hopper, plans a new graph per shape (~1.3 ms of host time per call, measured on an
# H100): flash attention first, then memory-efficient attention for masked calls (benchmarks/NOTES.md).
DECODE_ATTENTION = [
    SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH
]


@dataclass
class StepStats:
    """Per-layer token counts of one sequence in one step (prefill or one decoding step)."""

    computed: list[int] = field(default_factory=list)  # rows that ran layer l
    candidates: list[int] = field(default_factory=list)  # |S_l|
    revived: list[int] = field(default_factory=list)  # rows resumed from the Aux Cache at layer l


@dataclass
class StepTrace:
    """What a step did to one sequence, token by token: recorded only when tracing (tests, `inspect`)."""

    candidates: list[np.ndarray] = field(default_factory=list)  # S_l positions, per layer
    computed: list[np.ndarray] = field(default_factory=list)  # positions that ran layer l
    scores: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # l -> (pos, s)


class Engine:
    """Runs a batch of sequences through prefill and decoding steps under one schedule and its scorer."""

    def __init__(self, adapter: LlamaAdapter, schedule: Schedule, capacity: int, trace: bool = False) -> None:
        self.a = adapter
        self.schedule = schedule
        self.capacity = capacity  # positions per sequence: longest prompt + new tokens
        self.trace = trace
        self.cache: LazyCache | None = None  # allocated by prefill, once the prompt lengths are known
        self.traces: list[list[StepTrace]] = []  # [sequence][step]

    # ---------------------------------------------------------------- prefill
    def prefill(self, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, list[StepStats]]:
        """prompts: B token-id tensors [n_b] on the model's device -> last-token logits [B, vocab], stats.

        Never waits on the device: selection sizes are known on the host, and the host-side depth
        bookkeeping is settled by `settle()` once the first tokens' logits exist.
        """
        a, L, dev = self.a, self.a.num_layers, self.a.device
        counts = [p.shape[0] for p in prompts]
        B = len(prompts)
        c = self.cache = LazyCache(a, counts, self.capacity, track_writes=self.trace)
        stats, traces = [StepStats() for _ in range(B)], [StepTrace() for _ in range(B)]
        rows = Packing(counts, dev)
        pos = rows.slot  # [N] original position of each active row
        h = a.embed(torch.cat(prompts))  # [N, d]
        cos, sin = a.rope(pos)  # [N, dh]
        self._dropped: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for l in range(L):
            for s, n in zip(stats, rows.counts):
                s.computed.append(n)
                s.candidates.append(n)
                s.revived.append(0)
            q, k, v = a.qkv(l, h, cos, sin)  # q: [N, H, dh], k/v: [N, Hkv, dh]
            c.write_kv(l, rows.seq, pos, k, v)
            qp, kp, vp = (rows.pad(x).transpose(1, 2) for x in (q, k, v))  # [B, heads, width, dh]
            o = prefill_attention(qp, kp, vp, rows.pad(pos), a.window(l), max(counts), a.scaling)  # [B, H, W, dh]
            scores = self._prefill_scores(l, qp, kp, rows, pos, max(counts)) if l in self.schedule.keep else None
            del q, k, v, qp, kp, vp  # free them before the MLP's activations: lower peak memory, as in transformers
            o = rows.unpad(o.transpose(1, 2))  # [N, H, dh]
            h = a.finish(l, h, o)
            if self.trace:
                for b, (seq_pos, tr) in enumerate(zip(_split(pos, rows), traces)):
                    c.count_writes(l, np.full(seq_pos.shape, b), seq_pos)
                    tr.candidates.append(seq_pos)
                    tr.computed.append(seq_pos)
            if scores is None:
                continue
            keep = [self.schedule.kept_count(l, n) for n in rows.counts]
            kept, dropped = select(scores, rows, keep)
            if self.trace:
                padded = scores.cpu().numpy()
                for b, (seq_pos, tr) in enumerate(zip(_split(pos, rows), traces)):
                    tr.scores[l] = (seq_pos, padded[b, : seq_pos.shape[0]])
            seq_dropped, pos_dropped = rows.seq[dropped], pos[dropped]
            c.aux[seq_dropped, pos_dropped] = h[dropped]
            self._dropped.append((l, seq_dropped, pos_dropped))
            rows = Packing(keep, dev)
            pos, h, cos, sin = pos[kept], h[kept], cos[kept], sin[kept]
        c.length[:] = counts
        if self.trace:
            self.traces = [[tr] for tr in traces]
        return a.logits(h[rows.last]), stats

    def settle(self) -> None:
        """Write prefill's depth bookkeeping to the host (after TTFT has been measured).

        Also zeroes the never-computed K/V above each dropped token's depth: decoding attends over
        all cached positions with those masked out, and uninitialised memory could hold NaN.
        """
        c = self.cache
        for b, n in enumerate(c.length):
            c.depth[b, :n] = self.a.num_layers - 1
        for layer, seq, pos in self._dropped:
            c.depth[seq.cpu().numpy(), pos.cpu().numpy()] = layer
            c.k[layer + 1 :][:, seq, :, pos] = 0
            c.v[layer + 1 :][:, seq, :, pos] = 0
        self._dropped = []

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
    @sdpa_kernel(DECODE_ATTENTION, set_priority=True)
    def decode(self, tokens: torch.Tensor, seqs: list[int]) -> tuple[torch.Tensor, list[StepStats]]:
        """tokens: [A] the newest token of each sequence in `seqs` (ascending; the rest have stopped)
        -> their logits [A, vocab] and stats. Each token becomes its sequence's q at position length."""
        a, c, L, sched, dev = self.a, self.cache, self.a.num_layers, self.schedule, self.a.device
        B = c.depth.shape[0]
        t = c.length[seqs].copy()  # [A] position of each sequence's q
        c.length[seqs] += 1
        c.depth[seqs, t] = -1
        T = int(t.max()) + 1  # attention spans positions [0, T) of every sequence
        q_rows = Packing(np.isin(np.arange(B), seqs).astype(np.int64), dev)
        q_pos = upload(t, dev)  # [A]
        c.aux[q_rows.seq, q_pos] = a.embed(tokens)
        cos_q, sin_q = a.rope(q_pos)
        # in_s: [B, T] bool, each sequence's S_l; None: every token so far, in every sequence alike
        in_s = None
        if len(seqs) < B or (t != t[0]).any():
            lens = np.zeros(B, dtype=np.int64)
            lens[seqs] = t + 1
            in_s = torch.arange(T, device=dev)[None, :] < upload(lens, dev)[:, None]
        cand: dict[int, np.ndarray | None] = dict.fromkeys(seqs)  # S_l positions; None: every token 0..t
        cand_flat: torch.Tensor | None = None  # [C] b * T + position of every candidate, S_l of all sequences
        prev = {b: np.array([tb]) for b, tb in zip(seqs, t)}
        stats, traces = {b: StepStats() for b in seqs}, {b: StepTrace() for b in seqs}
        for l in range(L):
            if not sched.scorer.reselects and sched.keep:
                for b, tb in zip(seqs, t):
                    cand[b] = np.append(np.flatnonzero(c.depth[b, :tb] >= l), tb)
                cand_flat = upload(np.concatenate([b * T + cand[b] for b in seqs]), dev)
                in_s = _membership(cand_flat, B, T)
            rows: dict[int, np.ndarray] = {}
            for b, tb in zip(seqs, t):
                S = cand[b]
                # enter layer l: stopped just before it (a scan of depth is cheaper than a gather when full)
                rows[b] = np.flatnonzero(c.depth[b, : tb + 1] == l - 1) if S is None else S[c.depth[b, S] == l - 1]
                n_rows = rows[b].shape[0]
                stats[b].computed.append(n_rows)
                stats[b].candidates.append(int(tb) + 1 if S is None else S.shape[0])
                # one row is q alone, which ran the previous layer too
                revived = 0 if n_rows == 1 else np.setdiff1d(rows[b], prev[b], assume_unique=True).shape[0]
                stats[b].revived.append(int(revived))
            if all(r.shape[0] == 1 for r in rows.values()):
                packing, pos, cos, sin = q_rows, q_pos, cos_q, sin_q
            else:
                packing = Packing([rows[b].shape[0] if b in rows else 0 for b in range(B)], dev)
                pos = upload(np.concatenate([rows[b] for b in seqs]), dev)
                cos, sin = a.rope(pos)
            h = c.aux[packing.seq, pos]  # [R, d]
            q, k_new, v_new = a.qkv(l, h, cos, sin)  # q: [R, H, dh]
            c.write_kv(l, packing.seq, pos, k_new, v_new)
            if c.writes is not None:
                for b in seqs:
                    c.count_writes(l, np.full(rows[b].shape, b), rows[b])
            # Attend over every cached position and mask out those outside S_l: gathering S_l's K/V
            # instead moves 3x the bytes of S_l per layer (benchmarks/NOTES.md).
            k, v = c.k[l, :, :, :T], c.v[l, :, :, :T]  # [B, Hkv, T, dh] views
            mask = decode_mask(in_s, packing.pad(pos), T, a.window(l))  # [B, r or 1, T]: S_l, causal, window
            o = _attention(packing.pad(q).transpose(1, 2), k, v, mask, a)  # [B, H, r, dh]
            h = a.finish(l, h, packing.unpad(o.transpose(1, 2)))
            c.aux[packing.seq, pos] = h
            for b in seqs:
                c.depth[b, rows[b]] = l
            prev = rows
            if self.trace:
                for b, tb in zip(seqs, t):
                    traces[b].candidates.append(np.arange(tb + 1) if cand[b] is None else cand[b].copy())
                    traces[b].computed.append(rows[b].copy())
            if l in sched.keep and sched.scorer.reselects:
                in_s, cand_flat = self._reselect(l, cand, cand_flat, q[packing.last], k, in_s, t, seqs, traces)
        if self.trace:
            for b in seqs:
                self.traces[b].append(traces[b])
        return a.logits(c.aux[q_rows.seq, q_pos]), [stats[b] for b in seqs]

    def _reselect(
        self,
        l: int,
        cand: dict[int, np.ndarray | None],
        cand_flat: torch.Tensor | None,
        q_last: torch.Tensor,
        k: torch.Tensor,
        in_s: torch.Tensor | None,
        t: np.ndarray,
        seqs: list[int],
        traces: dict[int, StepTrace],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shrink every sequence's S (host `cand`, updated in place) at pruning layer l.

        q_last: [B, H, dh], k: [B, Hkv, T, dh] keys of layer l. Returns the new (in_s, cand_flat).
        """
        dev, B, T = self.a.device, k.shape[0], k.shape[2]
        host = [np.arange(tb + 1) if cand[b] is None else cand[b] for b, tb in zip(seqs, t)]
        sizes = np.zeros(B, dtype=np.int64)
        sizes[seqs] = [s.shape[0] for s in host]
        cands = Packing(sizes, dev)
        everything = cand_flat is None and cands.uniform  # packed candidates == flat [B, T] positions
        if cand_flat is None and not everything:
            cand_flat = upload(np.concatenate([b * T + s for b, s in zip(seqs, host)]), dev)

        q_pos = np.zeros(B, dtype=np.int64)
        q_pos[seqs] = t
        positions = torch.arange(T, device=dev)[None].expand(B, T)
        x = ScoreInput(q_last[:, :, None], upload(q_pos, dev)[:, None], k, positions, in_s, self.a.scaling, l, T)
        full = self.schedule.scorer.score(x).view(-1)  # [B * T]
        scores = cands.pad(full if everything else full[cand_flat])
        keep = [self.schedule.kept_count(l, n) if n else 0 for n in cands.counts]
        kept, _ = select(scores, cands, keep)
        if self.trace:
            padded = scores.cpu().numpy()
            for b, s in zip(seqs, host):
                traces[b].scores[l] = (s.copy(), padded[b, : s.shape[0]])
        cand_flat = kept if everything else cand_flat[kept]
        kept_host = kept.cpu().numpy()
        positions = np.concatenate(host)[kept_host]
        for b, part in zip(seqs, np.split(positions, np.searchsorted(kept_host, cands.ends[seqs][:-1]))):
            cand[b] = part
        return _membership(cand_flat, B, T), cand_flat


def _split(pos: torch.Tensor, rows: Packing) -> list[np.ndarray]:
    """Packed positions [N] -> one host array per sequence."""
    return np.split(pos.cpu().numpy(), rows.ends[:-1])


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, a: LlamaAdapter
) -> torch.Tensor:
    """q: [B, H, r, dh], k/v: [B, Hkv, T, dh], mask: [B, r or 1, T] bool (True: attend) -> [B, H, r, dh]."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=a.scaling, enable_gqa=a.num_heads != a.num_kv_heads)
    return _masked_attention(q, k, v, mask, a.scaling)


# Above this many attention logits (B x H x rows x keys; 256 MB in fp32) decoding's masked attention goes to
# SDPA instead of writing the logits out.
MASKED_ATTENTION_MAX_LOGITS = 2**26


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float
) -> torch.Tensor:
    """q: [B, H, r, dh], k/v: [B, Hkv, T, dh], mask: [B, r or 1, T] bool (True: attend) -> [B, H, r, dh].

    Written out as two matmuls around a softmax because SDPA's masked kernels split the work by query
    rows: with the one or few rows of a decoding step they leave most of the GPU idle (1.3 ms a layer
    at 32K keys on an H100, against about 0.2 ms for this; benchmarks/NOTES.md). A row with nothing
    to attend to (padding) comes out NaN and is never read.
    """
    B, heads, r, dh = q.shape
    kv_heads, n_keys = k.shape[1], k.shape[2]
    group = heads // kv_heads  # query heads sharing one K/V head (GQA)
    if B * heads * r * n_keys > MASKED_ATTENTION_MAX_LOGITS:  # many revived rows: SDPA's masked kernel suits them
        if group > 1:  # the memory-efficient kernel takes no GQA; without it SDPA would fall back to math
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scaling)
    qg = q.reshape(B, kv_heads, group * r, dh)
    logits = torch.matmul(qg, k.transpose(-1, -2)).float() * scaling  # [B, Hkv, G*r, T]
    logits = logits.view(B, kv_heads, group, r, n_keys).masked_fill(~mask[:, None, None], float("-inf"))
    p = logits.softmax(dim=-1).to(v.dtype).view(B, kv_heads, group * r, n_keys)
    return torch.matmul(p, v).view(B, heads, r, dh)


def _membership(flat: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    """flat: [m] indices b * n + position -> [batch, n] bool, True at those positions."""
    return torch.zeros(batch * n, dtype=torch.bool, device=flat.device).index_fill_(0, flat, True).view(batch, n)
