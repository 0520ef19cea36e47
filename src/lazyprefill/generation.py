"""LazyLLM.generate: input checks, the step loop, sampling, stopping, streaming and TTFT.

Shapes: B sequences in a batch, A of them still generating, n prompt tokens.
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from .adapters import LlamaAdapter, adapter_for
from .engine import DecodeOptions, Engine, PendingStats, StepStats, StepTrace
from .env import synchronize
from .flops import prefill_work
from .plan import key_length
from .schedule import DEFAULT_PRESET, Schedule, parse_schedule


@dataclass
class GenerationStats:
    """Token counts per step and layer, and each prompt token's depth: what pruning actually did."""

    steps: list[StepStats]  # steps[0] is prefill
    prefill_depth: np.ndarray  # [n_prompt] deepest layer each prompt token reached in prefill
    # [n_total] deepest layer each token reached over the whole generation (with DecodeOptions.ahead, a sequence
    # stopped by EOS or a stop string includes what its one step more revived)
    final_depth: np.ndarray
    num_layers: int
    traces: list[StepTrace] = field(default_factory=list)  # filled when LazyLLM(trace=True)
    graphs_captured: int = 0  # CUDA graphs the generation captured (0: it replayed what an earlier call captured)

    @property
    def prefill_computed(self) -> list[int]:
        """Tokens computed per layer in prefill."""
        return self.steps[0].computed

    @property
    def prefill_work(self) -> float:
        """Prefill's (token, layer) rows as a share of dense's."""
        return prefill_work(self.prefill_computed, len(self.prefill_depth))

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


@dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen: greedy (the default) or sampled, checked when it is made.

    Sequence i of a batch samples from its own generator seeded `seed + i` (a fresh random seed when
    `seed` is None), so that what it draws does not depend on the rest of the batch.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, numbers.Real) or not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}: 1.0 leaves the logits as they are")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be an int >= 1 (or None for no limit), got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, numbers.Real) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    def generators(self, count: int, device: torch.device) -> list[torch.Generator] | None:
        """One seeded generator per sequence when sampling; None when greedy."""
        if not self.do_sample:
            return None
        base = self.seed if self.seed is not None else torch.seed()
        return [torch.Generator(device=device).manual_seed(base + b) for b in range(count)]

    def warpers(self) -> LogitsProcessorList:
        """transformers' own temperature, top-k and top-p warpers, in transformers' order."""
        warpers = LogitsProcessorList()
        if not self.do_sample:
            return warpers
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k is not None:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p is not None:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers


@dataclass
class Request:
    """One sequence while it is generated: what `stream` keeps per batch entry, in one place."""

    index: int  # position in the batch
    prompt: torch.Tensor  # [n] ids on the model's device, padding removed
    generator: torch.Generator | None = None  # when sampling
    new_tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # per step [vocab] fp32, when return_logits=True
    steps: list[StepStats] = field(default_factory=list)  # steps[0] is prefill
    prefill_depth: np.ndarray | None = None  # [n]
    finish_reason: str | None = None  # None while generating
    total_s: float = 0.0  # input on the device -> this sequence stopped

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class LazyLLM:
    """LazyLLM on a model the user already loaded: never copies or modifies its weights.

    `schedule` is a preset name ("balanced", the default, or "paper"), "dense"/None, "static"/"random" baselines, a
    "layer:ratio,..." string, a `{layer: ratio}` dict or a `Schedule`. `decode` chooses how decoding steps
    run (`DecodeOptions`: CUDA graphs, Triton kernels, compiled layers); the defaults suit the device.

    Memory: the engine of the last call (its K/V cache, compiled code and CUDA graphs) is kept for the next call
    of the same batch size that fits in it, as a compiled static cache is; `release()` frees it.

    Threads: a LazyLLM is not safe to call from several threads at once (its calls share the kept engine), and
    neither are several LazyLLMs over one model: calls share torch's process-wide state (the SDPA backend choice,
    the global RNG that seeds sampling when `seed` is None). Serialise them (one lock), use one process per
    worker, or serve many clients with `lazyprefill serve`, whose one scheduler thread batches them.
    """

    def __init__(
        self,
        model: nn.Module,
        schedule: str | dict | Schedule | None = DEFAULT_PRESET,
        tokenizer=None,
        trace: bool = False,
        decode: DecodeOptions | None = None,
    ) -> None:
        if getattr(model, "lm_head", None) is None:
            raise ValueError(
                f"LazyLLM needs a causal LM with its LM head, got a {type(model).__name__}: pass the *ForCausalLM "
                "model (what AutoModelForCausalLM.from_pretrained returns), not its base `.model`"
            )
        self.model = model
        self.adapter: LlamaAdapter = adapter_for(model)
        a = self.adapter
        self.schedule = parse_schedule(schedule, a.num_layers, prunable=a.prunable_layers(), presets=a.presets)
        self.tokenizer = tokenizer
        self.trace = trace
        self.decode = decode or DecodeOptions()
        self._engine: Engine | None = None  # the last call's, kept for the next call of the same batch size

    def release(self) -> None:
        """Free the K/V cache and CUDA graphs kept from the last call (the next call builds them again)."""
        self._engine = None

    def engine_for(self, batch: int, capacity: int) -> Engine:
        """The last call's engine when this call fits it (same batch size, enough room, not traced), so that its
        cache, compiled kernels and captured CUDA graphs serve again, as a compiled static cache does; otherwise
        a new one, with its room rounded up (plan.key_length) so that calls of similar lengths share it."""
        kept = self._engine
        if kept is not None and kept.cache.batch == batch and kept.capacity >= capacity:
            return kept
        self._engine = None  # the old cache is freed before the new one is allocated
        room = key_length(capacity, max(capacity, self.adapter.max_positions))
        engine = Engine(self.adapter, self.schedule, room, trace=self.trace, decode=self.decode, batch=batch)
        if not self.trace:  # a traced engine records one generation
            self._engine = engine
        return engine

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

    def check_request(self, input_ids, max_new_tokens: int = 64, *, attention_mask=None) -> None:
        """Raise ValueError if `generate` would refuse this input, without running the model.

        The same checks `generate` and `stream` make first: callers that time or warm up (the CLI)
        call it before any prefill, so that a request too long for the model fails at once.
        """
        self._prompts(input_ids, attention_mask, max_new_tokens)

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
        stop_strings: str | Sequence[str] | None = None,
        return_logits: bool = False,
    ) -> Generator[int | tuple[int, int], None, GenerationOutput | list[GenerationOutput]]:
        """Yield token ids as they are generated ((i, token) pairs for a batch); returns `generate`'s result.

        `attention_mask` (1: token, 0: padding) goes with a padded [B, n] tensor. Every sequence is
        pruned, sampled and stopped on its own, and gets what it would get alone: sequence i samples
        with `seed + i` and, under the `random` baseline, draws with the schedule's seed + i.
        Generation stops at `max_new_tokens` (at least 1), an EOS id (the model's generation config by
        default) or a stop string (one string or several; needs the tokenizer). Stopping the iteration
        early stops generation there. Only the engine's steps run in inference mode: between tokens
        (and in `on_token`) the caller's grad mode is untouched.
        """
        prompts, batched = self._prompts(input_ids, attention_mask, max_new_tokens)
        engine = self.engine_for(len(prompts), max(p.shape[0] for p in prompts) + max_new_tokens)
        return (yield from self._generation(
            engine, engine.prefill, prompts, batched, max_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, eos_token_id=eos_token_id, stop_strings=stop_strings,
            return_logits=return_logits,
        ))

    def session(self, prompt, room: int = 1024) -> Session:
        """Prefill `prompt` once (a long document) and answer any number of continuations of it, each prefilled
        from where the prompt ends: `session.generate(question_ids)`. `room`: tokens a continuation and its
        answer may take together. The session keeps its own cache, apart from `generate`'s."""
        return Session(self, prompt, room)

    def _generation(
        self,
        engine: Engine,
        prefill: Callable[[list[torch.Tensor]], tuple[torch.Tensor, list[StepStats]]],
        prompts: list[torch.Tensor],
        batched: bool,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        stop_strings: str | Sequence[str] | None = None,
        return_logits: bool = False,
    ) -> Generator[int | tuple[int, int], None, GenerationOutput | list[GenerationOutput]]:
        """`stream` on `engine` once its input is checked: `prefill(prompts)` -> (logits [B, vocab], stats) is the
        first step (a whole prefill, or a continuation of a prompt the engine holds), then the decoding loop."""
        sampling = SamplingParams(do_sample, temperature, top_k, top_p, seed)
        if do_sample and seed is None and self.adapter.tp is not None:
            raise ValueError("a tensor-parallel model samples on every rank, and every rank must draw the same tokens: "
                             "pass the same seed on every rank")
        stops = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings or ())
        if stops and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass LazyLLM(model, tokenizer=tok)")
        eos = eos_ids(self.model, eos_token_id)
        device, warpers = self.adapter.device, sampling.warpers()
        generators = sampling.generators(len(prompts), device) or [None] * len(prompts)
        requests = [Request(b, p, g) for b, (p, g) in enumerate(zip(prompts, generators))]

        captured = engine.graphs_captured
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            logits, stats = prefill(prompts)  # logits: [B, vocab]
            tokens = _choose(logits, warpers, requests)  # [B]
            chosen = tokens.tolist()
            synchronize(device)
            ttft = time.perf_counter() - start
            engine.settle()
        for r, s in zip(requests, stats):
            r.steps.append(s)
            r.prefill_depth = engine.cache.depth[r.index, : r.prompt.shape[0]].copy()
        # DecodeOptions.ahead: a step is enqueued before the previous one's tokens are read (its input tokens stay on
        # the device), so the device computes it while the host hands tokens out, checks stops and plans: every
        # sequence that has not reached max_new_tokens takes it, and one that stopped at EOS or a stop string wasted it
        ahead = (device.type == "cuda" if self.decode.ahead is None else self.decode.ahead) and not self.trace
        active = requests
        while True:
            for i, r in enumerate(active):
                r.new_tokens.append(chosen[i])
                if return_logits:
                    r.logits.append(logits[i].clone())  # cloned outside inference mode: an ordinary tensor
            if ahead:
                runs = [i for i, r in enumerate(active) if len(r.new_tokens) < max_new_tokens]
                step = self._step(engine, tokens, active, runs, warpers) if runs else None
            for i, r in enumerate(active):
                yield (r.index, chosen[i]) if batched else chosen[i]
                r.finish_reason = self._stop_reason(r.new_tokens, eos, stops, max_new_tokens)
                if r.done:
                    r.total_s = time.perf_counter() - start
            if not ahead:
                runs = [i for i, r in enumerate(active) if not r.done]
                step = self._step(engine, tokens, active, runs, warpers) if runs else None
            if step is None:
                break
            going = [j for j, i in enumerate(runs) if not active[i].done]
            if not going:
                break
            logits, tokens, pending = step
            logits, tokens, active = logits[going], tokens[going], [active[runs[j]] for j in going]
            chosen = tokens.tolist()
            stats = pending.get()
            for r, j in zip(active, going):
                r.steps.append(stats[j])
        outputs = [self._output(r, engine, ttft, engine.graphs_captured - captured) for r in requests]
        return outputs if batched else outputs[0]

    @staticmethod
    def _step(engine: Engine, tokens: torch.Tensor, active: list[Request], runs: list[int], warpers: LogitsProcessorList
              ) -> tuple[torch.Tensor, torch.Tensor, PendingStats]:
        """A decoding step of active[i] for i in `runs`, from their tokens [len(active)] on the device -> logits
        [len(runs), vocab], the chosen tokens [len(runs)] (on the device: nothing is read) and the step's stats."""
        requests = [active[i] for i in runs]
        with torch.inference_mode():
            logits, pending = engine.step(tokens[runs], [r.index for r in requests])  # logits: [A, vocab]
            return logits, _choose(logits, warpers, requests), pending

    def _output(self, r: Request, engine: Engine, ttft: float, graphs_captured: int) -> GenerationOutput:
        stats = GenerationStats(
            steps=r.steps,
            prefill_depth=r.prefill_depth,
            final_depth=engine.cache.depth[r.index, : r.prompt.shape[0] + len(r.new_tokens) - 1].copy(),
            num_layers=self.adapter.num_layers,
            traces=engine.traces[r.index] if engine.traces else [],
            graphs_captured=graphs_captured,
        )
        sequences = torch.cat([r.prompt, torch.tensor(r.new_tokens, dtype=r.prompt.dtype, device=r.prompt.device)])
        text = self.tokenizer.decode(r.new_tokens, skip_special_tokens=True) if self.tokenizer is not None else None
        return GenerationOutput(
            sequences[None], r.new_tokens, ttft, r.total_s, r.finish_reason, stats, r.logits or None, text
        )

    def _stop_reason(
        self, new: list[int], eos: set[int], stop_strings: tuple[str, ...], max_new_tokens: int
    ) -> str | None:
        if new[-1] in eos:
            return "eos"
        if stop_strings and self._hit_stop(new, stop_strings):
            return "stop_string"
        if len(new) == max_new_tokens:
            return "length"
        return None

    # ------------------------------------------------------------ input checks
    def _prompts(self, input_ids, attention_mask, max_new_tokens: int) -> tuple[list[torch.Tensor], bool]:
        """-> (one [n] id tensor per sequence on the model's device, padding removed; was it a batch)."""
        a = self.adapter
        if not _is_int(max_new_tokens) or max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be a positive int (at least 1, as in transformers), got {max_new_tokens!r}"
            )
        rows, batched = _sequences(input_ids, attention_mask)
        if not rows:
            raise ValueError("the batch is empty: give at least one sequence")
        prompts = []
        for i, ids in enumerate(rows):
            what = f"sequence {i} of the batch" if batched else "the prompt"
            if ids.numel() == 0:
                raise ValueError(f"{what} is empty: give at least one token id")
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
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

    def _hit_stop(self, new: list[int], stop_strings: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(new[-32:], skip_special_tokens=True)
        return any(s in text for s in stop_strings)


class Session:
    """One prompt prefilled once and continued many times: several questions about one document, or a chat's
    turns (`LazyLLM.session`).

    The prompt is prefilled under the LazyLLM's schedule into a cache of the session's own. Each `generate`
    prefills only its continuation (Engine.extend), decodes, and then forgets the continuation and its answer,
    keeping what decoding revived of the prompt (a K/V row depends only on the tokens before it). Dense, an
    answer is the fresh prefill's of prompt + continuation, up to rounding; pruned, the continuation chooses the
    prompt tokens it attends to as a decoding step does, reviving them from the Aux Cache (Engine.extend).
    """

    def __init__(self, lazy: LazyLLM, prompt, room: int) -> None:
        if not _is_int(room) or room < 2:
            raise ValueError(f"room must be an int of at least 2 (a continuation token, an answer token), got {room!r}")
        if _sequences(prompt, None)[1]:
            raise ValueError("a session holds one prompt: give a list of ids or an [n] tensor, not a batch")
        self.lazy, self.prompt = lazy, lazy._prompts(prompt, None, room)[0][0]  # prompt: [n] on the model's device
        self.engine = Engine(lazy.adapter, lazy.schedule, self.prompt.shape[0] + room, decode=lazy.decode, batch=1)
        device = lazy.adapter.device
        with torch.inference_mode():
            synchronize(device)
            start = time.perf_counter()
            _, stats = self.engine.prefill([self.prompt])
            synchronize(device)
            self.prefill_s = time.perf_counter() - start  # the prompt's own TTFT, paid once
            self.prefill_computed: list[int] = stats[0].computed  # the prompt's tokens computed per layer
            self.engine.settle()

    @property
    def room(self) -> int:
        """Tokens a continuation and its answer may still take together."""
        return self.engine.capacity - self.prompt.shape[0]

    def add(self, input_ids) -> None:
        """Append ids to the held prompt without generating (a chat's answer and next turn), computed once."""
        ids = self._continuation(input_ids, 1)
        self.engine.truncate(0, self.prompt.shape[0])
        with torch.inference_mode():
            self.engine.extend(0, ids)
        self.prompt = torch.cat([self.prompt, ids])

    def generate(self, input_ids, max_new_tokens: int = 64, *, on_token: Callable[[int], None] | None = None,
                 **options) -> GenerationOutput:
        """The answer to prompt + `input_ids` (LazyLLM.generate's options). Its `ttft_s` is the continuation's
        alone, its `sequences` the whole: prompt, continuation, answer."""
        run = self.stream(input_ids, max_new_tokens, **options)
        while True:
            try:
                token = next(run)
            except StopIteration as done:
                return done.value
            if on_token is not None:
                on_token(token)

    def stream(self, input_ids, max_new_tokens: int = 64, **options) -> Generator[int, None, GenerationOutput]:
        """Yield the answer's ids as they come (LazyLLM.stream's options); returns `generate`'s result."""
        ids = self._continuation(input_ids, max_new_tokens)
        self.engine.truncate(0, self.prompt.shape[0])

        def extend(_: list[torch.Tensor]) -> tuple[torch.Tensor, list[StepStats]]:
            logits, stats = self.engine.extend(0, ids)
            return logits, [stats]

        whole = torch.cat([self.prompt, ids])
        return (yield from self.lazy._generation(self.engine, extend, [whole], False, max_new_tokens, **options))

    def _continuation(self, input_ids, max_new_tokens: int) -> torch.Tensor:
        """The checked ids [m] on the model's device, refused when they and the answer overflow the session."""
        if _sequences(input_ids, None)[1]:
            raise ValueError("a session continues with one sequence: give a list of ids or an [n] tensor")
        rows = self.lazy._prompts(input_ids, None, max_new_tokens)[0]
        need = rows[0].shape[0] + max_new_tokens
        if need > self.room:
            raise ValueError(
                f"the continuation ({rows[0].shape[0]} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceed the "
                f"session's room of {self.room} tokens after its prompt: open it with a larger room= "
                "(LazyLLM.session(prompt, room=...))"
            )
        return rows[0]


def eos_ids(model: nn.Module, eos_token_id: int | Sequence[int] | None = None) -> set[int]:
    """The ids that end a generation: `eos_token_id` if given, else the model's generation config, else its config."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = model.config.eos_token_id
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


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
            rows = [
                torch.as_tensor(s) if isinstance(s, (torch.Tensor, np.ndarray)) else torch.tensor(list(s)) for s in seq
            ]
            return rows, True
        return [torch.tensor(seq)], False  # a list of floats stays float and is refused, never cast to ids
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


def _choose(logits: torch.Tensor, warpers: LogitsProcessorList, requests: list[Request]) -> torch.Tensor:
    """logits: [A, vocab] of `requests`, in order -> the next token id of each [A], on the device."""
    if requests[0].generator is None:
        return logits.argmax(dim=-1)
    probs = warpers(None, logits).softmax(dim=-1)  # these warpers never read input_ids
    return torch.cat([torch.multinomial(p, 1, generator=r.generator) for p, r in zip(probs, requests, strict=True)])


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
