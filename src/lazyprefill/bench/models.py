"""The benchmark's models: real shapes with seeded random weights, or a model loaded by name."""

from __future__ import annotations

import torch
from torch import nn

from .config import SHAPES


def random_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0, **config_changes) -> nn.Module:
    """A Llama of a named shape with seeded random weights, built directly on `device` in `dtype`.
    `config_changes` override the shape's config (a tokenizer's vocabulary and special tokens, say)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; shapes: {', '.join(SHAPES)}")
    config = LlamaConfig(**{**SHAPES[shape], "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
                            **config_changes})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def load_bench_model(name: str, device: str, dtype: torch.dtype, seed: int = 0, tp: int = 1) -> nn.Module:
    """A named shape (random weights), the embedded `smollm2`, or a local model path; with `tp` > 1, this rank's
    share of it in a torchrun job of `tp` processes (a shape's weights are drawn whole on every rank with the same
    seed, then split: parallel.shard)."""
    if name in SHAPES:
        model = random_model(name, device, dtype, seed)
        if tp == 1:
            return model
        from ..parallel import shard

        return shard(model)
    from ..models import load_model

    model, _ = load_model(name, device=device, dtype=dtype, tp=tp)
    return model
