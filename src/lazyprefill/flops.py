"""FLOP counts of a prefill from the token counts each layer computed, and the ideal speedup they imply."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .adapters import adapter_for


@dataclass(frozen=True)
class ModelDims:
    """The sizes that set a Llama-family layer's FLOPs."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelDims:
        a = adapter_for(model)
        return cls(a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim,
                   model.config.intermediate_size, a.vocab_size)

    @property
    def linear_flops(self) -> int:
        """Per token per layer: q, k, v, o projections and the gated MLP (2 FLOPs per multiply-add)."""
        d, qd, kvd = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * (d * qd + 2 * d * kvd + qd * d + 3 * d * self.ffn)

    @property
    def attention_flops(self) -> int:
        """Per (query, key) pair per layer: q.k and p.v for every query head."""
        return 4 * self.heads * self.head_dim


def prefill_flops(dims: ModelDims, computed: list[int]) -> float:
    """FLOPs of a prefill that ran computed[l] tokens through layer l, with causal attention among them."""
    if len(computed) != dims.layers:
        raise ValueError(f"need one token count per layer ({dims.layers}), got {len(computed)}")
    layers = sum(n * dims.linear_flops + n * (n + 1) / 2 * dims.attention_flops for n in computed)
    return layers + 2 * dims.hidden * dims.vocab  # LM head on the last token


def ideal_speedup(dims: ModelDims, computed: list[int]) -> float:
    """Dense prefill FLOPs over the FLOPs of the kept counts: the speedup a free pruning would give."""
    return prefill_flops(dims, [computed[0]] * dims.layers) / prefill_flops(dims, computed)
