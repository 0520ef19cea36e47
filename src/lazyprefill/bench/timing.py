"""How each method is timed: prefill (TTFT) and decoding steps, in interleaved rounds, per MEASURE.md."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel

from ..adapters import LlamaAdapter, adapter_for
from ..engine import DECODE_ATTENTION, Engine
from ..env import synchronize
from ..flops import ModelDims, ideal_speedup
from ..generation import GenerationOutput, LazyLLM
from ..schedule import PRESETS, Schedule, preset
from .config import DENSE, TRANSFORMERS, TRANSFORMERS_FLASH, BenchConfig

NEW_LENGTHS = 3  # lengths each method is timed at once, with `bench_ttft(new_length=True)`


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


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def bench_ttft(
    model: nn.Module, n: int, cfg: BenchConfig, progress: Callable[[str], None], batch: int = 1,
    schedules: dict[str, Schedule] | None = None, new_length: bool = False,
    timed: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """One row per method for a batch of `batch` prompts of n tokens; running out of memory is a note, not a crash.
    `schedules`: the methods beside transformers (default: dense and every preset, `schedules_for`).

    Methods are timed in rounds (each method once per round, inputs rotating between rounds), so that a
    GPU whose clocks drift during the run slows every method alike. `new_length`: also time each method once, after
    the rounds, at NEW_LENGTHS lengths a little under n that no method has met (the median), as a user's next prompts
    would be: what a kernel builds or compiles per length (SDPA's cuDNN graphs, FlexAttention, oneDNN's primitives on
    the CPU) is in it, and not in the rounds. `timed` gets the rows once the rounds are done, before those runs
    (a minute at 128K), so that a caller can write them where a lease may end first.
    """
    adapter = adapter_for(model)
    device, dims = adapter.device, ModelDims.of(model)
    inputs = [random_prompts(n, adapter.vocab_size, batch, device, cfg.seed + 1000 * i) for i in range(3)]
    methods: dict[str, tuple[Callable, Schedule | None]] = {TRANSFORMERS: (transformers_prefill(model), None)}
    for name, schedule in (schedules or schedules_for(adapter.num_layers)).items():
        methods[name] = (lazy_prefill(adapter, schedule), schedule)
    rows = {name: {"length": n, "batch": batch, "method": name, "note": "", "ms": None, "times_ms": []}
            for name in methods}
    with torch.inference_mode():
        for name, (fn, schedule) in methods.items():  # warm-ups, kept counts and peak memory
            progress(f"{n} x{batch} {name}")
            row = rows[name]
            row["computed"] = [n] * adapter.num_layers
            try:
                reset_peak_memory(device)
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
            reset_peak_memory(device)
        for i in range(cfg.repeats):  # a label each: at long prompts the rounds take longer than the warm-ups
            progress(f"{n} x{batch} round {i + 1}/{cfg.repeats}")
            for name, (fn, _) in methods.items():
                if not rows[name]["note"]:
                    rows[name]["times_ms"].append(time_once(fn, inputs[i % len(inputs)]))
        _summarize(rows, methods, n, batch, dims, device)
        if timed is not None:
            timed(list(rows.values()))
        for j, (name, (fn, _)) in enumerate(methods.items() if new_length else ()):
            lengths = [n - 1 - NEW_LENGTHS * j - r for r in range(NEW_LENGTHS)]  # no two methods share one
            if not rows[name]["note"] and min(lengths) > 0:
                progress(f"{n} x{batch} {name} at new lengths")
                rows[name]["new_length_times_ms"] = [
                    time_once(fn, random_prompts(m, adapter.vocab_size, batch, device, cfg.seed)) for m in lengths]
                rows[name]["new_length_ms"] = statistics.median(rows[name]["new_length_times_ms"])
    if new_length:  # their speedups
        _summarize(rows, methods, n, batch, dims, device)
    return list(rows.values())


def _summarize(
    rows: dict[str, dict], methods: dict[str, tuple[Callable, Schedule | None]], n: int, batch: int,
    dims: ModelDims, device: torch.device,
) -> None:
    """Each row's medians, speedups against transformers and ideal speedup, from the times taken so far."""
    base = statistics.median(rows[TRANSFORMERS]["times_ms"]) if rows[TRANSFORMERS]["times_ms"] else None
    new_base = rows[TRANSFORMERS].get("new_length_ms")
    for name, row in rows.items():
        schedule = methods[name][1]
        sparse = schedule.sparse if schedule is not None and n >= schedule.min_prompt(device.type) else None
        row["ideal"] = ideal_speedup(dims, row["computed"], sparse)
        row["ms"] = statistics.median(row["times_ms"]) if row["times_ms"] else None
        row["speedup"] = base / row["ms"] if base and row["ms"] else None
        row["efficiency"] = row["speedup"] / row["ideal"] if row["speedup"] else None
        if "new_length_ms" in row and new_base:
            row["new_length_speedup"] = new_base / row["new_length_ms"]
        row["prefill_tokens_per_s"] = batch * n * 1e3 / row["ms"] if row["ms"] else None


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
            reset_peak_memory(device)
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
        reset_peak_memory(device)
        rows.append(row)
    base = rows[0]["ms_per_token"]
    for row in rows:
        row["speedup"] = base / row["ms_per_token"] if base and row["ms_per_token"] else None
        row["tokens_per_s"] = batch * 1e3 / row["ms_per_token"] if row["ms_per_token"] else None
    return rows


def time_methods(
    methods: dict[str, LazyLLM],
    prompts: list[list[int]],
    max_new_tokens: int,
    repeats: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, list[GenerationOutput]], dict[str, list[float]]]:
    """TTFT of each method on one batch of prompts, as `lazyprefill generate` reports it.

    Every method first checks the real request (so a prompt too long for `max_new_tokens` fails before
    any prefill) and runs one untimed warm-up, since the first run at a new length pays one-off
    allocation costs. Then `repeats` rounds run each method once, interleaved so that a noisy neighbour
    slows every method alike: the first round generates `max_new_tokens` and makes the answers, later
    rounds generate one token and time TTFT only. -> (first round's outputs per method, one TTFT per
    round per method, of the whole batch); report the median.
    """
    progress = progress or (lambda _label: None)
    for llm in methods.values():
        llm.check_request(prompts, max_new_tokens)
    for name, llm in methods.items():
        progress(f"warm-up, {name}")
        llm.generate(prompts, max_new_tokens=1)
    outputs: dict[str, list[GenerationOutput]] = {}
    ttfts: dict[str, list[float]] = {name: [] for name in methods}
    for run in range(repeats):
        for name, llm in methods.items():
            progress(f"{name}, run {run + 1}/{repeats}")
            out = llm.generate(prompts, max_new_tokens=max_new_tokens if run == 0 else 1)
            outputs.setdefault(name, out)
            ttfts[name].append(out[0].ttft_s)
    return outputs, ttfts
