"""Whole answers: time to the first token, steady decoding and the total for N new tokens (MEASURE.md).

For one model, prompt length and batch size, every method runs in one process, side by side:
transformers `generate` (SDPA, its default dynamic cache), transformers `generate` with
`cache_implementation="static"` (on a GPU `generate` then compiles its decoding forward with
`torch.compile(mode="reduce-overhead")`, i.e. CUDA graphs), the engine's dense path and every schedule preset.
Each method first runs once on a batch of the same shape (compilation, graph capture, allocator warm-up), then
once for `max(new_tokens)` greedy tokens with EOS off; a host timestamp is taken after each token once the device
has finished it, so the totals for fewer tokens come from the same run. With several `rounds` the methods take
turns (dense, balanced, ..., dense, balanced, ...), each round a warm-up and a timed run again, and a row reports
the medians over rounds: a machine whose speed drifts by a few percent within a run (an H100 did, by 6%) then
slows every method alike, and `ms_per_token_vs_dense`, the median of each round's ratio to dense's step, resolves
differences that one run per method cannot. Beside the decoding time stands the
**bandwidth floor** of a step: the bytes it must read (every weight once, plus the K/V each layer attends to)
divided by the device-to-device copy bandwidth measured in the same run.

Legend: `L` layers, `B` batch, `n` prompt tokens, `N` new tokens, `Hkv` K/V heads, `dh` head size.
"""

from __future__ import annotations

import gc
import itertools
import json
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .adapters import adapter_for
from .bench import (
    DENSE,
    DTYPES,
    SHAPES,
    TRANSFORMERS,
    ModelDims,
    load_bench_model,
    machine_info,
    random_prompts,
    time_once,
)
from .engine import DecodeOptions
from .generation import GenerationStats, LazyLLM, synchronize
from .models import load_tokenizer
from .schedule import PRESETS, parse_schedule

STATIC = "transformers-static"
# Methods other than the named ones are schedule specs, checked when the config is built against the depth of
# MEASURE.md's shapes; one that does not fit a model's layers fails when that model's case runs.
SPEC_CHECK_LAYERS = 32


def method_names(extra: Sequence[str] = ()) -> list[str]:
    """Every method in the order they run: transformers eager, ours (the presets, then `extra` schedule specs such
    as "revive(rows=8):balanced"), then the compiled one (its CUDA graph pools and compile caches are dropped after
    it, so it cannot hold memory that the others need)."""
    ours = [DENSE, *PRESETS, *(m for m in extra if m not in (TRANSFORMERS, DENSE, *PRESETS, STATIC))]
    return [TRANSFORMERS, *ours, STATIC]


def method_label(method: str, decode: DecodeOptions) -> str:
    """A row's name: ours carry the DecodeOptions that differ from the defaults and apply to them (dense never
    revives), so that merged chunks keep both rows and never two of the same."""
    inert = {"burst_kernel"} if method == DENSE else set()
    changed = [f"{f.name}={getattr(decode, f.name)}" for f in fields(decode)
               if getattr(decode, f.name) != f.default and f.name not in inert]
    return method if method in (TRANSFORMERS, STATIC) or not changed else f"{method} ({', '.join(changed)})"


@dataclass
class AnswerConfig:
    """One benchmark run: every (model, length, batch size) case, each with every selected method."""

    models: list[str]
    lengths: list[int] = field(default_factory=lambda: [8192, 32768])
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    new_tokens: list[int] = field(default_factory=lambda: [128, 512])
    methods: list[str] | None = None  # None: every named method; others are schedule specs (parse_schedule)
    device: str = "cuda"
    dtype: str = "bfloat16"
    seed: int = 0
    warmup_tokens: int = 16  # new tokens of the warm-up run (enough for compilation and CUDA graph capture)
    steady_skip: int = 8  # decoding steps left out of the steady state (allocator, graph replay warm-up)
    copy_mb: int = 1024  # size of the copy that measures bandwidth
    memory_limit_gb: float | None = None  # fit check against this instead of the device's free memory
    decode: DecodeOptions = field(default_factory=DecodeOptions)  # how our decoding steps run
    rounds: int = 1  # timed runs per method, the methods taking turns; transformers-static runs once (it compiles)
    tp: int = 1  # tensor-parallel ranks (the torchrun job's size): bytes, floors and memory are one rank's
    # None: random token ids. A task of lazyprefill.eval (e.g. "recall"): its samples, a document and a question,
    # for real models only, so that what prefill keeps and decoding revives is a trained model's on real text.
    task: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp={self.tp!r}: the number of tensor-parallel ranks must be an int >= 1")
        if not self.models or not self.lengths or not self.batch_sizes or not self.new_tokens:
            raise ValueError("give at least one model, prompt length, batch size and new-token count")
        if min(self.lengths) < 2 or min(self.batch_sizes) < 1:
            raise ValueError(
                f"prompt lengths must be >= 2 and batch sizes >= 1, got {self.lengths}, {self.batch_sizes}"
            )
        if min(self.new_tokens) < 1 or max(self.new_tokens) < self.steady_skip + 3:
            raise ValueError(f"new tokens {self.new_tokens}: the longest run needs at least steady_skip + 3 = "
                             f"{self.steady_skip + 3} tokens so that a steady state exists; lower steady_skip")
        if not 1 <= self.warmup_tokens <= max(self.new_tokens) or self.steady_skip < 0 or self.copy_mb < 1:
            raise ValueError("1 <= warmup_tokens <= max(new_tokens), steady_skip >= 0 and copy_mb >= 1 are required")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds={self.rounds!r}: give an int >= 1 (timed runs per method)")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.task is not None:
            from .eval.tasks import TASKS

            if self.task not in TASKS:
                raise ValueError(f"unknown task {self.task!r}; tasks: {', '.join(TASKS)}")
            shapes = [m for m in self.models if m in SHAPES]
            if shapes:
                raise ValueError(f"{', '.join(shapes)}: random-weight shapes have no tokenizer to build {self.task!r} "
                                 "prompts with; give real models (smollm2, gemma3-270m or a path) or no task")
            if min(self.lengths) < 128:
                raise ValueError(f"a task's prompts need at least 128 tokens, got lengths {self.lengths}")
        for method in set(self.methods or []) - set(method_names()):
            try:
                parse_schedule(method, SPEC_CHECK_LAYERS)
            except ValueError as err:
                raise ValueError(f"method {method!r} is neither one of {', '.join(method_names())} nor a schedule "
                                 f"spec: {err}") from None

    @property
    def selected(self) -> list[str]:
        return [m for m in method_names(self.methods or ()) if self.methods is None or m in self.methods]

    def runs_per_case(self) -> int:
        """Timed runs of one (model, length, batch) case: every method once, all but the static cache again."""
        return len(self.selected) + (self.rounds - 1) * len([m for m in self.selected if m != STATIC])


# ------------------------------------------------------------------------------- bytes and memory
def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter this rank holds (its shard of a split one), tied ones (embedding = LM head) counted
    once: what a decoding step reads."""
    local = (p.to_local() if isinstance(p, DTensor) else p for p in model.parameters())
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in local}
    return sum(unique.values())


def kv_bytes_per_key(dims: ModelDims, dtype_bytes: int) -> int:
    """One token's K and V at one layer: 2 x Hkv x dh values."""
    return 2 * dims.kv_heads * dims.head_dim * dtype_bytes


def dense_keys(dims: ModelDims, n: int, batch: int, step: int) -> int:
    """(token, layer) K/V pairs a dense decoding step reads: step k (k >= 1) attends over n + k positions."""
    return batch * dims.layers * (n + step)


def memory_need(dims: ModelDims, weights: int, dtype_bytes: int, method: str, n: int, batch: int, new: int) -> int:
    """Bytes a method needs, estimated before allocating: weights, the K/V cache of B x (n + N) positions (plus
    the Aux Cache, one hidden state per position, for ours) and one layer's prefill activations (the MLP's two
    [B*n, ffn] tensors and two [B*n, d] hidden states). What this misses shows up as "out of memory"."""
    positions = batch * (n + new)
    cache = positions * dims.layers * kv_bytes_per_key(dims, dtype_bytes)
    if method not in (TRANSFORMERS, STATIC):
        cache += positions * dims.hidden * dtype_bytes
    working = batch * n * (2 * dims.ffn + 2 * dims.hidden) * dtype_bytes
    return weights + cache + working


def free_bytes(device: torch.device, weights: int, limit_gb: float | None) -> int | None:
    """Memory available beside the loaded weights: the given limit, the GPU's free memory, or None (unchecked)."""
    if limit_gb is not None:
        return int(limit_gb * 2**30) - weights
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> float:
    """Bytes per second of a device-to-device copy, read plus written (median of `repeats`)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = statistics.median(time_once(lambda x: x[1].copy_(x[0]), [src, dst]) for _ in range(repeats))
    del src, dst
    return 2 * nbytes / (ms / 1e3)


# ------------------------------------------------------------------------------------- timing
class TokenClock:
    """Host timestamps of each new token, taken once the device has finished it.

    A `generate` streamer (`put` first receives the prompt, which is skipped) and an `on_token(i, token)`
    callback for a batch of ours (sequence 0 stamps the step: with EOS off every sequence runs every step).
    """

    def __init__(self, device: torch.device, skip_first: bool) -> None:
        self.device = device
        self.skip = skip_first
        self.t0 = 0.0
        self.stamps: list[float] = []  # seconds since start(), one per new token

    def start(self) -> None:
        synchronize(self.device)
        self.t0 = time.perf_counter()

    def put(self, _value) -> None:
        if self.skip:
            self.skip = False
            return
        synchronize(self.device)
        self.stamps.append(time.perf_counter() - self.t0)

    def token(self, i: int, _token: int) -> None:
        if i == 0:
            self.put(None)

    def end(self) -> None:
        pass


Runner = Callable[[list[torch.Tensor], TokenClock, int | None], list[GenerationStats] | None]


def runner(method: str, model: nn.Module, new: int, decode: DecodeOptions = DecodeOptions()) -> Runner:
    """run(prompts, clock, stop) -> per-sequence generation stats (ours) or None: greedy, EOS off, a generation of `new`
    tokens, or a warm-up ended after `stop` tokens that allocates what the full run does (the same static cache
    size, the same engine capacity), so that what is compiled or captured in the warm-up serves the timed run.
    Ours decode as `decode` says.

    transformers gets a [B, n] tensor with its all-ones mask; `min_new_tokens` keeps EOS from ending it early.
    """
    if method in (TRANSFORMERS, STATIC):

        def run_transformers(prompts: list[torch.Tensor], clock: TokenClock, stop: int | None) -> None:
            ids = torch.stack(prompts)  # [B, n]
            count = stop or new
            extra = {"cache_implementation": "static", "max_cache_len": ids.shape[1] + new} if method == STATIC else {}
            clock.start()
            model.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, do_sample=False, pad_token_id=0,
                           min_new_tokens=count, max_new_tokens=count, **extra)

        return run_transformers
    num_layers = adapter_for(model).num_layers
    lazy = LazyLLM(model, parse_schedule(method, num_layers), decode=decode)

    def run_ours(prompts: list[torch.Tensor], clock: TokenClock, stop: int | None) -> list[GenerationStats] | None:
        clock.start()
        if stop is None:
            outs = lazy.generate(list(prompts), max_new_tokens=new, eos_token_id=[], on_token=clock.token)
            return [out.stats for out in outs]
        steps = lazy.stream(list(prompts), max_new_tokens=new, eos_token_id=[])  # yields (sequence, token)
        for item in steps:
            clock.token(*item)
            if len(clock.stamps) == stop and item[0] == len(prompts) - 1:
                steps.close()  # stopping the iteration stops generation
        return None

    return run_ours


@dataclass
class Case:
    """What every method of one (model, n, B) case shares: sizes, prompts and the measured copy bandwidth."""

    model: nn.Module
    dims: ModelDims
    weights: int  # bytes
    dtype_bytes: int
    n: int
    batch: int
    new: int  # N, the longest run
    bandwidth: float  # bytes/s
    prompts: list[torch.Tensor]  # B x [n]
    warm: list[torch.Tensor]  # B x [n], other ids of the same shape


def summarize(case: Case, stamps: list[float], stats: list[GenerationStats] | None, cfg: AnswerConfig) -> dict:
    """Timestamps (s since the call, one per token) and our generation stats -> the row's figures. The worst
    step after the first is reported beside the steady one: a step that revives many rows is slower."""
    N, kv = case.new, kv_bytes_per_key(case.dims, case.dtype_bytes)
    if len(stamps) != N:
        raise RuntimeError(f"expected {N} token timestamps, got {len(stamps)}")
    step_ms = [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]  # step_ms[k - 1]: decoding step k
    steady = range(cfg.steady_skip + 1, N)  # decoding steps counted as steady state

    def floor_ms(keys_of_step: Callable[[int], int]) -> tuple[float, float]:
        mean_bytes = statistics.fmean(case.weights + keys_of_step(k) * kv for k in steady)
        return mean_bytes, mean_bytes / case.bandwidth * 1e3

    dense_bytes, dense_floor = floor_ms(lambda k: dense_keys(case.dims, case.n, case.batch, k))
    ms = statistics.median(step_ms[k - 1] for k in steady)
    row = {
        "ttft_ms": stamps[0] * 1e3,
        "ms_per_token": ms,
        "tokens_per_s": case.batch * 1e3 / ms,
        "totals_ms": {str(t): stamps[t - 1] * 1e3 for t in cfg.new_tokens},
        "step_ms": [round(x, 3) for x in step_ms],
        "worst_step_ms": max(step_ms[1:], default=None),  # decoding steps after the first
        "worst_step_x_steady": max(step_ms[1:], default=ms) / ms,
        "bytes_per_step_dense": dense_bytes,
        "floor_ms_dense": dense_floor,
        "x_floor_dense": ms / dense_floor,
    }
    if stats is not None:  # ours: what the K/V reads and revivals were, from the engine's own counts
        steps = [s.steps for s in stats]
        cand_bytes, cand_floor = floor_ms(lambda k: sum(sum(seq[k].candidates) for seq in steps))
        revived = [[sum(seq[k].revived) for k in range(1, N)] for seq in steps]  # [B][N - 1]
        row.update(
            bytes_per_step_candidates=cand_bytes, floor_ms_candidates=cand_floor, x_floor_candidates=ms / cand_floor,
            revived_per_step=[sum(col) for col in zip(*revived)],  # the batch's rows per decoding step
            revived_mean=statistics.fmean(x for seq in revived for x in seq),  # per sequence and step
            revived_max=max(x for seq in revived for x in seq),
            graphs_captured=stats[0].graphs_captured,  # 0: every decoding shape was captured by the warm-up call
        )
    return row


def revivals(stats: GenerationStats, n_prompt: int) -> dict:
    """What decoding revived for one sequence: rows per decoding step (summed over layers), and how many prompt
    tokens prefill deferred (stopped before the last layer) and how many of them a later step took deeper
    (depth only grows, and only a revival makes a prompt token's depth grow)."""
    deferred = stats.prefill_depth < stats.num_layers - 1  # [n_prompt]
    deeper = stats.final_depth[:n_prompt] > stats.prefill_depth  # [n_prompt]
    return {
        "revived_per_step": [sum(s.revived) for s in stats.steps[1:]],
        "prompt_tokens": n_prompt,
        "prompt_deferred": int(deferred.sum()),
        "prompt_revived": int(deeper.sum()),
    }


def measure(case: Case, method: str, cfg: AnswerConfig) -> dict:
    """Warm up on a batch of the same shape, then time one run of N tokens."""
    device = case.prompts[0].device
    run = runner(method, case.model, case.new, cfg.decode)
    compiled = method == STATIC
    if compiled:
        torch._dynamo.reset()  # compile this case's shapes afresh, as a new process would
        vars(case.model).pop("_previous_max_cache_length", None)  # else generate keeps an earlier case's cache size
    graphs = _unique_graphs()
    warm = TokenClock(device, skip_first=method in (TRANSFORMERS, STATIC))
    run(case.warm, warm, cfg.warmup_tokens)
    graphs_after_warmup = _unique_graphs()
    _reset_peak(device)
    clock = TokenClock(device, skip_first=method in (TRANSFORMERS, STATIC))
    steps = run(case.prompts, clock, None)
    row = summarize(case, clock.stamps, steps, cfg)
    row["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row["warmup_s"] = warm.stamps[-1]
    if compiled:
        k = cfg.warmup_tokens - 1  # the same work to the warm-up's last token, minus compilation and capture
        row["compile_s"] = warm.stamps[k] - clock.stamps[k]
        row["graphs_compiled"] = graphs_after_warmup - graphs
        row["graphs_compiled_in_timed_run"] = _unique_graphs() - graphs_after_warmup
        row["note"] = (f"compiled {row['graphs_compiled']} graphs, {row['compile_s']:.0f} s" if row["graphs_compiled"]
                       else "generate did not compile")  # it compiles on CUDA only
        torch._dynamo.reset()  # drop CUDA graph pools before the next case
    return row


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


ROUND_FIGURES = ("ttft_ms", "ms_per_token", "totals_ms")


def add_round(row: dict, timed: dict) -> None:
    """Record another round's figures in `row` (its first round's figures are the row's own) and make the row's
    TTFT, ms/token and totals the medians over its rounds. step_ms and the other details stay the first round's."""
    rounds = row.setdefault("rounds", [{k: row[k] for k in ROUND_FIGURES}])
    rounds.append({k: timed[k] for k in ROUND_FIGURES})
    row["ttft_ms"] = statistics.median(r["ttft_ms"] for r in rounds)
    row["ms_per_token"] = statistics.median(r["ms_per_token"] for r in rounds)
    row["totals_ms"] = {t: statistics.median(r["totals_ms"][t] for r in rounds) for t in row["totals_ms"]}
    row["tokens_per_s"] = timed["tokens_per_s"] * timed["ms_per_token"] / row["ms_per_token"]  # B * 1e3 / ms


def compare_to_dense(rows: list[dict], methods: Sequence[str]) -> None:
    """Each measured row's `ms_per_token_vs_dense`: the median over rounds of its step time over dense's in the same
    round (a method timed once, as the static cache, pairs with dense's first round; no ratios without dense).
    `methods[i]` is what rows[i] runs: a row's label also names the decode options that differ from the defaults."""
    dense = next((r for r, m in zip(rows, methods) if m == DENSE and r["status"] == "ok"), None)
    if dense is None:
        return
    base = [r["ms_per_token"] for r in dense.get("rounds", [dense])]
    for row in rows:
        if row["status"] == "ok":
            ours = [r["ms_per_token"] for r in row.get("rounds", [row])]
            row["ms_per_token_vs_dense"] = statistics.median(a / b for a, b in zip(ours, base))


def case_prompts(cfg: AnswerConfig, n: int, batch: int, vocab: int, device: torch.device, tokenizer=None
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The timed batch and the warm-up's, B x [n] ids each: random ids, or the first 2B samples of `cfg.task`
    (every task's prompt is exactly n tokens)."""
    if cfg.task is None:
        return (random_prompts(n, vocab, batch, device, cfg.seed),
                random_prompts(n, vocab, batch, device, cfg.seed + 1))
    from .eval.tasks import build

    ids = [torch.tensor(s.prompt_ids, device=device) for s in build(cfg.task, tokenizer, n, 2 * batch, cfg.seed)]
    return ids[:batch], ids[batch:]


def measure_case(
    model: nn.Module, n: int, batch: int, cfg: AnswerConfig,
    progress: Callable[[str], None], on_row: Callable[[dict], None], tokenizer=None,
) -> dict:
    """Every selected method on B prompts of n tokens (case_prompts), in `cfg.rounds` rounds. A method that cannot
    fit is recorded, not run; one that runs out of memory anyway, or fails otherwise, is recorded with its error, and
    the next goes on (and is not run in later rounds)."""
    adapter = adapter_for(model)
    device, dims = adapter.device, ModelDims.of(model)
    case = Case(
        model, dims, weight_bytes(model), adapter.dtype.itemsize, n, batch, max(cfg.new_tokens),
        copy_bandwidth(device, cfg.copy_mb * 2**20),
        *case_prompts(cfg, n, batch, adapter.vocab_size, device, tokenizer),
    )
    result = {"length": n, "batch": batch, "new_tokens": case.new, "copy_gb_per_s": case.bandwidth / 1e9,
              "weight_bytes": case.weights, "kv_bytes_per_key": kv_bytes_per_key(dims, case.dtype_bytes), "rows": []}
    for method in cfg.selected:
        progress(f"{n} x{batch} {method}" + (f" round 1/{cfg.rounds}" if cfg.rounds > 1 else ""))
        need = memory_need(dims, case.weights, case.dtype_bytes, method, n, batch, case.new)
        _reset_peak(device)
        free = free_bytes(device, case.weights, cfg.memory_limit_gb)
        row = {"method": method_label(method, cfg.decode), "status": "ok", "note": "", "need_gb": need / 2**30,
               "free_gb": None if free is None else free / 2**30}
        if free is not None and need - case.weights > free:
            row["status"] = "does not fit"
        else:
            try:
                row.update(measure(case, method, cfg))
            except Exception as err:
                row["status"] = "out of memory" if _is_oom(err) else "error"
                row["note"] = f"{type(err).__name__}: {str(err).strip()[:300]}"
                traceback.print_exc()
                if method == STATIC:
                    torch._dynamo.reset()
        _reset_peak(device)
        result["rows"].append(row)
        compare_to_dense(result["rows"], cfg.selected)
        on_row(result)
    for r in range(1, cfg.rounds):
        for row, method in zip(result["rows"], cfg.selected):
            if method == STATIC or row["status"] != "ok":
                continue
            progress(f"{n} x{batch} {method} round {r + 1}/{cfg.rounds}")
            add_round(row, measure(case, method, cfg))
            _reset_peak(device)
            compare_to_dense(result["rows"], cfg.selected)
            on_row(result)
    return result


# ------------------------------------------------------------------------------------ run + report
def run(cfg: AnswerConfig, progress: Callable[[str], None] | None = None,
        checkpoint: Callable[[dict], None] | None = None, command: str | None = None) -> dict:
    """Measure every case of `cfg`; `checkpoint(result)` sees the partial result after every method, so a
    run killed by a time limit still leaves what it measured. `command` (default: this process's argv) is
    recorded with the result."""
    progress = progress or (lambda _label: None)
    checkpoint = checkpoint or (lambda _result: None)
    device = torch.device(cfg.device)
    result: dict = {"kind": "answers", "machine": machine_info(device), "command": command or shlex.join(sys.argv),
                    "config": asdict(cfg), "models": {}, "cases": []}
    for name in cfg.models:
        model = load_bench_model(name, cfg.device, DTYPES[cfg.dtype], cfg.seed, cfg.tp)
        tokenizer = None if cfg.task is None else load_tokenizer(name)
        dims = ModelDims.of(model)
        result["models"][name] = {
            "random_weights": name in SHAPES, "dims": asdict(dims),
            "dtype": str(adapter_for(model).dtype).removeprefix("torch."),
            "schedules": {m: parse_schedule(m, dims.layers).to_dict()
                          for m in cfg.selected if m not in (TRANSFORMERS, DENSE, STATIC)},
        }
        for n in cfg.lengths:
            for batch in cfg.batch_sizes:
                case: dict = {"model": name}

                def on_row(partial: dict, case: dict = case) -> None:
                    if "rows" not in case:  # its first method is done: the case enters the result
                        result["cases"].append(case)
                    case.update(partial)
                    checkpoint(result)

                measure_case(model, n, batch, cfg, progress, on_row, tokenizer)
        del model
        _reset_peak(device)
    return result


def merge(results: list[dict]) -> dict:
    """One result from chunks: cases of the same (model, length, batch) are joined, methods in their run order
    (a method measured twice keeps the later chunk's row). Each chunk's machine and command stay in `runs`."""
    order = {m: i for i, m in enumerate(method_names([r["method"] for c in results for case in c["cases"]
                                                      for r in case["rows"]]))}
    merged: dict = {"kind": "answers", "machine": results[0]["machine"], "models": {}, "cases": [],
                    "runs": [{"machine": r["machine"], "command": r["command"], "config": r["config"]}
                             for r in results]}
    by_key: dict[tuple, dict] = {}
    for res in results:
        merged["models"].update(res["models"])
        for case in res["cases"]:
            key = (case["model"], case["length"], case["batch"])
            if key not in by_key:
                by_key[key] = json.loads(json.dumps(case))
                merged["cases"].append(by_key[key])
                continue
            rows = {r["method"]: r for r in by_key[key]["rows"]} | {r["method"]: r for r in case["rows"]}
            by_key[key]["rows"] = sorted(rows.values(), key=lambda r: order.get(r["method"], len(order)))
    models = list(merged["models"])
    merged["cases"].sort(key=lambda c: (models.index(c["model"]), c["length"], c["batch"]))
    return merged


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown(result: dict) -> str:
    """One table per model: each case's methods with TTFT, steady decoding beside its floor, totals, revivals."""
    m = result["machine"]
    counts = sorted({int(t) for c in result["cases"] for r in c["rows"] for t in r.get("totals_ms", {})})
    lines = [(f"Machine: {m.get('gpu') or m.get('cpu', 'CPU')}; torch {m['torch']}, transformers {m['transformers']}. "
              "Greedy, EOS off; floor = bytes a decoding step must read / copy bandwidth measured in the same run "
              "(dense: every cached token; S_l: only the candidates the engine attended to). With several rounds "
              "(a row's `rounds`) the methods took turns, TTFT, ms/token and totals are medians over rounds, and "
              "'step vs dense' is the median of each round's ratio to dense's ms/token."), ""]
    for name, info in result["models"].items():
        weights = f"random {info['dtype']} weights" if info["random_weights"] else info["dtype"]
        task = result.get("config", {}).get("task")
        prompts = f"`{task}` prompts" if task else "random prompts"
        lines += [f"### {name} ({weights}, {prompts}): whole answers", "",
                  "| prompt | batch | method | TTFT ms | ms/token | step vs dense | floor ms dense / S_l | x floor | "
                  "worst step ms | "
                  + " | ".join(f"total {t} s" for t in counts) + " | revived/step mean (max) | peak GB | note |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(counts) + "---:|---:|---|"]
        for case in (c for c in result["cases"] if c["model"] == name):
            for r in case["rows"]:
                floors = f"{_fmt(r.get('floor_ms_dense'), '.2f')} / {_fmt(r.get('floor_ms_candidates'), '.2f')}"
                totals = " | ".join(_fmt(_seconds(r, t), ".2f") for t in counts)
                revived = (f"{r['revived_mean']:.1f} ({r['revived_max']})" if "revived_mean" in r else "—")
                note = " ".join(x for x in (r["status"] if r["status"] != "ok" else "", r["note"][:80]) if x)
                ttft, per_token = _fmt(r.get("ttft_ms"), ".0f"), _fmt(r.get("ms_per_token"), ".2f")
                worst = _fmt(r.get("worst_step_ms"), ".0f")
                lines.append(
                    f"| {case['length']} | {case['batch']} | {r['method']} | {ttft} | {per_token} | "
                    f"{_fmt(r.get('ms_per_token_vs_dense'), '.3f')} | {floors} | "
                    f"{_fmt(r.get('x_floor_dense'), '.1f')} | {worst} | {totals} | {revived} | "
                    f"{_fmt(r.get('peak_gb'), '.1f')} | {note} |"
                )
        bw = [f"{c['length']} x{c['batch']}: {c['copy_gb_per_s']:.0f} GB/s"
              for c in result["cases"] if c["model"] == name]
        lines += ["", "Copy bandwidth (read + written): " + ", ".join(bw) + ".", ""]
    return "\n".join(lines)


def _seconds(row: dict, tokens: int) -> float | None:
    ms = row.get("totals_ms", {}).get(str(tokens))
    return None if ms is None else ms / 1e3


def plot(result: dict, path: Path) -> None:
    """Per model (one row): totals for each new-token count per method and case (left), and steady ms/token
    per method beside the dense floor (black tick) and the S_l floor (red tick) (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    methods = list(dict.fromkeys(r["method"] for c in result["cases"] for r in c["rows"]))
    counts = sorted({int(t) for c in result["cases"] for r in c["rows"] for t in r.get("totals_ms", {})}, reverse=True)
    width = 0.8 / max(len(methods), 1)
    fig, axes = plt.subplots(len(names), 2, figsize=(15, 4.6 * len(names)), squeeze=False)
    for (left, right), name in zip(axes, names):
        cases = [c for c in result["cases"] if c["model"] == name]
        for i, method in enumerate(methods):
            rows = [next((r for r in c["rows"] if r["method"] == method), {}) for c in cases]
            x = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cases))]
            for shade, t in enumerate(counts):  # longest first, shorter totals drawn over them, darker
                left.bar(x, [_seconds(r, t) or 0 for r in rows], width, color=f"C{i}", alpha=0.35 + 0.65 * shade /
                         max(len(counts) - 1, 1), label=method if shade == len(counts) - 1 else None)
            right.bar(x, [r.get("ms_per_token") or 0 for r in rows], width, color=f"C{i}", label=method)
            for xi, r in zip(x, rows):
                for key, colour in (("floor_ms_dense", "black"), ("floor_ms_candidates", "red")):
                    if r.get(key):
                        right.hlines(r[key], xi - width / 2, xi + width / 2, colors=colour, linewidth=2)
        labels = [f"{c['length'] // 1024}K x{c['batch']}" if c["length"] >= 1024 else f"{c['length']} x{c['batch']}"
                  for c in cases]
        for ax, ylabel in ((left, f"total s for {' / '.join(map(str, counts))} tokens (light / dark)"),
                           (right, "steady ms/token (tick: floor dense black, S_l red)")):
            ax.set_xticks(range(len(cases)), labels)
            ax.set_yscale("log")
            ax.set_ylabel(ylabel)
            ax.set_title(name)
            ax.grid(True, axis="y", which="both", alpha=0.3)
        left.legend(fontsize=8)
    fig.suptitle(result["machine"].get("gpu") or result["machine"].get("cpu", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: dict, out_dir: Path, stem: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)  # a run killed mid-write leaves the previous checkpoint whole
    return path


def write(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write `<stem>.json`, `<stem>.md` and `<stem>.png` into out_dir; returns their paths."""
    paths = {"json": write_json(result, out_dir, stem), "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    paths["md"].write_text(markdown(result))
    plot(result, paths["png"])
    return paths
