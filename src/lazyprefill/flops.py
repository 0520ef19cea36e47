"""FLOP counts of a prefill from the token counts each layer computed, and the ideal speedup they imply."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapters import adapter_for
from .sparse import Sparse


@dataclass(frozen=True)
class ModelDims:
    """The sizes that set a Llama-family layer's FLOPs (one rank's heads and MLP columns under tensor parallelism);
    `windows`: each layer's sliding window in positions (None: full attention), empty when every layer attends to
    the whole prompt."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    windows: tuple[int | None, ...] = ()

    def __post_init__(self) -> None:
        if self.windows and len(self.windows) != self.layers:
            raise ValueError(f"need one window (or None) per layer ({self.layers}), got {len(self.windows)}")

    def window(self, layer: int) -> int | None:
        return self.windows[layer] if self.windows else None

    @classmethod
    def of(cls, model: nn.Module) -> ModelDims:
        a = adapter_for(model)
        windows = tuple(a.windows) if any(w is not None for w in a.windows) else ()
        ffn = model.config.intermediate_size // (1 if a.tp is None else a.tp.size)  # one rank's, as its heads are
        return cls(a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, ffn, a.vocab_size, windows)

    @property
    def linear_flops(self) -> int:
        """Per token per layer: q, k, v, o projections and the gated MLP (2 FLOPs per multiply-add)."""
        d, qd, kvd = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * (d * qd + 2 * d * kvd + qd * d + 3 * d * self.ffn)

    @property
    def attention_flops(self) -> int:
        """Per (query, key) pair per layer: q.k and p.v for every query head."""
        return 4 * self.heads * self.head_dim


def prefill_work(computed: list[int], tokens: int) -> float:
    """A prefill's (token, layer) rows as a share of dense's: the work pruning left, before FLOPs weigh the layers."""
    return sum(computed) / (len(computed) * tokens)


def attention_pairs(n: int, prompt: int, window: int | None) -> float:
    """(query, key) pairs of causal attention among n of a `prompt`-token prompt's tokens.

    A sliding window of w positions holds about w * n / prompt of them when the n are spread over the
    prompt, so the i-th query sees min(i, that many) keys."""
    if window is None:
        return n * (n + 1) / 2
    w = min(n, window * n / prompt)
    return n * w - w * (w - 1) / 2


def prefill_flops(dims: ModelDims, computed: list[int], sparse: Sparse | None = None) -> float:
    """FLOPs of a prefill that ran computed[l] tokens through layer l, with causal attention among them, or
    block-sparse attention (`sparse`, counted at its most) where it applies."""
    if len(computed) != dims.layers:
        raise ValueError(f"need one token count per layer ({dims.layers}), got {len(computed)}")
    prompt = computed[0]

    def pairs(layer: int, n: int) -> float:
        if sparse is not None and sparse.applies(layer, dims.window(layer)):
            return sparse.pairs(n)
        return attention_pairs(n, prompt, dims.window(layer))

    layers = sum(n * dims.linear_flops + pairs(layer, n) * dims.attention_flops for layer, n in enumerate(computed))
    return layers + 2 * dims.hidden * dims.vocab  # LM head on the last token


def ideal_speedup(dims: ModelDims, computed: list[int], sparse: Sparse | None = None) -> float:
    """Dense prefill FLOPs over the FLOPs of the kept counts (and sparse attention): the speedup free pruning and
    sparsity would give."""
    return prefill_flops(dims, [computed[0]] * dims.layers) / prefill_flops(dims, computed, sparse)
