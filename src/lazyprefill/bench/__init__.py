"""Speed benchmarks: TTFT and decoding of lazyprefill beside plain transformers, per MEASURE.md.

Each prompt length is timed for plain transformers `model(ids, logits_to_keep=1)` (SDPA), the engine's
dense path, and every schedule preset, in one process; batches of prompts likewise, against transformers
on the same [B, n] batch with its attention mask. The ideal speedup of a schedule comes from the
token counts it actually kept per layer, so the efficiency column says how much of the possible gain
the engine turns into time. Kept free of CLI-only imports: the GPU machine runs it from `PYTHONPATH=src`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from ..adapters import adapter_for
from ..env import DTYPES, machine_info
from ..flops import ModelDims, ideal_speedup, prefill_flops
from .config import (
    BENCH_PRESETS,
    DENSE,
    SHAPES,
    TRANSFORMERS,
    TRANSFORMERS_FLASH,
    BenchConfig,
    add_compile_arguments,
    configure,
    progress_total,
    use_compile_arguments,
)
from .models import load_bench_model, random_model
from .report import batch_markdown, markdown, merge, plot, plot_batch, write
from .timing import (
    bench_decode,
    bench_ttft,
    lazy_prefill,
    random_prompts,
    reset_peak_memory,
    schedules_for,
    time_methods,
    time_once,
    transformers_prefill,
)

__all__ = [
    "BENCH_PRESETS", "DENSE", "SHAPES", "TRANSFORMERS", "TRANSFORMERS_FLASH", "BenchConfig", "ModelDims",
    "add_compile_arguments", "batch_markdown", "bench_decode", "bench_ttft", "configure", "ideal_speedup",
    "lazy_prefill", "load_bench_model", "markdown", "merge", "plot", "plot_batch", "prefill_flops", "progress_total",
    "random_model", "random_prompts", "run", "schedules_for", "time_methods", "time_once", "transformers_prefill",
    "use_compile_arguments", "write",
]


def run(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Measure every model in `cfg.lengths`; returns the JSON-ready result."""
    progress = progress or (lambda _label: None)
    device = torch.device(cfg.device)
    result: dict = {"machine": machine_info(device), "protocol": asdict(cfg), "models": []}
    for name, lengths in cfg.lengths.items():
        model = load_bench_model(name, cfg.device, DTYPES[cfg.dtype], cfg.seed)
        num_layers = adapter_for(model).num_layers
        entry = {
            "name": name,
            "random_weights": name in SHAPES,
            "config": _config_dict(model),
            "dims": asdict(ModelDims.of(model)),
            "schedules": {k: {"keep": s.keep, "scorer": s.scorer.spec()} for k, s in schedules_for(num_layers).items()},
            "ttft": [],
            "decode": [],
            "batch_ttft": [],
            "batch_decode": [],
        }
        for n in lengths:
            entry["ttft"] += bench_ttft(model, n, cfg, progress)
        for n in cfg.decode_lengths:
            if n <= max(lengths, default=0):
                entry["decode"] += bench_decode(model, n, cfg, progress)
        for batch in cfg.batch_sizes:
            entry["batch_ttft"] += bench_ttft(model, cfg.batch_length, cfg, progress, batch)
            steps = cfg.batch_decode_tokens
            entry["batch_decode"] += bench_decode(model, cfg.batch_length, cfg, progress, batch, steps)
        result["models"].append(entry)
        del model
        reset_peak_memory(device)
    return result


def _config_dict(model: nn.Module) -> dict:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_parameters")
    cfg = model.config.to_dict()
    return {k: cfg.get(k) for k in keys} | {"dtype": str(next(model.parameters()).dtype)}
