"""Model-family adapters: the only place that knows how a transformers decoder layer is built.

The engine runs each decoder layer in two halves (attention projections, then output projection and
MLP) so that it can choose which rows enter each layer and score tokens between the halves. Every
half reuses the model's own modules (projections, norms, MLP, rotary embedding); nothing is copied.
"""

from __future__ import annotations

import sys

import torch
from torch import nn


class LlamaAdapter:
    """Llama 2/3 (any rope scaling), SmolLM, Mistral and Qwen2: q/k/v biases live in the projections."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = model.model
        self.layers = self.base.layers
        cfg = model.config
        self.config = cfg
        self.num_layers: int = cfg.num_hidden_layers
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = cfg.num_key_value_heads
        self.head_dim: int = self.layers[0].self_attn.head_dim
        self.hidden_size: int = cfg.hidden_size
        self.vocab_size: int = self.base.embed_tokens.num_embeddings
        self.max_positions: int = cfg.max_position_embeddings
        self.scaling: float = self.layers[0].self_attn.scaling
        self.sliding_window: int | None = _sliding_window(cfg)
        self._apply_rope = sys.modules[type(self.base).__module__].apply_rotary_pos_emb

    @property
    def device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [n] -> h: [n, d]"""
        return self.base.embed_tokens(ids)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: [n] original positions -> (cos, sin): [n, d_head] each, in the model's dtype."""
        cos, sin = self.base.rotary_emb(self.base.embed_tokens.weight, pos[None])  # reads only dtype/device
        return cos[0], sin[0]

    def qkv(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [n, d] -> post-RoPE q: [n, H, dh], k: [n, Hkv, dh], v: [n, Hkv, dh] (row-major, as packed rows)."""
        attn = self.layers[layer].self_attn
        x = self.layers[layer].input_layernorm(h)
        n = x.shape[0]
        q = attn.q_proj(x).view(n, -1, self.head_dim)
        k = attn.k_proj(x).view(n, -1, self.head_dim)
        v = attn.v_proj(x).view(n, -1, self.head_dim)
        q, k = self._qk_norm(attn, q, k)
        q, k = self._apply_rope(q, k, cos, sin, unsqueeze_dim=1)
        return q, k, v

    def _qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """h: [n, d] layer input, attn_out: [n, H, dh] -> layer output [n, d]."""
        block = self.layers[layer]
        h = h + block.self_attn.o_proj(attn_out.reshape(h.shape[0], -1))
        return h + block.mlp(block.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [n, d] last-layer output -> logits [n, vocab] in fp32."""
        return self.model.lm_head(self.base.norm(h)).float()


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: RMSNorm on each head's q and k before RoPE."""

    def _qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.q_norm(q), attn.k_norm(k)


ADAPTERS: dict[str, type[LlamaAdapter]] = {
    "llama": LlamaAdapter,
    "mistral": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "qwen3": Qwen3Adapter,
}


def adapter_for(model: nn.Module) -> LlamaAdapter:
    """Pick the adapter for a loaded transformers causal LM, or say which families are supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {model_type!r}: lazyprefill supports "
            f"{', '.join(sorted(ADAPTERS))} (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3)"
        )
    return ADAPTERS[model_type](model)


def _sliding_window(config) -> int | None:
    """The attention window if any layer uses one (Mistral v0.1, Qwen with use_sliding_window)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return window
