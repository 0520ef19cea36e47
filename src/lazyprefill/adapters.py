"""Model-family adapters: the only place that knows how a transformers decoder layer is built.

The engine runs each decoder layer in two halves (attention projections, then output projection and
MLP) so that it can choose which rows enter each layer and score tokens between the halves. Every
half reuses the model's own modules (projections, norms, MLP, rotary embedding); nothing is copied.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch
from torch import nn

from .parallel import TensorParallel
from .schedule import GEMMA3_PRESETS, PRESETS, Preset
from .scoring import Heads, reduce_heads


class LlamaAdapter:
    """Llama 2/3 (any rope scaling), SmolLM, Mistral and Qwen2: q/k/v biases live in the projections."""

    presets: Mapping[str, Preset] = PRESETS  # the schedule presets measured for this family (schedule.py)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.base = model.model
        self.layers = self.base.layers
        cfg = model.config
        self.config = cfg
        self.num_layers: int = cfg.num_hidden_layers
        # split over ranks (parallel.py): this rank's heads, by which the engine lays out q, K/V and its cache
        self.tp: TensorParallel | None = TensorParallel.of(self.layers[0].self_attn.q_proj.weight)
        self.num_heads: int = self._local(cfg.num_attention_heads, "num_attention_heads")
        self.num_kv_heads: int = self._local(cfg.num_key_value_heads, "num_key_value_heads")
        self.head_dim: int = self.layers[0].self_attn.head_dim
        self.hidden_size: int = cfg.hidden_size
        self.vocab_size: int = self.base.embed_tokens.num_embeddings
        self.max_positions: int = cfg.max_position_embeddings
        self.scaling: float = self.layers[0].self_attn.scaling
        self.windows: list[int | None] = _windows(cfg)
        self._apply_rope = sys.modules[type(self.base).__module__].apply_rotary_pos_emb

    def _local(self, count: int, what: str) -> int:
        return count if self.tp is None else self.tp.local(count, what)

    def reduce_heads(self, probs: torch.Tensor, heads: Heads) -> torch.Tensor:
        """probs: [B, H, w, W] this rank's heads -> [B, w, W] the mean or max over every head of the model: under
        tensor parallelism one all-reduce, so that every rank scores (and selects) alike."""
        if self.tp is None:
            return reduce_heads(probs, heads)
        return self.tp.reduce_heads(probs, heads, self.config.num_attention_heads)

    def check_same(self, what: str, *tensors: torch.Tensor) -> None:
        """Raise parallel.RanksDiverged unless these integer tensors (selections, depths) are equal on every rank;
        nothing in one process."""
        if self.tp is not None:
            self.tp.check_same(what, *tensors)

    @property
    def device(self) -> torch.device:
        return self.base.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [n] -> h: [n, d]"""
        return self.base.embed_tokens(ids)

    def window(self, layer: int) -> int | None:
        """How far back `layer` attends: a row at position p sees keys in (p - window, p]; None: everything."""
        return self.windows[layer]

    def prunable_layers(self) -> list[int] | None:
        """Layers where the last token's attention row can score every candidate (None: any but the last).

        A sliding-window layer's row covers only the last `window` positions, so a model that mixes
        window and full-attention layers prunes at its full-attention layers only (README, "Models
        with sliding-window layers"). A model whose every layer slides (Mistral v0.1) has none; there
        the row ignores the window, which changes nothing for prompts that fit in it.
        """
        if all(w is None for w in self.windows) or all(w is not None for w in self.windows):
            return None
        return [layer for layer in range(self.num_layers - 1) if self.windows[layer] is None]

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: [n] original positions -> (cos, sin), rows on dim 0 ([n, d_head] each), in the model's dtype.

        The engine only selects rows of these tables and hands them back to `qkv`.
        """
        cos, sin = self.base.rotary_emb(self.base.embed_tokens.weight, pos[None])  # reads only dtype/device
        return cos[0], sin[0]

    def qkv(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h: [n, d] -> post-RoPE q: [n, H, dh], k: [n, Hkv, dh], v: [n, Hkv, dh] (row-major, as packed rows)."""
        return self.block_qkv(self.layers[layer], h, *self.layer_rope(layer, cos, sin))

    def block_qkv(
        self, block: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`qkv` given the layer's module and its RoPE rows ([n, dh] each): the same code for every layer, so
        that one compiled version serves them all (through block_qkv_pair, decoding.CompiledLayers)."""
        attn = block.self_attn
        x = block.input_layernorm(h)
        n = x.shape[0]
        q = attn.q_proj(x).view(n, -1, self.head_dim)
        k = attn.k_proj(x).view(n, -1, self.head_dim)
        v = attn.v_proj(x).view(n, -1, self.head_dim)
        q, k = self._qk_norm(attn, q, k)
        q, k = self._apply_rope(q, k, cos, sin, unsqueeze_dim=1)
        return q, k, v

    def qkv_pair(
        self, layer: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`qkv` with K and V stacked: q [n, H, dh], kv [2, n, Hkv, dh], which LazyCache.write_kv_pair stores in one
        copy (for decoding steps, whose rows are few: the stack costs a copy of K and V)."""
        return self.block_qkv_pair(self.layers[layer], h, *self.layer_rope(layer, cos, sin))

    def block_qkv_pair(
        self, block: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`qkv_pair` given the layer's module, as block_qkv: compiled (decoding.CompiledLayers), RoPE's kernel can
        write K into the stack directly, and V, a matmul's output, is copied in."""
        q, k, v = self.block_qkv(block, h, cos, sin)
        return q, torch.stack([k, v])

    def layer_rope(self, layer: int, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `rope`'s tables that `layer` uses: [n, dh] each."""
        return cos, sin

    def _qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def finish(self, layer: int, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """h: [n, d] layer input, attn_out: [n, H, dh] -> layer output [n, d]."""
        return self.block_finish(self.layers[layer], h, attn_out)

    def block_finish(self, block: nn.Module, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """`finish` given the layer's module (one compiled version serves every layer, as for block_qkv)."""
        h = h + block.self_attn.o_proj(attn_out.reshape(h.shape[0], -1))
        return h + block.mlp(block.post_attention_layernorm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [n, d] last-layer output -> logits [n, vocab] in fp32."""
        return self.model.lm_head(self.base.norm(h)).float()


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: RMSNorm on each head's q and k before RoPE."""

    def _qk_norm(self, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attn.q_norm(q), attn.k_norm(k)


class Gemma3Adapter(Qwen3Adapter):
    """Gemma 3 (text): q/k RMSNorm, a local RoPE table for sliding layers and a global one for full
    layers, norms after attention and around the MLP, and optional final logit soft-capping.
    Its presets are its own: tuned on gemma3-270m, where they differ from SmolLM2's.

    The embedding scale (sqrt(d)) lives in the model's own embedding module, and the attention scale
    (query_pre_attn_scalar ** -0.5) in its attention module's `scaling`; both are read, not copied.
    """

    presets = GEMMA3_PRESETS

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        cfg = self.config
        if getattr(cfg, "attn_logit_softcapping", None) is not None:
            raise ValueError(
                "this Gemma model soft-caps attention logits, which SDPA cannot do: lazyprefill supports "
                "Gemma 3 models with attn_logit_softcapping=None"
            )
        if getattr(cfg, "use_bidirectional_attention", False):
            raise ValueError("bidirectional Gemma 3 (an encoder) is not a causal LM: use a decoder checkpoint")
        self.layer_types: list[str] = list(cfg.layer_types)
        self.rope_types: list[str] = sorted(set(self.layer_types))
        self.softcap: float | None = cfg.final_logit_softcapping

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: [n] -> (cos, sin): [n, R, dh] each, one table per layer type (R = 2: local and global)."""
        x = self.base.embed_tokens.weight  # the rotary module reads only its dtype and device
        tables = [self.base.rotary_emb(x, pos[None], kind) for kind in self.rope_types]
        return torch.stack([c[0] for c, _ in tables], 1), torch.stack([s[0] for _, s in tables], 1)

    def layer_rope(self, layer: int, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kind = self.rope_types.index(self.layer_types[layer])
        return cos[:, kind], sin[:, kind]

    def block_finish(self, block: nn.Module, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        h = h + block.post_attention_layernorm(block.self_attn.o_proj(attn_out.reshape(h.shape[0], -1)))
        return h + block.post_feedforward_layernorm(block.mlp(block.pre_feedforward_layernorm(h)))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h: [n, d] last-layer output -> logits [n, vocab] in fp32, soft-capped as the model does."""
        logits = self.model.lm_head(self.base.norm(h))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()


ADAPTERS: dict[str, type[LlamaAdapter]] = {
    "gemma3_text": Gemma3Adapter,
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
            f"{', '.join(sorted(ADAPTERS))} (Llama 2/3, SmolLM, Mistral, Qwen2, Qwen3, Gemma 3 text)"
        )
    # layers placed on several GPUs (accelerate's device_map); "cpu" and "disk" entries are offloaded weights that
    # accelerate brings to the execution device, not a split
    devices = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()} - {"cpu", "disk"}
    if len(devices) > 1:
        raise ValueError(
            f"this model is split over devices {sorted(devices)} (device_map): lazyprefill keeps its K/V cache and "
            "selection state on one device, so split a model larger than one GPU by heads instead, under torchrun: "
            "lazyprefill generate --tp N, or lazyprefill.parallel.load (README, Tensor parallelism)"
        )
    return ADAPTERS[model_type](model)


def _windows(config) -> list[int | None]:
    """Each layer's attention window, as transformers applies it: Mistral's `sliding_window` covers every
    layer; Qwen2/3 and Gemma 3 name each layer's type in `layer_types`."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or layer_types is None:
        return [window] * config.num_hidden_layers
    return [window if kind == "sliding_attention" else None for kind in layer_types]
