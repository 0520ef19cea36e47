"""Test helpers: tiny random-weight models of every supported family, built from transformers configs (fp32, CPU).

Weights are drawn wider than transformers' default init (std 0.1, not 0.02) so that attention rows
are peaked: importance scores are then well separated and top-k selection does not hinge on float
rounding. Norm weights and projection biases are randomised too, so that an engine that skipped a
norm or a bias would be caught.
"""

from __future__ import annotations

import functools
import re

import torch
import transformers as tf

VOCAB = 384
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    initializer_range=0.1,
    tie_word_embeddings=False,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
GEMMA3 = {
    "sliding_window": 8,
    "layer_types": ["full_attention", "sliding_attention"] * 3,
    "query_pre_attn_scalar": 24,
}

# family name -> (config class, model class, config overrides)
FAMILIES: dict[str, tuple[type, type, dict]] = {
    "llama_mha": (tf.LlamaConfig, tf.LlamaForCausalLM, {"num_key_value_heads": 4}),
    "llama_gqa_rope3": (tf.LlamaConfig, tf.LlamaForCausalLM, {"rope_parameters": LLAMA3_ROPE}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {}),
    # head_dim * heads != hidden_size, as in real Qwen3 checkpoints
    "qwen3_head32": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 32}),
    # Gemma 3: sliding layers with a window far shorter than the tests' prompts, full layers where
    # the shared suites prune (0, 2, 4), two RoPE tables, an attention scale that is not 1/sqrt(dh)
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, GEMMA3),
}


@functools.cache
def tiny_model(family: str, num_layers: int = 6, seed: int = 0) -> torch.nn.Module:
    """A cached tiny model; tests must not modify it (the engine never does)."""
    return random_tiny(*FAMILIES[family], num_layers=num_layers, seed=seed)


def random_tiny(
    config_cls: type, model_cls: type, overrides: dict, num_layers: int = 6, seed: int = 0, norm_center: float = 1.0
) -> torch.nn.Module:
    """A tiny model of COMMON's size with randomised biases and norm weights around `norm_center`
    (0 for norms that scale by 1 + w, as Gemma's do)."""
    config = config_cls(**{**COMMON, "num_hidden_layers": num_layers, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(norm_center + 0.2 * torch.randn_like(p))
    return model


def prompt_ids(n: int, seed: int = 0) -> torch.Tensor:
    """n random token ids: [n]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n,), generator=g)


def word_tokenizer():
    """A whitespace word-level tokenizer over VOCAB words ("w0" ... ), unknown words -> "w0"; no network needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1")


def flat(output: str) -> str:
    """The message without the line breaks and box borders of typer's rich error panel."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


def assert_clean_error(result, message: str) -> None:
    """A CLI result that failed as the CLI promises: exit code 2, `message` in its panel, no traceback."""
    assert result.exit_code == 2, result.output
    assert message in flat(result.output), flat(result.output)
    assert "Traceback" not in result.output


def save_tiny_model(path, family: str = "llama_gqa_rope3", num_layers: int = 6):
    """A tiny model and its word tokenizer saved with save_pretrained, as a user's model folder: path."""
    tiny_model(family, num_layers).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path
