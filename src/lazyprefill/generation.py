"""LazyLLM.generate: input checks, the step loop, sampling, stopping, streaming and TTFT."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .adapters import LlamaAdapter, adapter_for
from .engine import Engine, StepStats, StepTrace
from .schedule import Schedule, parse_schedule


@dataclass
class GenerationStats:
    """Token counts per step and layer, and each prompt token's depth: what pruning actually did."""

    steps: list[StepStats]  # steps[0] is prefill
    prefill_depth: np.ndarray  # [n_prompt] deepest layer each prompt token reached in prefill
    final_depth: np.ndarray  # [n_total] deepest layer each token reached over the whole generation
    num_layers: int
    traces: list[StepTrace] = field(default_factory=list)  # filled when LazyLLM(trace=True)

    @property
    def prefill_computed(self) -> list[int]:
        """Tokens computed per layer in prefill."""
        return self.steps[0].computed

    @property
    def revived(self) -> int:
        """Rows resumed from the Aux Cache over all decoding steps."""
        return sum(sum(s.revived) for s in self.steps[1:])

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "prefill_computed": self.prefill_computed,
            "decode_computed": [s.computed for s in self.steps[1:]],
            "decode_candidates": [s.candidates for s in self.steps[1:]],
            "decode_revived": [s.revived for s in self.steps[1:]],
            "prefill_depth": self.prefill_depth.tolist(),
        }


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [1, n_prompt + n_new] prompt then generated ids
    new_tokens: list[int]
    ttft_s: float  # input ids on the device -> first token chosen (device synchronised)
    total_s: float
    finish_reason: str  # "eos", "stop_string" or "length"
    stats: GenerationStats
    logits: list[torch.Tensor] | None = None  # per step [vocab] fp32, when return_logits=True
    text: str | None = None  # decoded new tokens, when a tokenizer was given


class LazyLLM:
    """LazyLLM on a model the user already loaded: never copies or modifies its weights.

    `schedule` is a preset name ("paper"), "dense"/None, "static"/"random" baselines, a
    "layer:ratio,..." string, a `{layer: ratio}` dict or a `Schedule`.
    """

    def __init__(
        self, model: nn.Module, schedule: str | dict | Schedule | None = "paper", tokenizer=None, trace: bool = False
    ) -> None:
        self.model = model
        self.adapter: LlamaAdapter = adapter_for(model)
        self.schedule = parse_schedule(schedule, self.adapter.num_layers)
        self.tokenizer = tokenizer
        self.trace = trace

    def generate(
        self,
        input_ids,
        max_new_tokens: int = 64,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        on_token: Callable[[int], None] | None = None,
        return_logits: bool = False,
    ) -> GenerationOutput:
        """Greedy by default; `do_sample` with temperature/top_k/top_p/seed samples.

        Stops at `max_new_tokens`, an EOS id (the model's generation config by default) or a stop
        string (needs the tokenizer). `on_token` is called with each new id as soon as it exists.
        """
        run = self._run(
            input_ids, max_new_tokens, do_sample, temperature, top_k, top_p, seed, eos_token_id, stop_strings,
            return_logits,
        )
        while True:
            try:
                token = next(run)
            except StopIteration as done:
                return done.value
            if on_token is not None:
                on_token(token)

    def stream(self, input_ids, max_new_tokens: int = 64, **kwargs) -> Generator[int, None, GenerationOutput]:
        """Yield token ids as they are generated; the generator's return value is the GenerationOutput.

        Takes `generate`'s keyword arguments except `on_token`. Stopping the iteration early stops
        generation there.
        """
        return self._run(input_ids, max_new_tokens, **kwargs)

    def _run(
        self,
        input_ids,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        return_logits: bool = False,
    ) -> Generator[int, None, GenerationOutput]:
        ids = self._check_input(input_ids, max_new_tokens)
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass LazyLLM(model, tokenizer=tok)")
        eos = self._eos_ids(eos_token_id)
        warpers = _warpers(do_sample, temperature, top_k, top_p)
        generator = None
        if do_sample:
            generator = torch.Generator(device=ids.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        engine = Engine(self.adapter, self.schedule, ids.shape[0] + max_new_tokens, trace=self.trace)

        n = ids.shape[0]
        new: list[int] = []
        all_logits: list[torch.Tensor] = []
        steps: list[StepStats] = []
        prefill_depth = np.full(n, -1, dtype=np.int32)
        finish, ttft = "length", 0.0
        with torch.inference_mode():
            synchronize(ids.device)
            start = time.perf_counter()
            if max_new_tokens > 0:
                logits, stats = engine.prefill(ids)
                token = _choose(logits, warpers, generator, ids)
                synchronize(ids.device)
                ttft = time.perf_counter() - start
                engine.settle()
                prefill_depth = engine.cache.depth[:n].copy()
                steps.append(stats)
            while max_new_tokens > 0:
                tok = int(token)
                new.append(tok)
                if return_logits:
                    all_logits.append(logits)
                yield tok
                if tok in eos:
                    finish = "eos"
                    break
                if stop_strings and self._hit_stop(new, stop_strings):
                    finish = "stop_string"
                    break
                if len(new) == max_new_tokens:
                    break
                logits, stats = engine.decode(token.view(1))
                steps.append(stats)
                token = _choose(logits, warpers, generator, ids)
            synchronize(ids.device)
            total = time.perf_counter() - start
        stats = GenerationStats(
            steps=steps,
            prefill_depth=prefill_depth,
            final_depth=engine.cache.depth[: engine.cache.length].copy(),
            num_layers=self.adapter.num_layers,
            traces=engine.traces,
        )
        sequences = torch.cat([ids, torch.tensor(new, dtype=ids.dtype, device=ids.device)])[None]
        text = self.tokenizer.decode(new, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationOutput(sequences, new, ttft, total, finish, stats, all_logits or None, text)

    # ------------------------------------------------------------ input checks
    def _check_input(self, input_ids, max_new_tokens: int) -> torch.Tensor:
        a = self.adapter
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if isinstance(input_ids, torch.Tensor):
            ids = input_ids
            if ids.dim() == 2:
                if ids.shape[0] != 1:
                    raise ValueError(
                        f"got a batch of {ids.shape[0]} sequences; batched generation is not supported yet: "
                        "call generate once per sequence"
                    )
                ids = ids[0]
            if ids.dim() != 1:
                raise ValueError(f"input_ids must be [n] or [1, n], got shape {tuple(input_ids.shape)}")
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
        else:
            seq = list(input_ids)
            if seq and isinstance(seq[0], (list, tuple, torch.Tensor, np.ndarray)):
                if len(seq) != 1:
                    raise ValueError(
                        f"got a batch of {len(seq)} sequences; batched generation is not supported yet: "
                        "call generate once per sequence"
                    )
                seq = list(seq[0])
            ids = torch.tensor(seq, dtype=torch.long)
        if ids.numel() == 0:
            raise ValueError("the prompt is empty: give at least one token id")
        ids = ids.to(device=a.device, dtype=torch.long)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= a.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {a.vocab_size - 1}]")
        total = ids.shape[0] + max_new_tokens
        if total > a.max_positions:
            raise ValueError(
                f"prompt ({ids.shape[0]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's {a.max_positions} positions: shorten the prompt or lower max_new_tokens"
            )
        if a.sliding_window is not None and total > a.sliding_window:
            raise ValueError(
                f"{total} tokens exceed this model's {a.sliding_window}-token sliding attention window, "
                "which lazyprefill does not implement yet: keep prompt + max_new_tokens within it"
            )
        return ids

    def _eos_ids(self, eos_token_id: int | Sequence[int] | None) -> set[int]:
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = self.model.config.eos_token_id
        if eos_token_id is None:
            return set()
        return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}

    def _hit_stop(self, new: list[int], stop_strings: Sequence[str]) -> bool:
        text = self.tokenizer.decode(new[-32:], skip_special_tokens=True)
        return any(s in text for s in stop_strings)


def _warpers(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    if not do_sample:
        return LogitsProcessorList()
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def _choose(
    logits: torch.Tensor, warpers: LogitsProcessorList, generator: torch.Generator | None, ids: torch.Tensor
) -> torch.Tensor:
    """logits: [vocab] -> the next token id as a 0-d tensor on the device."""
    if generator is None:
        return logits.argmax()
    scores = warpers(ids[None], logits[None])[0]
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[0]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings include it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
