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
    """One sequence's result. In a batch `ttft_s` is the whole batch's, and `total_s` ends when this one stopped."""

    sequences: torch.Tensor  # [1, n_prompt + n_new] prompt (padding removed) then generated ids
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
        self.schedule = parse_schedule(schedule, self.adapter.num_layers, prunable=self.adapter.prunable_layers())
        self.tokenizer = tokenizer
        self.trace = trace

    def generate(
        self, input_ids, max_new_tokens: int = 64, *, on_token: Callable[..., None] | None = None, **options
    ) -> GenerationOutput | list[GenerationOutput]:
        """Generate to the end: greedy by default, or sampled with `do_sample=True`.

        One prompt (a list of ids or an [n] tensor) gives one GenerationOutput. A batch gives a list
        of them, in order: a list of id lists of any lengths, or a [B, n] tensor padded on either
        side with its `attention_mask`. `options` are `stream`'s keyword arguments (sampling,
        stopping, `return_logits`). `on_token(token)` is called with each new id as soon as it
        exists; `on_token(i, token)` for a batch.
        """
        run = self.stream(input_ids, max_new_tokens, **options)
        while True:
            try:
                item = next(run)
            except StopIteration as done:
                return done.value
            if on_token is not None and isinstance(item, tuple):
                on_token(*item)
            elif on_token is not None:
                on_token(item)

    def stream(
        self,
        input_ids,
        max_new_tokens: int = 64,
        *,
        attention_mask=None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        return_logits: bool = False,
    ) -> Generator[int | tuple[int, int], None, GenerationOutput | list[GenerationOutput]]:
        """Yield token ids as they are generated ((i, token) pairs for a batch); returns `generate`'s result.

        `attention_mask` (1: token, 0: padding) goes with a padded [B, n] tensor. Every sequence is
        pruned, sampled and stopped on its own, and gets what it would get alone: sequence i samples
        with `seed + i` and, under the `random` baseline, draws with the schedule's seed + i.
        Generation stops at `max_new_tokens`, an EOS id (the model's generation config by default) or
        a stop string (needs the tokenizer). Stopping the iteration early stops generation there.
        """
        prompts, batched = self._check_input(input_ids, attention_mask, max_new_tokens)
        if stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass LazyLLM(model, tokenizer=tok)")
        eos = self._eos_ids(eos_token_id)
        warpers = _warpers(do_sample, temperature, top_k, top_p)
        device, B = self.adapter.device, len(prompts)
        generators = None
        if do_sample:
            base = seed if seed is not None else torch.seed()
            generators = [torch.Generator(device=device).manual_seed(base + b) for b in range(B)]
        capacity = max(p.shape[0] for p in prompts) + max_new_tokens
        engine = Engine(self.adapter, self.schedule, capacity, trace=self.trace)

        new: list[list[int]] = [[] for _ in range(B)]
        all_logits: list[list[torch.Tensor]] = [[] for _ in range(B)]
        steps: list[list[StepStats]] = [[] for _ in range(B)]
        prefill_depth = [np.full(p.shape[0], -1, dtype=np.int32) for p in prompts]
        finish, total = ["length"] * B, [0.0] * B
        active = list(range(B)) if max_new_tokens > 0 else []
        ttft = 0.0
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            if active:
                logits, stats = engine.prefill(prompts)  # logits: [B, vocab]
                tokens = _choose(logits, warpers, generators)
                chosen = tokens.tolist()
                synchronize(device)
                ttft = time.perf_counter() - start
                engine.settle()
                for b, s in enumerate(stats):
                    prefill_depth[b] = engine.cache.depth[b, : prompts[b].shape[0]].copy()
                    steps[b].append(s)
            while active:
                going = []
                for i, b in enumerate(active):
                    new[b].append(chosen[i])
                    if return_logits:
                        all_logits[b].append(logits[i])
                    yield (b, chosen[i]) if batched else chosen[i]
                    reason = self._stop_reason(new[b], eos, stop_strings, max_new_tokens)
                    if reason is None:
                        going.append(i)
                        continue
                    finish[b], total[b] = reason, time.perf_counter() - start
                if not going:
                    break
                active = [active[i] for i in going]
                logits, stats = engine.decode(tokens[going], active)
                for b, s in zip(active, stats):
                    steps[b].append(s)
                tokens = _choose(logits, warpers, None if generators is None else [generators[b] for b in active])
                chosen = tokens.tolist()
            synchronize(device)
            end = time.perf_counter() - start
        outputs = []
        for b, prompt in enumerate(prompts):
            depth = engine.cache.depth[b, : engine.cache.length[b]].copy() if engine.cache else np.empty(0, np.int32)
            stats = GenerationStats(
                steps=steps[b], prefill_depth=prefill_depth[b], final_depth=depth,
                num_layers=self.adapter.num_layers, traces=engine.traces[b] if engine.traces else [],
            )
            sequences = torch.cat([prompt, torch.tensor(new[b], dtype=prompt.dtype, device=device)])[None]
            text = self.tokenizer.decode(new[b], skip_special_tokens=True) if self.tokenizer is not None else None
            outputs.append(GenerationOutput(
                sequences, new[b], ttft, total[b] or end, finish[b], stats, all_logits[b] or None, text
            ))
        return outputs if batched else outputs[0]

    def _stop_reason(
        self, new: list[int], eos: set[int], stop_strings: Sequence[str] | None, max_new_tokens: int
    ) -> str | None:
        if new[-1] in eos:
            return "eos"
        if stop_strings and self._hit_stop(new, stop_strings):
            return "stop_string"
        if len(new) == max_new_tokens:
            return "length"
        return None

    # ------------------------------------------------------------ input checks
    def _check_input(self, input_ids, attention_mask, max_new_tokens: int) -> tuple[list[torch.Tensor], bool]:
        """-> (one [n] id tensor per sequence on the model's device, padding removed; was it a batch)."""
        a = self.adapter
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        rows, batched = _sequences(input_ids, attention_mask)
        if not rows:
            raise ValueError("the batch is empty: give at least one sequence")
        prompts = []
        for i, ids in enumerate(rows):
            what = f"sequence {i} of the batch" if batched else "the prompt"
            if ids.numel() == 0:
                raise ValueError(f"{what} is empty: give at least one token id")
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
            ids = ids.to(device=a.device, dtype=torch.long)
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= a.vocab_size:
                where = f" (in {what})" if batched else ""
                raise ValueError(
                    f"token id {lo if lo < 0 else hi}{where} is outside the vocabulary [0, {a.vocab_size - 1}]"
                )
            total = ids.shape[0] + max_new_tokens
            if total > a.max_positions:
                name = what if batched else "prompt"
                raise ValueError(
                    f"{name} ({ids.shape[0]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                    f"model's {a.max_positions} positions: shorten the prompt or lower max_new_tokens"
                )
            prompts.append(ids)
        return prompts, batched

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


def _sequences(input_ids, attention_mask) -> tuple[list[torch.Tensor], bool]:
    """The sequences of any accepted input form, padding removed -> (rows, was it a batch)."""
    if isinstance(input_ids, (torch.Tensor, np.ndarray)):
        ids = torch.as_tensor(input_ids)
    elif attention_mask is not None:
        try:
            ids = torch.tensor(input_ids)
        except (ValueError, TypeError):
            raise ValueError(
                "attention_mask goes with one padded [batch, n] block of ids; "
                "a list of sequences of different lengths needs no mask"
            ) from None
    else:
        seq = list(input_ids)
        if seq and isinstance(seq[0], (list, tuple, torch.Tensor, np.ndarray)):
            rows = [torch.as_tensor(s) if isinstance(s, (torch.Tensor, np.ndarray)) else torch.tensor(list(s))
                    for s in seq]
            return rows, True
        return [torch.tensor(seq, dtype=torch.long)], False
    if ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must be [n] or [batch, n], got shape {tuple(ids.shape)}")
    batched = ids.dim() == 2
    rows = list(ids) if batched else [ids]
    if attention_mask is None:
        return rows, batched
    mask = torch.as_tensor(attention_mask, device=ids.device)
    if mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape {tuple(ids.shape)}: they must match"
        )
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 1 (token) and 0 (padding)")
    out = []
    for i, (row, keep) in enumerate(zip(rows, mask.bool().reshape(len(rows), -1))):
        where = keep.nonzero()[:, 0]
        if where.numel() and int(where[-1] - where[0]) + 1 != where.numel():
            raise ValueError(f"attention_mask row {i} has padding between tokens: pad on the left or the right only")
        out.append(row[keep])
    return out, batched


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
    logits: torch.Tensor, warpers: LogitsProcessorList, generators: list[torch.Generator] | None
) -> torch.Tensor:
    """logits: [A, vocab] -> the next token id of each sequence [A], on the device."""
    if generators is None:
        return logits.argmax(dim=-1)
    probs = warpers(None, logits).softmax(dim=-1)  # these warpers never read input_ids
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators, strict=True)])


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings include it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
