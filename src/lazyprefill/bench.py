"""Speed benchmarks: TTFT and decoding of lazyprefill beside plain transformers, per MEASURE.md.

Each prompt length is timed for plain transformers `model(ids, logits_to_keep=1)` (SDPA), the engine's
dense path, and every schedule preset, in one process; batches of prompts likewise, against transformers
on the same [B, n] batch with its attention mask. The ideal speedup of a schedule comes from the
token counts it actually kept per layer, so the efficiency column says how much of the possible gain
the engine turns into time. Kept free of CLI-only imports: the GPU machine runs it from `PYTHONPATH=src`.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel

from .adapters import LlamaAdapter, adapter_for
from .engine import DECODE_ATTENTION, Engine
from .generation import LazyLLM, synchronize
from .schedule import PRESETS, Schedule, preset

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

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------- FLOPs
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


# ------------------------------------------------------------------------------------- models
def random_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A Llama of a named shape with seeded random weights, built directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; shapes: {', '.join(SHAPES)}")
    config = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=None, pad_token_id=None)
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


def load_bench_model(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A named shape (random weights), the embedded `smollm2`, or a local model path."""
    if name in SHAPES:
        return random_model(name, device, dtype, seed)
    from .models import load_model

    model, _ = load_model(name, device=device, dtype=dtype)
    return model


# ------------------------------------------------------------------------------------- timing
def time_once(fn: Callable[[list[torch.Tensor]], object], x: list[torch.Tensor]) -> float:
    """Milliseconds of one call on a batch of prompts: CUDA events on a GPU, perf_counter on a CPU."""
    if x[0].device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(x[0].device)
        start.record()
        fn(x)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(x)
    return (time.perf_counter() - t0) * 1e3


def transformers_prefill(model: nn.Module) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """What a user would otherwise run: one forward pass over the [B, n] batch, logits of the last token only.

    The benchmark's prompts of a batch have one length, so the attention mask a padded batch carries is all
    ones, and transformers drops it for the causal kernel.
    """

    def run(prompts: list[torch.Tensor]) -> torch.Tensor:
        ids = torch.stack(prompts)
        return model(ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits[:, -1]

    return run


def lazy_prefill(adapter: LlamaAdapter, schedule: Schedule) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The engine's prefill as `generate` runs it, cache allocation included."""

    def run(prompts: list[torch.Tensor]) -> torch.Tensor:
        return Engine(adapter, schedule, capacity=max(p.shape[0] for p in prompts) + 1).prefill(prompts)[0]

    return run


def schedules_for(num_layers: int) -> dict[str, Schedule]:
    """Dense plus every schedule preset (new presets appear here without code changes)."""
    return {DENSE: Schedule(), **{name: preset(name, num_layers) for name in PRESETS}}


def random_prompts(n: int, vocab: int, count: int, device: torch.device, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + n)
    return [torch.randint(0, vocab, (n,), generator=g).to(device) for _ in range(count)]


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_ttft(
    model: nn.Module, n: int, cfg: BenchConfig, progress: Callable[[str], None], batch: int = 1
) -> list[dict]:
    """One row per method for a batch of `batch` prompts of n tokens; running out of memory is a note, not a crash.

    Methods are timed in rounds (each method once per round, inputs rotating between rounds), so that a
    GPU whose clocks drift during the run slows every method alike.
    """
    adapter = adapter_for(model)
    device, dims = adapter.device, ModelDims.of(model)
    inputs = [random_prompts(n, adapter.vocab_size, batch, device, cfg.seed + 1000 * i) for i in range(3)]
    methods: dict[str, tuple[Callable, Schedule | None]] = {TRANSFORMERS: (transformers_prefill(model), None)}
    for name, schedule in schedules_for(adapter.num_layers).items():
        methods[name] = (lazy_prefill(adapter, schedule), schedule)
    rows = {name: {"length": n, "batch": batch, "method": name, "note": "", "ms": None, "times_ms": []}
            for name in methods}
    with torch.inference_mode():
        for name, (fn, schedule) in methods.items():  # warm-ups, kept counts and peak memory
            progress(f"{n} x{batch} {name}")
            row = rows[name]
            row["computed"] = [n] * adapter.num_layers
            try:
                _peak_reset(device)
                if schedule is not None:
                    row["computed"] = Engine(adapter, schedule, capacity=n + 1).prefill(inputs[0])[1][0].computed
                for i in range(cfg.warmup):
                    fn(inputs[i % len(inputs)])
                synchronize(device)
            except RuntimeError as err:
                if not _is_oom(err):
                    raise
                row["note"] = "out of memory"
            row["peak_gb"] = _peak_gb(device)
            _peak_reset(device)
        for i in range(cfg.repeats):
            for name, (fn, _) in methods.items():
                if not rows[name]["note"]:
                    rows[name]["times_ms"].append(time_once(fn, inputs[i % len(inputs)]))
    base = statistics.median(rows[TRANSFORMERS]["times_ms"]) if rows[TRANSFORMERS]["times_ms"] else None
    for row in rows.values():
        row["ideal"] = ideal_speedup(dims, row["computed"])
        row["ms"] = statistics.median(row["times_ms"]) if row["times_ms"] else None
        row["speedup"] = base / row["ms"] if base and row["ms"] else None
        row["efficiency"] = row["speedup"] / row["ideal"] if row["speedup"] else None
        row["prefill_tokens_per_s"] = batch * n * 1e3 / row["ms"] if row["ms"] else None
    return list(rows.values())


class _StepClock:
    """Host timestamps of each new token, taken once the device finished it (a streamer for `generate`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def put(self, value) -> None:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def bench_decode(
    model: nn.Module, n: int, cfg: BenchConfig, progress: Callable[[str], None], batch: int = 1,
    steps: int | None = None,
) -> list[dict]:
    """ms per greedy decoding step (one new token per sequence) after a batch of n-token prompts, per method.

    `steps` defaults to cfg.decode_tokens; tokens/s counts the new tokens of the whole batch.
    """
    adapter = adapter_for(model)
    device = adapter.device
    steps = steps or cfg.decode_tokens
    prompts = random_prompts(n, adapter.vocab_size, batch, device, cfg.seed + 1)
    warm = [p[: min(n, 256)] for p in prompts]
    rows: list[dict] = []
    methods: list[str] = [TRANSFORMERS, TRANSFORMERS_FLASH, *schedules_for(adapter.num_layers)]
    lazies = {name: LazyLLM(model, schedule) for name, schedule in schedules_for(adapter.num_layers).items()}
    for name in methods:
        progress(f"decode {n} x{batch} {name}")
        row: dict = {"length": n, "batch": batch, "method": name, "new_tokens": steps + 1, "note": ""}
        per_token: list[float] = []
        try:
            _peak_reset(device)
            for rep in range(cfg.decode_repeats + 1):  # the first run is a short warm-up
                prompt, count = (warm, 4) if rep == 0 else (prompts, steps + 1)
                clock = _StepClock(device)
                with torch.inference_mode():
                    if name in (TRANSFORMERS, TRANSFORMERS_FLASH):
                        flash = name == TRANSFORMERS_FLASH
                        ids = torch.stack(prompt)
                        with sdpa_kernel(DECODE_ATTENTION, set_priority=True) if flash else nullcontext():
                            model.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, do_sample=False,
                                           pad_token_id=0, min_new_tokens=count, max_new_tokens=count)
                        stamps = clock.stamps[1:]  # the streamer first receives the prompt
                    else:  # a list of prompts is a batch: on_token(i, token), once per step for sequence 0
                        lazies[name].generate(prompt, max_new_tokens=count, eos_token_id=[],
                                              on_token=lambda i, _t, clock=clock: i == 0 and clock.put(None))
                        stamps = clock.stamps
                if rep > 0:
                    per_token.append((stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1))
            row.update(ms_per_token=statistics.median(per_token), reps_ms=per_token, peak_gb=_peak_gb(device))
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            row.update(ms_per_token=None, reps_ms=[], peak_gb=_peak_gb(device), note="out of memory")
        _peak_reset(device)
        rows.append(row)
    base = rows[0]["ms_per_token"]
    for row in rows:
        row["speedup"] = base / row["ms_per_token"] if base and row["ms_per_token"] else None
        row["tokens_per_s"] = batch * 1e3 / row["ms_per_token"] if row["ms_per_token"] else None
    return rows


# ------------------------------------------------------------------------------------ run + report
def machine_info(device: torch.device) -> dict:
    import transformers

    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


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
        _peak_reset(device)
    return result


def _config_dict(model: nn.Module) -> dict:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "rope_parameters")
    cfg = model.config.to_dict()
    return {k: cfg.get(k) for k in keys} | {"dtype": str(next(model.parameters()).dtype)}


def progress_total(cfg: BenchConfig, presets: int = len(PRESETS)) -> int:
    """How many progress labels `run` emits (for a progress bar)."""
    per_length = 2 + presets
    batches = (2 * per_length + 1) * len(cfg.batch_sizes)
    return sum(per_length * len(ls) + (per_length + 1) * sum(n <= max(ls, default=0) for n in cfg.decode_lengths)
               + batches for ls in cfg.lengths.values())


def merge(results: list[dict]) -> dict:
    """One result from several runs (chunks of one preset): models with the same name are joined."""
    merged = {"machine": results[0]["machine"], "protocol": results[0]["protocol"], "models": []}
    by_name: dict[str, dict] = {}
    for res in results:
        for entry in res["models"]:
            if entry["name"] in by_name:
                for key in ("ttft", "decode", "batch_ttft", "batch_decode"):
                    by_name[entry["name"]].setdefault(key, []).extend(entry.get(key, []))
            else:
                by_name[entry["name"]] = json.loads(json.dumps(entry))
                merged["models"].append(by_name[entry["name"]])
    for entry in merged["models"]:
        for key in ("ttft", "decode", "batch_ttft", "batch_decode"):
            entry.setdefault(key, []).sort(key=lambda r: (r["length"], r.get("batch", 1)))
    merged["runs"] = [r["machine"] for r in results]
    return merged


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    """The tables for the README: TTFT per length and method, then decoding."""
    m = result["machine"]
    where = m.get("gpu") or m.get("cpu", "CPU")
    lines = [f"Machine: {where}; torch {m['torch']}, transformers {m['transformers']}.", ""]
    for entry in result["models"]:
        dtype = entry["config"]["dtype"].removeprefix("torch.")
        weights = f"random {dtype} weights" if entry["random_weights"] else dtype
        if entry["ttft"]:
            lines += [f"### {entry['name']} ({weights}): time to first token", "",
                      "| prompt | method | TTFT ms | speedup | ideal | efficiency | peak GB | note |",
                      "|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in entry["ttft"]:
            lines.append(f"| {r['length']} | {r['method']} | {_fmt(r['ms'], '.1f')} | {_fmt(r['speedup'], '.2f')} | "
                         f"{r['ideal']:.2f} | {_fmt(r['efficiency'], '.2f')} | {_fmt(r['peak_gb'], '.1f')} | "
                         f"{r['note']} |")
        if entry["decode"]:
            lines += ["", f"### {entry['name']}: decoding, {entry['decode'][0]['new_tokens'] - 1} greedy steps", "",
                      "| prompt | method | ms/token | speedup | peak GB | note |", "|---:|---|---:|---:|---:|---|"]
            for r in entry["decode"]:
                lines.append(f"| {r['length']} | {r['method']} | {_fmt(r['ms_per_token'], '.2f')} | "
                             f"{_fmt(r['speedup'], '.2f')} | {_fmt(r['peak_gb'], '.1f')} | {r['note']} |")
        if entry.get("batch_ttft"):
            lines += [*batch_markdown(entry, weights)]
        lines.append("")
    return "\n".join(lines)


def batch_markdown(entry: dict, weights: str) -> list[str]:
    """One row per batch size and method: prefill (TTFT of the batch) beside decoding throughput."""
    prefill = {(r["batch"], r["method"]): r for r in entry["batch_ttft"]}
    decode = {(r["batch"], r["method"]): r for r in entry["batch_decode"]}
    n = entry["batch_ttft"][0]["length"]
    steps = entry["batch_decode"][0]["new_tokens"] - 1 if entry["batch_decode"] else 0
    lines = [f"### {entry['name']} ({weights}): batches of {n}-token prompts, {steps} decoding steps", "",
             ("| batch | method | TTFT ms | prefill tok/s | speedup | ideal | decode tok/s | decode speedup | "
              "peak GB | note |"), "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key in sorted(dict.fromkeys([*decode, *prefill]), key=lambda k: k[0]):  # stable: methods keep their order
        p, d = prefill.get(key, {}), decode.get(key, {})
        lines.append(f"| {key[0]} | {key[1]} | {_fmt(p.get('ms'), '.0f')} | "
                     f"{_fmt(p.get('prefill_tokens_per_s'), ',.0f')} | "
                     f"{_fmt(p.get('speedup'), '.2f')} | {_fmt(p.get('ideal'), '.2f')} | "
                     f"{_fmt(d.get('tokens_per_s'), '.1f')} | {_fmt(d.get('speedup'), '.2f')} | "
                     f"{_fmt(p.get('peak_gb', d.get('peak_gb')), '.1f')} | "
                     f"{' '.join(x for x in (p.get('note'), d.get('note')) if x)} |")
    return lines


def plot(result: dict, path: Path) -> None:
    """TTFT against prompt length, one line per method, one panel per model, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.2), squeeze=False)
    for ax, entry in zip(axes[0], models):
        methods = dict.fromkeys(r["method"] for r in entry["ttft"])
        for method in methods:
            pts = [(r["length"], r["ms"]) for r in entry["ttft"] if r["method"] == method and r["ms"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(entry["name"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(result["machine"].get("gpu") or result["machine"].get("cpu", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_batch(result: dict, path: Path) -> None:
    """Prefill and decoding throughput against batch size, one line per method, one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [e for e in result["models"] if e.get("batch_ttft")]
    methods = dict.fromkeys(r["method"] for e in models for r in [*e["batch_decode"], *e["batch_ttft"]])
    color = {method: f"C{i}" for i, method in enumerate(methods)}  # one colour per method in every panel
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7.5), squeeze=False)
    for col, entry in enumerate(models):
        for row, (key, value, label) in enumerate([
            ("batch_ttft", "prefill_tokens_per_s", "prefill tokens/s"),
            ("batch_decode", "tokens_per_s", "decoding tokens/s"),
        ]):
            ax = axes[row][col]
            for method in dict.fromkeys(r["method"] for r in entry[key]):
                pts = [(r["batch"], r[value]) for r in entry[key] if r["method"] == method and r[value]]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method, color=color[method])
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
            ax.set_title(f"{entry['name']}, {entry[key][0]['length']}-token prompts")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.suptitle(result["machine"].get("gpu") or result["machine"].get("cpu", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` into out_dir; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["md"].write_text(markdown(result))
    if any(e.get("ttft") for e in result["models"]):
        plot(result, paths["png"])
    else:
        del paths["png"]
    if any(e.get("batch_ttft") for e in result["models"]):
        paths["batch_png"] = out_dir / f"{stem}-batch.png"
        plot_batch(result, paths["batch_png"])
    return paths


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
