"""Token scorers (one importance value per candidate) and top-k percentile selection, per sequence.

A scorer is a small frozen dataclass: its fields are its hyperparameters, `score` turns what a pruning
layer computed into one value per key, and `reselects` says whether it chooses again at every decoding
step (LazyLLM) or only in prefill. Scorers are registered by name, like the model adapters, and written
as `name(field=value, ...)`, nesting for the wrappers: `pool(k=7, of=window(w=16))`. Selection (top
`ceil(r * |S_l|)`, q always kept) is the same for every scorer and lives in `select`.

Legend: B sequences, H query heads, Hkv K/V heads, dh head dim, W keys per sequence (padded), w query rows.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .packing import Packing, upload

Heads = Literal["mean", "max"]


def reduce_heads(probs: torch.Tensor, heads: Heads) -> torch.Tensor:
    """probs: [B, H, w, W] -> [B, w, W], the mean or the max over query heads."""
    return probs.mean(dim=1) if heads == "mean" else probs.amax(dim=1)


@dataclass(frozen=True)
class ScoreInput:
    """What a pruning layer hands a scorer, for every sequence of the batch (keys padded to W)."""

    q: torch.Tensor  # [B, H, w, dh] post-RoPE queries of each sequence's last w rows (q last); w = 1 in decoding
    q_pos: torch.Tensor  # [B, w] their original positions, -1 where a sequence has fewer than w rows
    k: torch.Tensor  # [B, Hkv, W, dh] the keys being scored
    pos: torch.Tensor  # [B, W] each key's original position
    valid: torch.Tensor | None  # [B, W] bool, False: not a candidate (padding, masked out); None: all candidates
    scaling: float  # the model's attention logit scale
    layer: int
    span: int  # every position is below it (known on the host: no device round trip)
    seq: torch.Tensor | None = None  # [B] each row's sequence id: its index in its generate batch (None: 0..B-1)
    # probs [B, H, w, W] -> [B, w, W] over every head of the model: the adapter's, which under tensor parallelism
    # reduces this rank's heads and then across ranks (LlamaAdapter.reduce_heads)
    reduce_heads: Callable[[torch.Tensor, Heads], torch.Tensor] = reduce_heads


class Scorer:
    """Turns a pruning layer's queries and keys into importance scores: `score(x) -> [B, W]` float32.

    Higher is kept first. Scores of invalid keys are ignored by `select`. `query_rows` is how many of
    each sequence's last rows prefill passes as `x.q`; a decoding step has only its newest token's.
    """

    name: ClassVar[str]
    reselects: ClassVar[bool] = True  # False: prune in prefill only, never revive (the `static` baseline)

    @property
    def query_rows(self) -> int:
        return 1

    @property
    def revival_rows(self) -> int | None:
        """The most rows (q included) a decoding step may compute after each pruning layer; None: no bound."""
        return None

    def score(self, x: ScoreInput) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> str:
        """The text that `parse_scorer` turns back into this scorer."""
        args = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            args.append(f"{f.name}={value.spec() if isinstance(value, Scorer) else value}")
        return f"{self.name}({', '.join(args)})" if args else self.name


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    SCORERS[cls.name] = cls
    return cls


# ----------------------------------------------------------------------------------- attention scorers
def attention_probs(x: ScoreInput) -> torch.Tensor:
    """Post-softmax attention of every query row to every valid key: [B, H, w, W] float32.

    Recomputed beside the main SDPA call (which never exposes probabilities) at O(H * w * W * dh) cost,
    as a softmax over each sequence's own keys only, causal by original position. GQA: each query head
    scores with its shared K/V head. A query row that is missing (q_pos -1) comes out all zero.
    """
    B, kv_heads, W, dh = x.k.shape
    heads, w = x.q.shape[1], x.q.shape[2]
    q = x.q.reshape(B, kv_heads, heads // kv_heads * w, dh)  # [B, Hkv, G*w, dh]
    # in the model's dtype, then fp32: an fp32 copy of every key would cost more than the scoring itself
    logits = torch.matmul(q, x.k.transpose(-1, -2)).float() * x.scaling  # [B, Hkv, G*w, W]
    logits = logits.view(B, heads, w, W)
    allowed = x.pos[:, None, :] <= x.q_pos[:, :, None]  # [B, w, W] causal by original position
    if x.valid is not None:
        allowed = allowed & x.valid[:, None, :]
    logits = logits.masked_fill(~allowed[:, None], float("-inf"))
    return torch.nan_to_num(logits.softmax(dim=-1), nan=0.0)


def _check_heads(heads: str) -> None:
    if heads not in ("mean", "max"):
        raise ValueError(f"heads={heads!r}: use heads=mean (the paper) or heads=max")


@register
@dataclass(frozen=True)
class Last(Scorer):
    """The paper's Eq. 1: the attention the last token pays each key, averaged (or maxed) over heads."""

    name: ClassVar[str] = "last"
    heads: Heads = "mean"

    def __post_init__(self) -> None:
        _check_heads(self.heads)

    def score(self, x: ScoreInput) -> torch.Tensor:
        return x.reduce_heads(attention_probs(x)[:, :, -1:], self.heads)[:, 0]


@register
@dataclass(frozen=True)
class Window(Scorer):
    """The attention of each sequence's last `w` rows (in prefill, e.g. the question), averaged over rows,
    as SnapKV scores its observation window. A decoding step has only its newest row, so there it is
    `last` with the same head reduction."""

    name: ClassVar[str] = "window"
    w: int = 16
    heads: Heads = "mean"

    def __post_init__(self) -> None:
        _check_heads(self.heads)
        if not isinstance(self.w, int) or self.w < 1:
            raise ValueError(f"window w={self.w!r}: the number of query rows must be an int >= 1")

    @property
    def query_rows(self) -> int:
        return self.w

    def score(self, x: ScoreInput) -> torch.Tensor:
        rows = x.reduce_heads(attention_probs(x), self.heads)  # [B, w, W]
        present = (x.q_pos >= 0).sum(dim=1, keepdim=True).clamp(min=1)  # [B, 1]
        return rows.sum(dim=1) / present


class Wrapper(Scorer):
    """A scorer that changes the scores of another, `of` (a field of each subclass): it reads what `of`
    reads and reselects when `of` does."""

    of: Scorer

    @property
    def reselects(self) -> bool:  # type: ignore[override]
        return self.of.reselects

    @property
    def query_rows(self) -> int:
        return self.of.query_rows

    @property
    def revival_rows(self) -> int | None:
        return self.of.revival_rows


@register
@dataclass(frozen=True)
class Static(Wrapper):
    """The `static` baseline: `of`'s scores in prefill, no reselection, so pruned tokens never return."""

    name: ClassVar[str] = "static"
    reselects: ClassVar[bool] = False
    of: Scorer = field(default_factory=Last)

    def score(self, x: ScoreInput) -> torch.Tensor:
        return self.of.score(x)


# ------------------------------------------------------------------------------------------- random
_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for h, c < 2^32, in int64 without overflow (two 16-bit halves of c)."""
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash_uniform(*keys: torch.Tensor) -> torch.Tensor:
    """Broadcast int64 tensors -> float32 in [0, 1), a fixed function of the keys (no generator state)."""
    h = torch.zeros((), dtype=torch.int64, device=keys[0].device)
    for key in keys:
        h = _mix32((h * 31 + (key & _M32)) & _M32)
    return (h >> 8).float() * 2.0**-24


@register
@dataclass(frozen=True)
class Random(Scorer):
    """The `random` baseline: the same keep counts, chosen uniformly at random (q kept by selection).

    Each score hashes (seed + b, layer, q's position, key position): sequence b of a batch draws with `seed + b`
    whatever else is in the batch (a server's request is sequence 0 of its own), and the draw does not depend on
    how keys are laid out.
    """

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(self, x: ScoreInput) -> torch.Tensor:
        B = x.pos.shape[0]
        seq = (torch.arange(B, device=x.pos.device) if x.seq is None else x.seq)[:, None] + self.seed
        layer = torch.full((), x.layer, dtype=torch.int64, device=x.pos.device)  # no host copy: capturable
        return hash_uniform(seq, layer, x.q_pos[:, -1:], x.pos)


# ------------------------------------------------------------------------------------------- wrappers
# The score of a token that must be kept; `select` puts q above it (inf), so q survives any protection.
PROTECTED = torch.finfo(torch.float32).max

@register
@dataclass(frozen=True)
class Pool(Wrapper):
    """`of`'s scores max-pooled over candidates within k // 2 original positions, so that a span such as
    a number or a name survives whole rather than by its single most-attended token."""

    name: ClassVar[str] = "pool"
    k: int = 7
    of: Scorer = field(default_factory=Last)

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1 or self.k % 2 == 0:
            raise ValueError(f"pool k={self.k!r}: the pooling width must be an odd int >= 1")

    def score(self, x: ScoreInput) -> torch.Tensor:
        s = self.of.score(x)  # [B, W]
        valid = torch.ones_like(s, dtype=torch.bool) if x.valid is None else x.valid
        idx = x.pos.masked_fill(~valid, x.span)  # [B, W]; non-candidates go to a spare slot past the end
        grid = s.new_full((s.shape[0], x.span + 1), float("-inf"))  # [B, span + 1] scores by original position
        grid.scatter_(1, idx, s)
        pooled = F.max_pool1d(grid[:, None, : x.span], self.k, stride=1, padding=self.k // 2)[:, 0]
        return F.pad(pooled, (0, 1)).gather(1, idx).masked_fill(~valid, 0.0)


@register
@dataclass(frozen=True)
class Protect(Wrapper):
    """`of`'s scores, with the first `sink` positions and the `recent` positions before q ranked first:
    attention sinks and the local context (e.g. the question) that the answer starts from. They are
    kept within the layer's keep count; a schedule that keeps fewer keeps the earliest of them."""

    name: ClassVar[str] = "protect"
    sink: int = 4
    recent: int = 32
    of: Scorer = field(default_factory=Last)

    def __post_init__(self) -> None:
        for what in ("sink", "recent"):
            value = getattr(self, what)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"protect {what}={value!r}: must be an int >= 0")

    def score(self, x: ScoreInput) -> torch.Tensor:
        s = self.of.score(x)
        keep = (x.pos < self.sink) | (x.pos > x.q_pos[:, -1:] - 1 - self.recent)  # [B, W]
        return s.masked_fill(keep, PROTECTED)


@register
@dataclass(frozen=True)
class Revive(Wrapper):
    """`of`'s scores and selection, with at most `rows` rows per sequence (q included) computed after each
    pruning layer of a decoding step: of the candidates that would need computing there (they stopped at that
    layer), only the `rows - 1` best-scoring may be kept, and the keep count is filled from the rest.

    Why: after prefill the paper's rule revives every deferred token it selects at once, thousands of rows in
    the first steps (a step 4-27x a dense one on the H200), and a step's row count is known only on the device,
    so the host waits for it at every pruning layer. With a bound, the revivals spread over the following steps,
    each (token, layer) still computed at most once, and every step has the same shape: no wait, one set of
    CUDA graphs. The price: a step's S_l lacks the deferred tokens over the bound, so it attends to fewer of the
    tokens the scorer ranks highest (and holds fewer than ceil(r |S|) candidates when too few remain to fill
    it). A named option, measured against the paper's rule before it may become a default. Prefill is `of`'s.
    """

    name: ClassVar[str] = "revive"
    rows: int = 32
    of: Scorer = field(default_factory=Last)

    def __post_init__(self) -> None:
        if not isinstance(self.rows, int) or self.rows < 1:
            raise ValueError(f"revive rows={self.rows!r}: rows per step after a pruning layer, q included, "
                             "must be an int >= 1 (1: q alone, nothing revived)")
        if not self.of.reselects:
            raise ValueError(f"revive(of={self.of.spec()}): {self.of.spec()} prunes in prefill only and never "
                             "revives, so there is nothing to bound; use it alone")

    @property
    def revival_rows(self) -> int | None:
        return self.rows

    def score(self, x: ScoreInput) -> torch.Tensor:
        return self.of.score(x)


# ------------------------------------------------------------------------------------------- parsing
ALIASES = {"lazy": "last"}  # the name of the LazyLLM mode before scorers
_TOKEN = re.compile(r"\s*([A-Za-z_][A-Za-z_0-9]*|[0-9.+-]+|[(),=])")


def parse_scorer(text: str) -> Scorer:
    """'last', 'window(w=16)', 'pool(k=7, of=window(w=16, heads=max))' -> the scorer it names.

    Raises ValueError naming the registered scorers and their fields when the text is not one.
    """
    tokens = _tokenize(text)
    scorer, rest = _parse(tokens, text)
    if rest:
        raise ValueError(f"unexpected {' '.join(rest)!r} after the scorer in {text!r}")
    return scorer


def scorer_help() -> str:
    """One line per registered scorer with its fields and defaults, for error messages and --help."""
    lines = []
    for name, cls in SCORERS.items():
        fields = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(cls))
        lines.append(f"{name}({fields})" if fields else name)
    return "; ".join(lines)


def _default(f: dataclasses.Field) -> str:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory().spec()  # type: ignore[misc]
    return str(f.default)


def _tokenize(text: str) -> list[str]:
    tokens, at = [], 0
    text = text.strip()
    while at < len(text):
        m = _TOKEN.match(text, at)
        if not m:
            raise ValueError(f"cannot read scorer {text!r} at {text[at:]!r}: scorers are {scorer_help()}")
        tokens.append(m.group(1))
        at = m.end()
    return tokens


def _parse(tokens: list[str], text: str) -> tuple[Scorer, list[str]]:
    if not tokens:
        raise ValueError(f"empty scorer in {text!r}: scorers are {scorer_help()}")
    name, rest = ALIASES.get(tokens[0], tokens[0]), tokens[1:]
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {tokens[0]!r}: scorers are {scorer_help()}")
    cls = SCORERS[name]
    kwargs: dict[str, object] = {}
    if rest[:1] == ["("]:
        rest = rest[1:]
        while rest and rest[0] != ")":
            if len(rest) < 3 or rest[1] != "=":
                raise ValueError(f"scorer {name!r} in {text!r}: write its arguments as field=value")
            key, rest = rest[0], rest[2:]
            fields = {f.name: f for f in dataclasses.fields(cls)}
            if key not in fields:
                raise ValueError(f"scorer {name!r} has no field {key!r}; its fields: {', '.join(fields) or 'none'}")
            if key == "of":
                kwargs[key], rest = _parse(rest, text)
            else:
                kwargs[key], rest = _value(rest[0], fields[key]), rest[1:]
            if rest[:1] == [","]:
                rest = rest[1:]
        if rest[:1] != [")"]:
            raise ValueError(f"missing ')' after the arguments of {name!r} in {text!r}")
        rest = rest[1:]
    return cls(**kwargs), rest


def _value(token: str, f: dataclasses.Field) -> object:
    default = _default(f)
    try:
        return int(token) if default.lstrip("-").isdigit() else token
    except ValueError:
        raise ValueError(f"{f.name}={token!r} must be an int") from None


# ----------------------------------------------------------------------------------------- selection
def select(scores: torch.Tensor, rows: Packing, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the `keep[b]` best candidates of each sequence b (its last one, q, always kept).

    scores: [B, width] padded as `rows.pad` lays them out. Ties go to the earlier position. Returns
    (kept, dropped) as packed row indices, each in packed order (sequence, then original position).
    Sizes are known on the host, so prefill never waits for the device to learn which rows were dropped.
    """
    B, width = scores.shape
    s = scores.float().clone()
    s.scatter_(1, rows.last_slot.clamp(min=0)[:, None], float("inf"))
    if rows.valid is not None:
        s.masked_fill_(~rows.valid, float("-inf"))
    order = torch.argsort(s, dim=1, descending=True, stable=True)  # [B, width]
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(width, device=s.device).expand(B, width))
    limit = upload(np.asarray(keep, dtype=np.int64), s.device)
    kept = (rank < limit[:, None]).view(-1)[rows.flat]  # [N] bool, packed order
    split = torch.argsort((~kept).to(torch.uint8), stable=True)  # kept rows first, both halves in packed order
    n_kept = sum(keep)
    return split[:n_kept], split[n_kept:]
