"""Tensor-parallel serving: rank 0 runs the server and its scheduler, and every other rank repeats its engine calls.

The scheduler (serving.py) decides everything on rank 0: which requests run, in which slots, with which tokens
(sampled there). Each engine call of its that changes an engine's state is first sent to the other ranks (`Leader`,
`MirroredEngine`), which make the same call on engines of their own (`Follower`), so that the collectives inside
(the row-parallel all-reduces, the scores' all-reduce, the selection check) meet. Calls that only read host state
(`prunes`, `cache.length`) stay on rank 0. What rank 0 lets go (an engine dropped, a cached prefix evicted, an
unfinished prefill) is freed on the other ranks with the next message.

Messages go over a gloo group of their own with no practical time limit, since a server may idle for hours; a rank
that dies closes it, and the others fail at once (torchrun then stops the job). Tensors travel as lists of ids and
are rebuilt on each rank's own device.
"""

from __future__ import annotations

import itertools
import weakref
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .adapters import LlamaAdapter
from .engine import DecodeOptions, Engine, Held, StepStats
from .schedule import Schedule

# Followers wait for rank 0's next call for as long as the server idles
IDLE_TIMEOUT = timedelta(days=365)


def control_group() -> dist.ProcessGroup:
    """The group that carries engine calls from rank 0 (a collective: every rank calls it, at the same point)."""
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


@dataclass(frozen=True)
class Call:
    """One message from rank 0: `op` on `key` (an engine, a layer-by-layer run or a held prefix) with host-only
    `args`, and the (kind, key) pairs that rank 0 no longer holds."""

    op: str
    key: int
    args: tuple = ()
    forget: tuple[tuple[str, int], ...] = ()


class Leader:
    """Rank 0's side: builds mirrored engines and sends their calls, in the order the scheduler makes them."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.keys = itertools.count()
        self._forgotten: deque[tuple[str, int]] = deque()  # appended by finalizers, from any thread

    def engine(self, adapter: LlamaAdapter, schedule: Schedule, capacity: int, decode: DecodeOptions,
               batch: int) -> MirroredEngine:
        """serving.Scheduler's engine factory: an Engine here, and the same on every other rank."""
        key = next(self.keys)
        self.send(Call("engine", key, (schedule, capacity, decode, batch)))
        return MirroredEngine(self, key, Engine(adapter, schedule, capacity, decode=decode, batch=batch))

    def send(self, call: Call) -> None:
        forget = []
        while self._forgotten:
            forget.append(self._forgotten.popleft())
        dist.broadcast_object_list([Call(call.op, call.key, call.args, tuple(forget))], src=0, group=self.group)

    def forget(self, kind: str, key: int) -> None:
        self._forgotten.append((kind, key))

    def stop(self) -> None:
        """End every follower's loop."""
        self.send(Call("stop", -1))


@dataclass(frozen=True, eq=False)
class MirroredHeld:
    """A prefix held on rank 0 (Engine.hold), and the key under which the other ranks hold theirs."""

    held: Held
    key: int

    @property
    def nbytes(self) -> int:
        return self.held.nbytes

    @property
    def pruned(self) -> bool:
        return self.held.pruned


class MirroredEngine:
    """An Engine on rank 0 whose state-changing calls the other ranks repeat: what serving.Scheduler calls."""

    def __init__(self, leader: Leader, key: int, engine: Engine) -> None:
        self.leader, self.key, self.engine = leader, key, engine
        self.cache, self.schedule, self.min_prompt = engine.cache, engine.schedule, engine.min_prompt
        weakref.finalize(self, leader.forget, "engine", key)

    def prunes(self, slot: int) -> bool:
        return self.engine.prunes(slot)

    def prefill_layers(self, prompts: list[torch.Tensor], slots: list[int] | None = None,
                       ids: list[int] | None = None) -> Generator[int, None, tuple[torch.Tensor, list[StepStats]]]:
        args = ([p.tolist() for p in prompts], slots, ids)
        return self._mirrored("prefill_layers", args, self.engine.prefill_layers(prompts, slots, ids))

    def extend_layers(self, slot: int, tokens: torch.Tensor) -> Generator[int, None, tuple[torch.Tensor, StepStats]]:
        return self._mirrored("extend_layers", (slot, tokens.tolist()), self.engine.extend_layers(slot, tokens))

    def settle(self) -> None:
        self.leader.send(Call("settle", self.key))
        self.engine.settle()

    def decode(self, tokens: torch.Tensor, seqs: list[int]) -> tuple[torch.Tensor, list[StepStats]]:
        self.leader.send(Call("decode", self.key, (tokens.tolist(), list(seqs))))
        return self.engine.decode(tokens, seqs)

    def hold(self, slot: int, length: int) -> MirroredHeld:
        key = next(self.leader.keys)
        self.leader.send(Call("hold", self.key, (key, slot, length)))
        held = MirroredHeld(self.engine.hold(slot, length), key)
        weakref.finalize(held, self.leader.forget, "held", key)
        return held

    def resume(self, slot: int, held: MirroredHeld, length: int) -> None:
        self.leader.send(Call("resume", self.key, (slot, held.key, length)))
        self.engine.resume(slot, held.held, length)

    def _mirrored(self, method: str, args: tuple, run: Generator) -> Generator:
        """`run` (the engine's own `method`, layer by layer), each of whose steps the other ranks take too. Nothing
        is sent before its first step: a run dropped before it starts costs the others nothing."""
        key = next(self.leader.keys)
        self.leader.send(Call(method, self.key, (key, *args)))
        finished = False
        try:
            while True:
                self.leader.send(Call("next", key))
                try:
                    rows = next(run)
                except StopIteration as done:
                    finished = True
                    return done.value
                yield rows
        finally:
            if not finished:  # dropped midway (a cancelled request), or failed here and on every rank
                run.close()
                self.leader.send(Call("close", key))


class Follower:
    """Every other rank's side: makes rank 0's engine calls on its own engines, until rank 0 stops."""

    def __init__(self, adapter: LlamaAdapter, group: dist.ProcessGroup) -> None:
        self.adapter, self.group = adapter, group
        self.engines: dict[int, Engine] = {}
        self.runs: dict[int, Generator] = {}
        self.held: dict[int, Held] = {}

    def run(self) -> None:
        """Follow until rank 0 sends stop. A call that raises here raised on rank 0 too (the same call on the same
        state), where the scheduler fails its requests and drops its engines: the loop goes on."""
        handlers = {"engine": self.on_engine, "prefill_layers": self.on_prefill, "extend_layers": self.on_extend,
                    "next": self.on_next, "close": self.on_close, "settle": self.on_settle, "decode": self.on_decode,
                    "hold": self.on_hold, "resume": self.on_resume}
        with torch.inference_mode():
            while True:
                box: list[Call | None] = [None]
                dist.broadcast_object_list(box, src=0, group=self.group)
                call = box[0]
                for kind, key in call.forget:
                    {"engine": self.engines, "held": self.held}[kind].pop(key, None)
                if call.op == "stop":
                    return
                try:
                    handlers[call.op](call.key, *call.args)
                except Exception:
                    if call.op == "next":  # rank 0 drops the run too
                        self.runs.pop(call.key, None)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.adapter.device)

    def on_engine(self, key: int, schedule: Schedule, capacity: int, decode: DecodeOptions, batch: int) -> None:
        engine = self.engines[key] = Engine(self.adapter, schedule, capacity, decode=decode, batch=batch)
        engine.cache.reserve()  # as the scheduler does on rank 0

    def on_prefill(self, key: int, run: int, prompts: list[list[int]], slots: list[int] | None,
                   ids: list[int] | None) -> None:
        self.runs[run] = self.engines[key].prefill_layers([self._ids(p) for p in prompts], slots, ids)

    def on_extend(self, key: int, run: int, slot: int, tokens: list[int]) -> None:
        self.runs[run] = self.engines[key].extend_layers(slot, self._ids(tokens))

    def on_next(self, run: int) -> None:
        try:
            next(self.runs[run])
        except StopIteration:
            del self.runs[run]

    def on_close(self, run: int) -> None:
        if run in self.runs:
            self.runs.pop(run).close()

    def on_settle(self, key: int) -> None:
        self.engines[key].settle()

    def on_decode(self, key: int, tokens: list[int], seqs: list[int]) -> None:
        self.engines[key].decode(self._ids(tokens), seqs)

    def on_hold(self, key: int, held: int, slot: int, length: int) -> None:
        self.held[held] = self.engines[key].hold(slot, length)

    def on_resume(self, key: int, slot: int, held: int, length: int) -> None:
        self.engines[key].resume(slot, self.held[held], length)
