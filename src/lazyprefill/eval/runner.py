"""Run every method on every sample, scored against the task and against the dense model.

The dense reference of a sample (its greedy tokens and first-token logits) is computed once and kept
on disk, keyed by model, prompt and generation length, so adding methods later never recomputes it.
`dense` is a method too, its timing beside the others': the run that made the reference when it was not
cached, else a re-run whose scores must equal the cached reference's exactly (a check in every report).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapters import adapter_for
from ..flops import ModelDims, ideal_speedup
from ..generation import GenerationOutput, LazyLLM
from ..schedule import DENSE_NAMES, PRESETS, Preset, Schedule, parse_schedule
from ..scoring import Random, Static
from . import metrics
from .tasks import LIST_SEPARATOR, RULER_TASKS, Sample

# Depth-relative schedules ({fraction of depth: keep ratio}) for the speed/accuracy sweep: from one
# late mild prune to early hard pruning: 1.2x to 4.8x ideal prefill speedup on SmolLM2-135M (30
# layers) at 512 tokens, 1.2x to 4.9x at 1K. With `paper` (1.4x) they make six points.
SWEEP: tuple[dict[float, float], ...] = (
    {0.67: 0.5},
    {0.3: 0.5, 0.6: 0.5, 0.9: 0.5},
    {0.2: 0.5, 0.4: 0.5, 0.6: 0.5, 0.8: 0.5},
    {0.1: 0.3, 0.34: 0.5, 0.67: 0.5},
    {0.07: 0.2, 0.34: 0.5},
)


@dataclass(frozen=True)
class Method:
    """A way to run the model: `schedule` is what `parse_schedule` takes ("dense", "paper", "static:9:0.7").

    `family` is dense, lazy (a reselecting scorer), static or random; `scorer` is the scorer's spec, so that
    plots draw one line per scorer; `base` is the schedule whose keep counts it shares ("" for dense)."""

    name: str
    family: str
    schedule: str
    base: str
    scorer: str = ""


def sweep_schedules(num_layers: int) -> list[str]:
    """SWEEP as "layer:ratio,..." strings for a model with `num_layers` layers."""
    out = []
    for fractions in SWEEP:
        keep = {min(int(f * num_layers), num_layers - 2): r for f, r in fractions.items()}
        out.append(",".join(f"{layer}:{r:g}" for layer, r in sorted(keep.items())))
    return out


def expand_schedules(specs: Iterable[str], num_layers: int, presets: Mapping[str, Preset] = PRESETS) -> list[str]:
    """Resolve "presets" (every preset name of the model's family) and "sweep" (SWEEP) in a user's schedule list."""
    out: list[str] = []
    for spec in specs:
        names = list(presets) if spec == "presets" else sweep_schedules(num_layers) if spec == "sweep" else [spec]
        out += [name for name in names if name not in out]
    return out


def method_for(
    spec: str, num_layers: int, prunable: Sequence[int] | None = None, presets: Mapping[str, Preset] = PRESETS
) -> Method:
    """A user's schedule as a method; its family comes from its scorer (static and random are baselines)."""
    schedule = parse_schedule(spec, num_layers, prunable, presets)
    if schedule.is_dense:
        return Method("dense", "dense", "dense", "")
    scorer = schedule.scorer
    family = scorer.name if isinstance(scorer, (Static, Random)) else "lazy"
    return Method(spec, family, spec, spec, scorer.spec())


def make_methods(
    schedules: Iterable[str],
    num_layers: int,
    baselines: Iterable[str] | None = None,
    prunable: Sequence[int] | None = None,
    presets: Mapping[str, Preset] = PRESETS,
) -> list[Method]:
    """`dense`, each schedule, then static (of the same scorer) and random at the keep counts of each
    schedule in `baselines` (None: all of the reselecting ones; "presets" and "sweep" expand as in
    `schedules`). A schedule may name a baseline scorer itself: "static:paper", "random:9:0.5".
    `prunable`: the layers the model can prune at (None: all), where `presets` (its family's) are placed."""
    methods = [
        method_for(s, num_layers, prunable, presets)
        for s in expand_schedules(schedules, num_layers, presets)
        if s not in DENSE_NAMES
    ]
    lazy = [m.schedule for m in methods if m.family == "lazy"]
    with_baselines = lazy if baselines is None else expand_schedules(baselines, num_layers, presets)
    missing = [s for s in with_baselines if s not in lazy]
    if missing:
        raise ValueError(f"baseline schedule(s) {', '.join(missing)} are not among the evaluated LazyLLM schedules")
    out = [Method("dense", "dense", "dense", "")] + [m for m in methods if m.family == "lazy"]
    for family, scorer_of in (("static", lambda s: Static(of=s)), ("random", lambda s: Random())):
        for spec in with_baselines:
            schedule = parse_schedule(spec, num_layers, prunable, presets)
            baseline = replace(schedule, scorer=scorer_of(schedule.scorer))  # the same work: sparsity kept
            out.append(Method(f"{family}:{spec}", family, baseline.describe(), spec, baseline.scorer.spec()))
    out += [m for m in methods if m.family != "lazy" and m.name not in {o.name for o in out}]
    return out


# ---------------------------------------------------------------------------------------- scoring
def task_score(sample: Sample, text: str, tokens: list[int], dense_tokens: list[int]) -> float:
    """The task's own metric (RULER's families: `string_match_all` over the reference's lines); `fidelity`
    scores the fraction of greedy tokens equal to dense's."""
    if sample.task == "code":
        return metrics.code_sim_score(text, sample.reference)
    if sample.task == "recall":
        return metrics.recall_exact(text, sample.reference)
    if sample.task == "passkey":
        return metrics.passkey_correct(text, sample.reference)
    if sample.task in RULER_TASKS:
        return metrics.string_match_all(text, sample.reference.split(LIST_SEPARATOR))
    return metrics.match_length(tokens, dense_tokens) / sample.max_new_tokens


@dataclass
class Reference:
    """The dense model's answer to one sample."""

    tokens: list[int]
    text: str
    logits0: torch.Tensor  # [vocab] fp32, the first token's logits


class Runner:
    """Runs methods on samples for one loaded model and tokenizer."""

    def __init__(self, model, tokenizer, model_id: str, cache_dir: Path | None = None) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self.cache_dir = cache_dir
        self.dims = ModelDims.of(model)
        self.num_layers = self.dims.layers
        adapter = adapter_for(model)
        self.prunable, self.presets = adapter.prunable_layers(), adapter.presets
        self._lazy: dict[str, LazyLLM] = {}

    def schedule(self, spec: str) -> Schedule:
        """The schedule a method runs; pruning applies at every prompt length unless the schedule sets its own floor
        (`min=`, or its preset's, as Gemma 3's `balanced` runs dense below 8K): the eval measures the pruning itself,
        not the device's choice to skip it."""
        parsed = parse_schedule(spec, self.num_layers, self.prunable, self.presets)
        return parsed if parsed.min_prompt_tokens is not None else replace(parsed, min_prompt_tokens=0)

    def generate(self, sample: Sample, schedule: str) -> GenerationOutput:
        if schedule not in self._lazy:
            self._lazy[schedule] = LazyLLM(self.model, schedule=self.schedule(schedule), tokenizer=self.tokenizer)
        stop = ["\n"] if sample.task == "code" else None
        return self._lazy[schedule].generate(
            torch.tensor(sample.prompt_ids), max_new_tokens=sample.max_new_tokens, eos_token_id=[],
            stop_strings=stop, return_logits=True,
        )

    def reference(self, sample: Sample) -> Reference:
        """The dense answer, from the disk cache when this model has seen this prompt before."""
        return self._reference(sample)[0]

    def _reference(self, sample: Sample) -> tuple[Reference, GenerationOutput | None]:
        """The reference, and the dense run that made it when it was not cached: that run is then also the
        `dense` method's, so a long prompt's dense prefill is not paid twice."""
        path = self._cache_path(sample)
        if path is not None and path.exists():
            return Reference(**torch.load(path, weights_only=True)), None
        out = self.generate(sample, "dense")
        ref = Reference(out.new_tokens, out.text, out.logits[0].float().cpu())
        if path is not None:  # written whole, then renamed: processes sharing the cache never read half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.part")
            torch.save(vars(ref), partial)
            partial.replace(path)
        return ref, out

    def _cache_path(self, sample: Sample) -> Path | None:
        if self.cache_dir is None:
            return None
        h = hashlib.sha256(f"v2|{self.model_id}|{sample.task}|{sample.max_new_tokens}|".encode())
        h.update(torch.tensor(sample.prompt_ids, dtype=torch.int64).numpy().tobytes())
        return self.cache_dir / f"{sample.task}-{h.hexdigest()[:24]}.pt"

    def run_one(self, sample: Sample, method: Method, ref: Reference, out: GenerationOutput | None = None) -> dict:
        """One method's record on one sample; `out`: its run when already made (the fresh dense reference)."""
        out = out if out is not None else self.generate(sample, method.schedule)
        computed = out.stats.prefill_computed
        return {
            "task": sample.task, "length": sample.length, "index": sample.index, "method": method.name,
            "family": method.family, "base": method.base, "scorer": method.scorer,
            "score": task_score(sample, out.text, out.new_tokens, ref.tokens),
            "agree": metrics.first_token_agree(out.new_tokens, ref.tokens),
            "kl": metrics.kl_divergence(ref.logits0, out.logits[0]),
            "match": metrics.match_length(out.new_tokens, ref.tokens),
            "ttft_s": out.ttft_s,
            "ideal_speedup": ideal_speedup(self.dims, computed, self._lazy[method.schedule].schedule.sparse),
            "prefill_computed": computed,
            "prediction": out.text,
            "reference": sample.reference if sample.task != "fidelity" else ref.text,
        }

    def run(self, samples: list[Sample], methods: list[Method], progress: bool = True,
            on_record: Callable[[dict], None] | None = None) -> list[dict]:
        """Every method on every sample, methods interleaved per sample so machine load hits all alike."""
        records: list[dict] = []
        bar = tqdm(total=len(samples) * len(methods), desc="eval", unit="run", disable=not progress, smoothing=0.05)
        for sample in samples:
            bar.set_postfix_str(f"{sample.task} #{sample.index} reference")
            ref, fresh = self._reference(sample)
            for method in methods:
                bar.set_postfix_str(f"{sample.task} #{sample.index} {method.name}")
                record = self.run_one(sample, method, ref, fresh if method.family == "dense" else None)
                record["reference_score"] = task_score(sample, ref.text, ref.tokens, ref.tokens)
                records.append(record)
                if on_record is not None:
                    on_record(record)
                bar.update()
        bar.close()
        return records
