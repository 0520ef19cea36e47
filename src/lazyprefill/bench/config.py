"""What a benchmark run measures: model shapes, the presets of lengths and repeats, and user overrides."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from .. import decoding
from ..schedule import PRESETS

# Real model shapes with random weights: with fixed keep ratios the work does not depend on weight values.
# Positions are raised to 128K for both so that every benchmark length fits (Llama 2 was trained on 4K).
SHAPES: dict[str, dict] = {
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072 + 256,
    ),
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072 + 256,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    ),
    # SmolLM2-135M's shape: a model whose decoding steps are host-bound on any GPU (positions raised for 32K).
    "smollm2-shape": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, tie_word_embeddings=True, max_position_embeddings=32768 + 1024,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    ),
    # A few-MB model for tests and for trying the harness anywhere.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384 + 256,
    ),
}

TRANSFORMERS = "transformers"
# transformers `generate` with the attention backends our decoding uses (flash first): isolates how much of
# a decoding difference comes from cuDNN attention's per-shape planning rather than from the engine.
TRANSFORMERS_FLASH = "transformers+flash"
DENSE = "dense"


@dataclass
class BenchConfig:
    """What one benchmark run measures. `lengths` maps a model name to its prompt lengths."""

    lengths: dict[str, list[int]]
    decode_lengths: list[int] = field(default_factory=list)  # prompts after which decoding is timed
    repeats: int = 5
    warmup: int = 2
    decode_tokens: int = 128
    decode_repeats: int = 1
    device: str = "cuda"
    dtype: str = "bfloat16"
    seed: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # batched TTFT and decoding, prompts of batch_length
    batch_length: int = 8192
    batch_decode_tokens: int = 32

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.decode_tokens < 2 or self.decode_repeats < 1:
            raise ValueError("repeats, decode_repeats >= 1, warmup >= 0 and decode_tokens >= 2 are required")
        if any(b < 1 for b in self.batch_sizes) or self.batch_length < 2 or self.batch_decode_tokens < 2:
            raise ValueError("batch sizes >= 1, batch_length >= 2 and batch_decode_tokens >= 2 are required")
        for name, lengths in self.lengths.items():
            if (not lengths and not self.batch_sizes) or min(lengths, default=2) < 2:
                raise ValueError(f"model {name!r} needs at least one prompt length >= 2, got {lengths}")


BENCH_PRESETS: dict[str, BenchConfig] = {
    "gpu": BenchConfig(
        lengths={"llama2-7b": [4096, 8192, 16384, 32768], "llama3-8b": [4096, 8192, 16384, 32768, 65536, 131072]},
        decode_lengths=[8192, 32768],
    ),
    "gpu-batch": BenchConfig(
        lengths={"llama2-7b": [], "llama3-8b": []}, repeats=3, warmup=1, batch_sizes=[1, 4, 8], batch_length=8192
    ),
    "cpu": BenchConfig(
        lengths={"smollm2": [1024, 2048, 4096, 8192]}, decode_lengths=[1024], warmup=1, device="cpu", dtype="float32"
    ),
}


def configure(
    preset_name: str,
    models: list[str] | None = None,
    lengths: list[int] | None = None,
    decode_lengths: list[int] | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    decode_repeats: int | None = None,
    batch_sizes: list[int] | None = None,
    batch_length: int | None = None,
) -> BenchConfig:
    """A preset with the user's overrides: other models, lengths (for every model), batches or repeat counts."""
    if preset_name not in BENCH_PRESETS:
        raise ValueError(f"unknown bench preset {preset_name!r}; presets: {', '.join(BENCH_PRESETS)}")
    base = BENCH_PRESETS[preset_name]
    names = models or list(base.lengths)
    per_model = {name: list(lengths or base.lengths.get(name) or next(iter(base.lengths.values()))) for name in names}
    longest = max(max(ls, default=0) for ls in per_model.values())
    if decode_lengths is None:
        shortest = min(min(ls, default=0) for ls in per_model.values())
        decode_lengths = [n for n in base.decode_lengths if n <= longest] or ([shortest] if shortest else [])
    return BenchConfig(
        lengths=per_model,
        decode_lengths=decode_lengths,
        repeats=base.repeats if repeats is None else repeats,
        warmup=base.warmup if warmup is None else warmup,
        decode_tokens=base.decode_tokens,
        decode_repeats=base.decode_repeats if decode_repeats is None else decode_repeats,
        device=base.device,
        dtype=base.dtype,
        seed=base.seed,
        batch_sizes=base.batch_sizes if batch_sizes is None else batch_sizes,
        batch_length=batch_length or base.batch_length,
        batch_decode_tokens=base.batch_decode_tokens,
    )


def progress_total(cfg: BenchConfig, presets: int = len(PRESETS)) -> int:
    """How many progress labels `run` emits (for a progress bar)."""
    per_length = 2 + presets
    ttft = per_length + cfg.repeats  # a warm-up a method, then a label a timed round
    batches = (ttft + per_length + 1) * len(cfg.batch_sizes)
    return sum(ttft * len(ls) + (per_length + 1) * sum(n <= max(ls, default=0) for n in cfg.decode_lengths)
               + batches for ls in cfg.lengths.values())


def add_compile_arguments(parser: argparse.ArgumentParser, note: str = "") -> None:
    """The decoding-compile flags that GPU benchmarks take, so that an A/B run can set what a step compiles
    (`use_compile_arguments` applies them); `note` starts each help text."""
    parser.add_argument("--compile-options", type=json.loads,
                        help=f"{note}JSON of Inductor options for the compiled layer halves, in place of "
                             "decoding.COMPILE_OPTIONS ('{}': Inductor's defaults)")
    parser.add_argument("--compile-selection", action=argparse.BooleanOptionalAction,
                        help=f"{note}compile the selection with the layer halves (decoding.COMPILE_SELECTION; "
                             "default: its value)")


def use_compile_arguments(args: argparse.Namespace) -> None:
    """Set decoding.COMPILE_OPTIONS and COMPILE_SELECTION from the flags given (add_compile_arguments)."""
    if args.compile_options is not None:
        decoding.COMPILE_OPTIONS = args.compile_options
    if args.compile_selection is not None:
        decoding.COMPILE_SELECTION = args.compile_selection
