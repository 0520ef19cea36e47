"""Continuous batching: requests join a running batch between decoding steps and leave it when they stop.

No HTTP here (server.py speaks OpenAI's protocol over this). One `Scheduler` owns the model: a thread runs its
loop, and every other thread only submits requests and reads what they produce. The loop repeats:
  1. admit waiting requests into free cache slots (an engine per schedule, slots of a fixed room);
  2. run one bounded chunk of the oldest admitted request's prefill (`Engine.prefill_layers`, stopped once the
     chunk's rows x layers reach `prefill_chunk`), so that a long prompt delays the others by one chunk at most;
  3. run one decoding step for every decoding request of each engine, sample, stream, stop and free slots.
A finished request's tokens stay cached (PrefixCache): a later prompt that begins with them (a new question about
the same document, a chat's next turn) is prefilled from where the shared part ends (Engine.resume, extend_layers).
A request alone and the same request among others get the same tokens (greedy): every sequence of an engine is
pruned, scored and sampled on its own (SPEC.md, invariant 6).

Legend: B slots of an engine, C positions per slot (the longest prompt plus the most new tokens a request may ask).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .adapters import LlamaAdapter, adapter_for
from .engine import DecodeOptions, Engine, Held, StepStats
from .flops import prefill_work
from .generation import SamplingParams, eos_ids
from .schedule import DEFAULT_PRESET, FileRefused, Schedule, parse_schedule

# (adapter, schedule, capacity, decode options, slots) -> an engine for a schedule's pool: `new_engine`, or under
# tensor parallelism one whose calls the other ranks repeat (mirror.Leader.engine)
EngineFactory = Callable[[LlamaAdapter, Schedule, int, DecodeOptions, int], Engine]

logger = logging.getLogger(__name__)  # failures with their tracebacks: a client is told only the message

WARM_UP_TOKENS = 256  # the warm-up's prompt at least (longer where the default schedule prunes only longer ones)
WARM_UP_NEW_TOKENS = 8  # and its answer: decoding steps enough to capture a step's graphs


def new_engine(adapter: LlamaAdapter, schedule: Schedule, capacity: int, decode: DecodeOptions, batch: int) -> Engine:
    return Engine(adapter, schedule, capacity, decode=decode, batch=batch)


# A request's schedule that looks like a path, whether or not it exists: one message, so that a client learns
# nothing of the server's files.
PATH_REFUSED = ("a request's schedule cannot be a file path: give a preset, layer:ratio pairs or the name of a "
                "schedule file registered when the server started (lazyprefill serve --schedule-file NAME=FILE)")


@dataclass(frozen=True)
class ServeConfig:
    """How many requests run at once and how large they may be; checked when made.

    max_batch: slots of each engine (requests decoding together under one schedule). max_prompt_tokens and
    max_new_tokens: the largest request; a slot holds both (None: the model's positions less max_new_tokens).
    kv_budget_gb: K/V and Aux Cache memory for all engines together (None: max_batch slots for one engine and
    one more engine per extra schedule in use). max_queue: requests that may wait for a slot once every slot is
    taken; more are refused (the server answers 429). prefill_chunk: token x layer rows of prefill between two
    decoding steps. max_schedules: engines kept at once (one per schedule requested); an idle one is dropped for
    another schedule. min_reuse_tokens: the shortest cached prefix a request reuses (0: no reuse); cached prefixes
    take what kv_budget_gb leaves beside the engines' slots (without a budget: as much as max_batch slots). Reuse
    is exact where nothing is pruned (a dense schedule, or prompts below its min_prompt_tokens); `reuse_pruned`
    also lets a pruned prompt continue a pruned prefix (Engine.extend_layers), whose answer may differ from a fresh
    prefill's. `schedule` is the server's default, the operator's: any spec or a file's path. `schedules`: those
    that requests may name, read at start (a request may not give a path: Scheduler.parse); a name here wins over
    a preset or spec that reads the same, so `lazyprefill serve` refuses such names.
    """

    schedule: str = DEFAULT_PRESET
    max_batch: int = 8
    max_prompt_tokens: int | None = None
    max_new_tokens: int = 512
    kv_budget_gb: float | None = None
    max_queue: int = 64
    prefill_chunk: int = 65536
    max_schedules: int = 2
    min_reuse_tokens: int = 32
    reuse_pruned: bool = False
    schedules: Mapping[str, Schedule] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_new_tokens", "max_queue", "prefill_chunk", "max_schedules"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int)
                                                   or self.max_prompt_tokens < 1):
            raise ValueError(f"max_prompt_tokens must be an int >= 1 or None, got {self.max_prompt_tokens!r}")
        if self.kv_budget_gb is not None and not self.kv_budget_gb > 0:
            raise ValueError(f"kv_budget_gb must be > 0 or None, got {self.kv_budget_gb!r}")
        if not isinstance(self.min_reuse_tokens, int) or self.min_reuse_tokens < 0:
            raise ValueError(f"min_reuse_tokens must be an int >= 0 (0: no reuse), got {self.min_reuse_tokens!r}")


class Refused(ValueError):
    """A request that cannot be served as asked; `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass
class Event:
    """What a request produced: a token (id and the text it completes), or the end (finish_reason set)."""

    token: int | None = None
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: str | None = None


@dataclass
class ServeRequest:
    """One request from submission to its last event. `emit` is called from the scheduler's thread."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    schedule: str
    stop: tuple[str, ...]
    emit: Callable[[Event], None]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by any thread; the loop frees the request's slot at its next iteration
    new_tokens: list[int] = field(default_factory=list)
    text: str = ""
    first_token_s: float | None = None  # arrival -> first token
    last_token_at: float = 0.0  # perf_counter() of the newest token
    prefill: StepStats | None = None
    reused: int = 0  # prompt tokens taken from a cached prefix, not prefilled
    revived: int = 0
    slot: int | None = None
    generator: torch.Generator | None = None
    cached: bool = True  # whether its tokens may stay as a prefix for later prompts (not the warm-up's)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def held_back(self) -> int:
        """Characters of new text kept back until the next token: a stop string's beginning may end the text."""
        return max((len(s) - 1 for s in self.stop), default=0)

    @property
    def prefill_work(self) -> float | None:
        """Prefill's (token, layer) rows as a share of dense's."""
        if self.prefill is None:
            return None
        return prefill_work(self.prefill.computed, len(self.prompt))


@dataclass
class Pool:
    """One engine and its slots: the requests decoding in it, and those admitted to prefill (oldest first, one
    chunk at a time)."""

    engine: Engine
    free: list[int]
    schedule: str
    decoding: dict[int, ServeRequest] = field(default_factory=dict)  # slot -> request
    prefilling: deque[tuple[ServeRequest, Generator]] = field(default_factory=deque)

    @property
    def busy(self) -> bool:
        return bool(self.decoding or self.prefilling)


class PrefixCache:
    """Sequences the server has computed, per schedule, least recently used first: each finished request's prompt
    and answer (Engine.hold), so that a prompt beginning with one is prefilled only from where they part.

    A cached sequence that another one begins with is dropped (the longer one serves both), and the least recently
    used go once the cache passes its budget. Touched by the scheduler's thread alone.
    """

    def __init__(self, min_tokens: int) -> None:
        self.min_tokens = min_tokens
        self.entries: OrderedDict[int, tuple[str, np.ndarray, Held]] = OrderedDict()  # id -> (schedule, ids, held)
        self.nbytes = 0
        self._next = 0

    def match(self, schedule: str, prompt: list[int], pruned: bool) -> tuple[Held, int] | None:
        """The cached sequence sharing the longest beginning with `prompt` (at least min_tokens, and one token short
        of the whole prompt, whose last token must run for its logits) and how many tokens they share; `pruned`:
        whether a sequence whose prompt was pruned may serve."""
        ids = np.asarray(prompt)
        best, shared = None, 0
        for key, (spec, cached, held) in self.entries.items():
            n = min(len(cached), len(ids) - 1)
            if spec != schedule or (held.pruned and not pruned) or n < max(self.min_tokens, shared + 1):
                continue
            differ = np.flatnonzero(cached[:n] != ids[:n])
            common = int(differ[0]) if differ.size else n
            if common >= max(self.min_tokens, shared + 1):
                best, shared = key, common
        if best is None:
            return None
        self.entries.move_to_end(best)
        return self.entries[best][2], shared

    def store(self, schedule: str, ids: list[int], held: Held, budget: float) -> None:
        """Cache a sequence within `budget` bytes (dropping those it covers, then the least recently used)."""
        new = np.asarray(ids)
        for key, (spec, cached, old) in list(self.entries.items()):
            if spec != schedule or len(cached) > len(new) or not np.array_equal(cached, new[: len(cached)]):
                continue
            del self.entries[key]
            self.nbytes -= old.nbytes
        if held.nbytes > budget or len(new) < self.min_tokens:
            return
        self.entries[self._next] = (schedule, new, held)
        self._next += 1
        self.nbytes += held.nbytes
        self.evict(budget)

    def evict(self, budget: float) -> None:
        """Drop the least recently used sequences until the rest fit in `budget` bytes."""
        while self.nbytes > budget:
            _, _, old = self.entries.popitem(last=False)[1]
            self.nbytes -= old.nbytes


class Scheduler:
    """Serves `model` to many clients at once (see the module's docstring). `tokenizer` turns tokens into text.

    Thread-safe entry points: `submit`, `request.cancel()`, `stats()`, `close()`.
    """

    def __init__(self, model: nn.Module, tokenizer, config: ServeConfig = ServeConfig(),
                 decode: DecodeOptions | None = None, eos: set[int] | None = None,
                 observe: Callable[[str, float], None] | None = None, make_engine: EngineFactory | None = None) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.make_engine = make_engine or new_engine
        self.adapter = adapter_for(model)
        self.decode_options = decode or DecodeOptions()
        self.eos = eos if eos is not None else eos_ids(model)
        self.observe = observe or (lambda _name, _value: None)  # metrics: (name, value) from the loop's thread
        a = self.adapter
        positions = a.max_positions
        self.max_prompt = config.max_prompt_tokens or positions - config.max_new_tokens
        if self.max_prompt < 1 or self.max_prompt + config.max_new_tokens > positions:
            raise ValueError(f"max_prompt_tokens ({config.max_prompt_tokens}) + max_new_tokens "
                             f"({config.max_new_tokens}) must fit the model's {positions} positions")
        self.capacity = self.max_prompt + config.max_new_tokens  # C
        self.slot_bytes = slot_bytes(self.adapter, self.capacity)
        self.slots_budget = (math.inf if config.kv_budget_gb is None
                             else int(config.kv_budget_gb * 2**30 // self.slot_bytes))
        if self.slots_budget < 1:
            raise ValueError(f"kv_budget_gb={config.kv_budget_gb} holds no slot: one slot of {self.capacity} "
                             f"positions needs {self.slot_bytes / 2**30:.3f} GB; raise the budget or lower "
                             "max_prompt_tokens / max_new_tokens")
        # the operator's default, which may be a file; one the model cannot run fails here, not at the first request
        self.default = parse_schedule(config.schedule, a.num_layers, a.prunable_layers(), a.presets)
        self.pools: dict[str, Pool] = {}
        self.prefixes = PrefixCache(config.min_reuse_tokens)
        self.waiting: deque[ServeRequest] = deque()
        self._lock = threading.Condition()
        self._closed = False
        self._running = 0  # requests prefilling or decoding after the loop's last round
        self._thread = threading.Thread(target=self._loop, name="lazyprefill-scheduler", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def parse(self, spec: str | None) -> Schedule:
        """A request's schedule (None or "": the server's default), or Refused: a registered name, or a spec that
        parse_schedule reads without opening a file, since a client cannot reach the server's disk."""
        if not spec:
            return self.default
        if spec in self.config.schedules:
            return self.config.schedules[spec]
        a = self.adapter
        try:
            return parse_schedule(spec, a.num_layers, a.prunable_layers(), a.presets, files=False)
        except FileRefused:
            raise Refused(PATH_REFUSED, param="schedule") from None
        except ValueError as err:
            names = ", ".join(self.config.schedules) or "none"
            raise Refused(f"bad schedule {spec!r}: {err} (schedules registered on this server: {names})",
                          param="schedule") from None

    def submit(self, request: ServeRequest) -> None:
        """Queue a request, or raise Refused: too long (400) or the queue is full (429)."""
        if len(request.prompt) > self.max_prompt:
            raise Refused(f"the prompt has {len(request.prompt)} tokens; this server takes at most {self.max_prompt}",
                          param="messages", code="context_length_exceeded")
        if not 1 <= request.max_new_tokens <= self.config.max_new_tokens:
            raise Refused(f"max_tokens must be between 1 and {self.config.max_new_tokens}, got "
                          f"{request.max_new_tokens}", param="max_tokens")
        self.parse(request.schedule)
        with self._lock:
            if self._closed:
                raise Refused("the server is shutting down", status=503)
            if len(self.waiting) >= self.config.max_queue + self._free_slots(request.schedule or self.config.schedule):
                raise Refused(f"{len(self.waiting)} requests are waiting; try again shortly", status=429,
                              code="queue_full")
            self.waiting.append(request)
            self._lock.notify()

    def warm_up(self) -> float:
        """Serve one request of the default schedule before any client does, and return its seconds: a process
        pays once what its first request meets (compiled layers and selection, CUDA graphs, Triton kernels,
        FlexAttention for a sparse schedule), and a GPU server's first request took 4.2-4.3 s against 0.4-0.5 s
        after it (benchmarks/results/serve/gpu-h100-2026-12-07-fallback/load.json, its warm-up). The prompt is long
        enough to be pruned (and to attend sparsely) unless max_prompt_tokens is shorter; it is not kept for reuse.
        Call it before metrics are attached (`create_app`): its figures go to `observe` like any request's.
        Raises RuntimeError if the request does not finish (an error, or the loop gone)."""
        sparse = self.default.sparse
        n = min(self.max_prompt, max(WARM_UP_TOKENS, self.default.min_prompt(self.adapter.device.type),
                                     sparse.min_tokens if sparse is not None else 0))
        ended: list[Event] = []
        done = threading.Event()

        def emit(event: Event) -> None:
            if event.finish_reason is not None:
                ended.append(event)
                done.set()

        prompt = [1 + i % (self.adapter.vocab_size - 1) for i in range(n)]
        start = time.perf_counter()
        try:
            self.submit(ServeRequest(prompt, min(WARM_UP_NEW_TOKENS, self.config.max_new_tokens), SamplingParams(),
                                     "", (), emit, cached=False))
        except Refused as err:  # the loop is gone or closing
            raise RuntimeError(f"the warm-up request of {n} tokens was refused: {err}") from None
        done.wait()
        if ended[0].finish_reason not in ("stop", "length"):  # "cancelled" only when the loop ended
            raise RuntimeError(f"the warm-up request of {n} tokens failed: {ended[0].error or ended[0].finish_reason}")
        return time.perf_counter() - start

    def _free_slots(self, schedule: str) -> int:
        """Slots of a schedule's engine that the loop has yet to fill (held lock); a new engine's, if none yet."""
        if schedule in self.pools:
            return len(self.pools[schedule].free)
        return min(self.config.max_batch, self.slots_budget)

    def stats(self) -> dict[str, int]:
        """Requests waiting, and running as of the loop's last round."""
        with self._lock:
            return {"waiting": len(self.waiting), "running": self._running}

    def close(self) -> None:
        """Stop the loop: running requests end with finish_reason "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join()

    # ------------------------------------------------------------------ the loop's thread
    def _loop(self) -> None:
        """Admit, prefill a chunk, decode a step, until closed. A step that raises fails its requests (and its
        engines go); if the loop itself ends for any reason, every request still held ends and new ones are
        refused, so that no client waits for a thread that is gone."""
        try:
            with torch.inference_mode():
                while self._next_round():
                    try:
                        self._drop_cancelled()
                        for pool in list(self.pools.values()):
                            self._prefill_chunk(pool)
                            self._decode_step(pool)
                    except Exception as err:  # a failed step fails its requests, not the server
                        logger.exception("a step failed: its engines' requests fail and the engines are rebuilt")
                        self._fail_all(f"{type(err).__name__}: {err}")
                    self._running = sum(len(p.decoding) + len(p.prefilling) for p in self.pools.values())
                    self.observe("running", self._running)
        finally:
            with self._lock:
                self._closed = True
                left = [*self.waiting, *(r for p in self.pools.values() for r in p.decoding.values()),
                        *(r for p in self.pools.values() for r, _ in p.prefilling)]
                self.waiting.clear()
            for request in left:
                request.emit(Event(finish_reason="cancelled"))

    def _next_round(self) -> bool:
        """Wait for work (giving freed heap memory back first), then admit what fits; False once closed."""
        with self._lock:
            if not self._closed and not self.waiting and not any(p.busy for p in self.pools.values()):
                trim_heap()
            while not self._closed and not self.waiting and not any(p.busy for p in self.pools.values()):
                self._lock.wait()
            if self._closed:
                return False
            self._admit()
            self.observe("queue", len(self.waiting))
            return True

    def _admit(self) -> None:
        """Move waiting requests, oldest first, into free slots of their schedule's engine (held lock). When no
        engine can be built for one, it and every later request wait, so that busy engines drain and make room
        for it; a request whose admission fails ends with an error."""
        held: deque[ServeRequest] = deque()
        while self.waiting:
            request = self.waiting.popleft()
            if request.cancelled:
                request.emit(Event(finish_reason="cancelled"))
                continue
            try:
                pool = self._pool_for(request.schedule)
                if pool is None:
                    held.append(request)
                    break
                if not pool.free:
                    held.append(request)
                    continue
                self._start(pool, request)
            except Exception as err:  # an engine that cannot be built, say: this request fails, not the loop
                logger.exception("a request could not be admitted (schedule %r)", request.schedule)
                request.emit(Event(finish_reason="error", error=f"{type(err).__name__}: {err}"))
        self.waiting = held + self.waiting

    def _start(self, pool: Pool, request: ServeRequest) -> None:
        """Give a request a slot and queue its prefill."""
        slot = pool.free.pop()
        try:
            ids = torch.tensor(request.prompt, dtype=torch.long, device=self.adapter.device)
            if request.sampling.do_sample:
                request.generator = request.sampling.generators(1, self.adapter.device)[0]
            hit = self._reusable(pool, request)
            if hit is None:
                run = pool.engine.prefill_layers([ids], [slot], ids=[0])  # each request is sequence 0 of its own
            else:
                held, request.reused = hit
                pool.engine.resume(slot, held, request.reused)
                run = _extend(pool.engine, slot, ids[request.reused:])
                self.observe("prefix_hits", 1)
                self.observe("prefix_tokens_reused", request.reused)
        except Exception:
            pool.free.append(slot)
            raise
        request.slot = slot
        pool.prefilling.append((request, run))

    def _reusable(self, pool: Pool, request: ServeRequest) -> tuple[Held, int] | None:
        """A cached prefix for the request's prompt, where reusing it gives what a fresh prefill gives (nothing
        pruned, fresh or cached) or the server allows pruned reuse."""
        engine = pool.engine
        exact = engine.schedule.is_dense or len(request.prompt) < engine.min_prompt
        if not self.config.min_reuse_tokens or not (exact or self.config.reuse_pruned):
            return None
        return self.prefixes.match(pool.schedule, request.prompt, pruned=not exact)

    def _pool_for(self, spec: str) -> Pool | None:
        """The engine of a schedule, built when there is room for its slots (dropping an idle one if needed)."""
        key = spec or self.config.schedule
        if key in self.pools:
            return self.pools[key]
        in_use = sum(p.engine.cache.batch for p in self.pools.values())
        idle = [k for k, p in self.pools.items() if not p.busy]
        while idle and (len(self.pools) >= self.config.max_schedules
                        or in_use + self.config.max_batch > self.slots_budget):
            in_use -= self.pools.pop(idle.pop()).engine.cache.batch
        if len(self.pools) >= self.config.max_schedules:
            return None
        batch = min(self.config.max_batch, self.slots_budget - in_use)
        if batch < 1:
            return None
        engine = self.make_engine(self.adapter, self.parse(spec), self.capacity, self.decode_options, batch)
        engine.cache.reserve()  # the pool's memory is taken once, here, not as its slots fill
        pool = self.pools[key] = Pool(engine, list(range(batch))[::-1], key)
        self.prefixes.evict(self._prefix_budget())  # its slots come out of the cached prefixes' share
        self.observe("prefix_cache_bytes", self.prefixes.nbytes)
        return pool

    def _drop_cancelled(self) -> None:
        for pool in self.pools.values():
            for request in list(pool.decoding.values()):
                if request.cancelled:
                    self._finish(pool, request, "cancelled")
            kept = deque()
            for request, run in pool.prefilling:
                if request.cancelled:
                    run.close()
                    pool.free.append(request.slot)
                    request.emit(Event(finish_reason="cancelled"))
                else:
                    kept.append((request, run))
            pool.prefilling = kept

    def _prefill_chunk(self, pool: Pool) -> None:
        """Layers of the oldest prefill until `prefill_chunk` rows x layers; at its end, its first token."""
        if not pool.prefilling:
            return
        request, run = pool.prefilling[0]
        done = 0
        try:
            while done < self.config.prefill_chunk:
                done += next(run)
            return
        except StopIteration as finished:
            logits, stats = finished.value
        pool.prefilling.popleft()
        pool.decoding[request.slot] = request  # from here a failure finds it there
        pool.engine.settle()
        request.prefill = stats[0]
        self.observe("prefill_rows_saved", len(stats[0].computed) * len(request.prompt) - sum(stats[0].computed))
        self._take(pool, request, self._choose(logits, [request])[0])

    def _decode_step(self, pool: Pool) -> None:
        if not pool.decoding:
            return
        slots = sorted(pool.decoding)
        requests = [pool.decoding[s] for s in slots]
        tokens = torch.tensor([r.new_tokens[-1] for r in requests], device=self.adapter.device)
        logits, stats = pool.engine.decode(tokens, slots)
        for request, step, token in zip(requests, stats, self._choose(logits, requests), strict=True):
            revived = sum(step.revived)
            request.revived += revived
            self.observe("revived_rows", revived)
            self._take(pool, request, token)

    def _choose(self, logits: torch.Tensor, requests: list[ServeRequest]) -> list[int]:
        """logits: [A, vocab] -> one token per request, each by its own sampling parameters."""
        tokens = logits.argmax(dim=-1).tolist()
        for i, r in enumerate(requests):
            if r.sampling.do_sample:
                probs = r.sampling.warpers()(None, logits[i : i + 1]).softmax(dim=-1)
                tokens[i] = int(torch.multinomial(probs[0], 1, generator=r.generator))
        return tokens

    def _take(self, pool: Pool, request: ServeRequest, token: int) -> None:
        """Record a new token: stream its text, and finish the request at EOS, a stop string or its length."""
        now = time.perf_counter()
        if request.first_token_s is None:
            request.first_token_s = now - request.arrived
            self.observe("ttft", request.first_token_s)
        else:
            self.observe("inter_token", now - request.last_token_at)
        request.last_token_at = now
        self.observe("tokens", 1)
        request.new_tokens.append(token)
        if token in self.eos:
            self._finish(pool, request, "stop")
            return
        text = self.tokenizer.decode(request.new_tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
        last = cut >= 0 or len(request.new_tokens) == request.max_new_tokens
        # text that may still become part of a stop string, or an incomplete character, waits for the next token
        shown = text[:cut] if cut >= 0 else text if last else text[: len(text) - request.held_back]
        if last or not shown.endswith("\ufffd"):
            delta, request.text = shown[len(request.text):], shown
            request.emit(Event(token=token, text=delta))
        if last:
            self._finish(pool, request, "stop" if cut >= 0 else "length")

    def _finish(self, pool: Pool, request: ServeRequest, reason: str) -> None:
        pool.decoding.pop(request.slot, None)
        if reason in ("stop", "length") and self.config.min_reuse_tokens and request.cached:
            self._keep(pool, request)
        pool.free.append(request.slot)
        request.emit(Event(finish_reason=reason))

    def _keep(self, pool: Pool, request: ServeRequest) -> None:
        """Cache what a finished request computed (its prompt and every answer token fed back) for later prompts
        that may reuse it, within what the K/V budget leaves beside the engines' slots."""
        if pool.engine.prunes(request.slot) and not self.config.reuse_pruned:
            return  # no request could reuse it: do not copy it
        n = int(pool.engine.cache.length[request.slot])
        ids = (request.prompt + request.new_tokens)[:n]
        self.prefixes.store(pool.schedule, ids, pool.engine.hold(request.slot, n), self._prefix_budget())
        self.observe("prefix_cache_bytes", self.prefixes.nbytes)

    def _prefix_budget(self) -> float:
        """Bytes the cached prefixes may take: what kv_budget_gb leaves beside the engines' slots (without a budget,
        as much as max_batch slots)."""
        if self.config.kv_budget_gb is None:
            return self.config.max_batch * self.slot_bytes
        slots = sum(p.engine.cache.batch for p in self.pools.values())
        return self.config.kv_budget_gb * 2**30 - slots * self.slot_bytes

    def _fail_all(self, message: str) -> None:
        """A step raised: its engines' state is unknown, so every running request fails and the engines go (new
        ones are built for the next requests)."""
        with self._lock:
            pools, self.pools = list(self.pools.values()), {}
        for pool in pools:
            for request in pool.decoding.values():
                request.emit(Event(finish_reason="error", error=message))
            for request, run in pool.prefilling:
                run.close()
                request.emit(Event(finish_reason="error", error=message))


def _extend(engine: Engine, slot: int, ids: torch.Tensor) -> Generator[int, None, tuple[torch.Tensor, list]]:
    """Engine.extend_layers in prefill_layers' form: its stats as a list of one."""
    logits, stats = yield from engine.extend_layers(slot, ids)
    return logits, [stats]


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where the C library has it (Linux with glibc); None elsewhere."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return getattr(libc, "malloc_trim", None)


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS whenever the server idles. Prefill and decoding on the CPU
    allocate large buffers of varying sizes, which glibc keeps after they are freed: the CPU soak's server held
    1,592 MB idle after warm-up without this, 1,424 MB with it."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def slot_bytes(a: LlamaAdapter, capacity: int) -> int:
    """K/V, Aux Cache and depth of one slot of `capacity` positions (LazyCache's layout)."""
    per_position = (2 * a.num_layers * a.num_kv_heads * a.head_dim + a.hidden_size) * a.dtype.itemsize + 4
    return (capacity + 1) * per_position
