"""A deliberately simple reference implementation of SPEC.md, for tests only.

One sequence, one token at a time: Python loops over steps, layers and tokens, explicit boolean
attention masks over every position, manual softmax attention, and its own bookkeeping (K/V per
(layer, token) in dicts, `depth` and `aux` per token). Nothing is compacted. It shares only the
model's modules with the engine (projections, norms, MLP, rotary embedding, apply_rotary_pos_emb),
so agreeing with it is evidence that the fast engine implements the contract. Sliding-window layers
(Gemma 3, Mistral, Qwen2) mask keys by original position: row i sees j in (i - window, i].

One rule covers prefill, decoding and revival: at layer l the rows that run are the candidates whose
depth is l-1 (their hidden state is `aux`, the output of layer l-1), because every candidate of
S_l has depth >= l-1 on entering layer l.
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from lazyprefill import scoring


@dataclass
class RefStep:
    """What one step did: per layer, sorted positions."""

    candidates: list[list[int]] = field(default_factory=list)  # S_l
    computed: list[list[int]] = field(default_factory=list)  # rows that ran layer l
    revived: list[list[int]] = field(default_factory=list)  # rows resumed from the Aux Cache at l
    scores: dict[int, dict[int, float]] = field(default_factory=dict)  # pruning layer -> {pos: s}
    depth: list[int] = field(default_factory=list)  # every token's depth after the step


class Reference:
    """SPEC.md for one sequence under a scorer (scoring.py), scored here by its own loops over tokens.

    It runs on a float64 copy of the model by default, so that comparing an fp32 engine with it
    measures the engine's rounding only. Logits come back in the reference's dtype.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        keep: dict[int, float],
        scorer: scoring.Scorer | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.model = copy.deepcopy(model).to(dtype)
        self.dtype = dtype
        self.base = self.model.model
        self.keep = dict(keep)
        self.scorer = scorer if scorer is not None else scoring.Last()
        cfg = self.model.config
        self.L = cfg.num_hidden_layers
        self.H = cfg.num_attention_heads
        self.Hkv = cfg.num_key_value_heads
        self.dh = self.base.layers[0].self_attn.head_dim
        self.scaling = self.base.layers[0].self_attn.scaling
        self.apply_rope = sys.modules[type(self.base).__module__].apply_rotary_pos_emb
        window, types = getattr(cfg, "sliding_window", None), getattr(cfg, "layer_types", None)
        self.layer_types = types or [None] * self.L
        self.windows = [window if types is None or t == "sliding_attention" else None for t in self.layer_types]
        self.rope_by_type = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters  # Gemma 3
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.ids: list[int] = []
        self.depth: list[int] = []  # per token, -1: no K/V yet
        self.aux: dict[int, torch.Tensor] = {}  # token -> [d], output of layer depth[token]
        self.k: list[dict[int, torch.Tensor]] = [{} for _ in range(self.L)]  # layer -> token -> [Hkv, dh]
        self.v: list[dict[int, torch.Tensor]] = [{} for _ in range(self.L)]
        self.steps: list[RefStep] = []

    @torch.no_grad()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Returns the logits [vocab] for the token after the prompt."""
        for tok in ids:
            self._append(tok)
        return self._step(prefill=True)

    @torch.no_grad()
    def decode(self, token: int) -> torch.Tensor:
        self._append(token)
        return self._step(prefill=False)

    def _append(self, tok: int) -> None:
        i = len(self.ids)
        self.ids.append(tok)
        self.depth.append(-1)
        self.aux[i] = self.base.embed_tokens(torch.tensor(tok))  # "output of layer -1"

    def _step(self, prefill: bool) -> torch.Tensor:
        t = len(self.ids) - 1  # q
        start_depth = list(self.depth)
        record = RefStep()
        if not self.scorer.reselects and not prefill:
            # Prefill-only pruning: S_l is every token whose K/V at l exists, plus q; nothing revives.
            cands = [[i for i in range(t + 1) if start_depth[i] >= layer or i == t] for layer in range(self.L)]
        else:
            cands = None
        S = list(range(t + 1))
        for layer in range(self.L):
            if cands is not None:
                S = cands[layer]
            assert all(self.depth[i] >= layer - 1 for i in S), "a candidate skipped a layer"
            active = [i for i in S if self.depth[i] == layer - 1]
            assert t in active
            record.candidates.append(list(S))
            record.computed.append(active)
            record.revived.append([i for i in active if i != t and start_depth[i] == layer - 1] if layer > 0 else [])
            probs = self._run_layer(layer, S, active)
            if layer in self.keep and (prefill or self.scorer.reselects):
                rows = active[-self.scorer.query_rows :] if prefill else [t]
                scores = ref_scores(self.scorer, {i: probs[i] for i in rows}, S, t, layer)
                record.scores[layer] = scores
                n_keep = math.ceil(Fraction(str(self.keep[layer])) * len(S))  # exact: ratio as written
                others = sorted((i for i in S if i != t), key=lambda i: -scores[i])
                bound = self.scorer.revival_rows
                if bound is not None and not prefill:  # of those that stopped here, only the best bound - 1
                    stopped = [i for i in others if self.depth[i] == layer]
                    others = [i for i in others if i not in stopped[bound - 1:]]
                S = sorted([t, *others[:n_keep - 1]])
        record.depth = list(self.depth)
        self.steps.append(record)
        logits = self.model.lm_head(self.base.norm(self.aux[t]))
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap

    def _run_layer(self, layer: int, S: list[int], active: list[int]) -> dict[int, dict[int, list[float]]]:
        """Runs `layer` on the rows `active` against the K/V of S; returns each row's attention
        probabilities per head: {row: {key: [p_h for each head]}} over the keys of S at or before it."""
        block = self.base.layers[layer]
        attn = block.self_attn
        queries: dict[int, torch.Tensor] = {}
        for i in active:  # K/V first: a revived row attends to other rows revived at this layer
            q, k, v = self._qkv(block, self.aux[i], i, self.layer_types[layer])
            queries[i] = q
            assert i not in self.k[layer], "K/V written twice"
            self.k[layer][i], self.v[layer][i] = k, v
        T = len(self.ids)
        in_S = torch.zeros(T, dtype=torch.bool)
        in_S[S] = True
        K = torch.zeros(T, self.Hkv, self.dh, dtype=self.dtype)
        V = torch.zeros(T, self.Hkv, self.dh, dtype=self.dtype)
        for j in S:
            K[j], V[j] = self.k[layer][j], self.v[layer][j]
        group = self.H // self.Hkv
        K = K.repeat_interleave(group, dim=1)  # [T, H, dh]
        V = V.repeat_interleave(group, dim=1)
        rows: dict[int, dict[int, list[float]]] = {}
        outputs: dict[int, torch.Tensor] = {}
        window = self.windows[layer]
        for i in active:
            mask = in_S & (torch.arange(T) <= i)  # [T]: candidates at or before i, by original position
            if window is not None:
                mask &= torch.arange(T) > i - window
            logits = torch.einsum("hd,thd->ht", queries[i], K) * self.scaling
            probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)  # [H, T]
            o = torch.einsum("ht,thd->hd", probs, V).reshape(-1)
            outputs[i] = self._finish(block, self.aux[i], attn.o_proj(o))
            # the score rows ignore any window (they matter only where every layer slides)
            scored = logits.masked_fill(~(in_S & (torch.arange(T) <= i)), float("-inf")).softmax(-1)  # [H, T]
            rows[i] = {j: scored[:, j].tolist() for j in S if j <= i}
        for i, h in outputs.items():
            self.aux[i] = h
            self.depth[i] = layer
        return rows

    @staticmethod
    def _finish(block, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual, norms and MLP after attention: Llama's two norms, or Gemma's four."""
        if hasattr(block, "pre_feedforward_layernorm"):
            h = h + block.post_attention_layernorm(attn)
            return h + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(h)))
        h = h + attn
        return h + block.mlp(block.post_attention_layernorm(h))

    def _qkv(
        self, block, h: torch.Tensor, pos: int, kind: str | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [d] at original position pos, layer type `kind` -> post-RoPE q [H, dh], k [Hkv, dh], v [Hkv, dh]."""
        attn = block.self_attn
        x = block.input_layernorm(h)[None, None]  # [1, 1, d]
        q = attn.q_proj(x).view(1, 1, self.H, self.dh)
        k = attn.k_proj(x).view(1, 1, self.Hkv, self.dh)
        v = attn.v_proj(x).view(self.Hkv, self.dh)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        cos, sin = self.base.rotary_emb(x, torch.tensor([[pos]]), *([kind] if self.rope_by_type else []))
        q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q[0, :, 0], k[0, :, 0], v


def ref_scores(
    scorer: scoring.Scorer, rows: dict[int, dict[int, list[float]]], S: list[int], t: int, layer: int
) -> dict[int, float]:
    """Each candidate's score under `scorer`, one token at a time, from the per-head probability rows of
    the query rows it reads (prefill: the last `query_rows` active rows; decoding: q's)."""
    if isinstance(scorer, (scoring.Static, scoring.Revive)):
        return ref_scores(scorer.of, rows, S, t, layer)
    if isinstance(scorer, scoring.Random):
        return {j: float(scoring.hash_uniform(*(torch.tensor(v) for v in (scorer.seed, layer, t, j)))) for j in S}
    if isinstance(scorer, scoring.Pool):
        inner = ref_scores(scorer.of, rows, S, t, layer)
        half = scorer.k // 2
        return {j: max(inner[i] for i in S if abs(i - j) <= half) for j in S}
    if isinstance(scorer, scoring.Protect):
        inner = ref_scores(scorer.of, rows, S, t, layer)
        kept = [j for j in S if j < scorer.sink or j >= t - scorer.recent]
        return {j: scoring.PROTECTED if j in kept else inner[j] for j in S}
    assert isinstance(scorer, (scoring.Last, scoring.Window)), f"no reference for {scorer}"
    reduce = (lambda ps: sum(ps) / len(ps)) if scorer.heads == "mean" else max
    queries = [t] if isinstance(scorer, scoring.Last) else sorted(rows)
    return {j: sum(reduce(rows[i][j]) if j in rows[i] else 0.0 for i in queries) / len(queries) for j in S}
