"""`lazyprefill serve`: OpenAI's chat and completions protocol over the continuous-batching scheduler (serving.py).

FastAPI parses and validates, the scheduler's thread runs the model, and each request's events cross from that
thread to the event loop through an asyncio queue. Errors have OpenAI's body ({"error": {"message", "type",
"param", "code"}}); a client that leaves a stream cancels its request, which frees its slot at the next step.
Prometheus metrics live in a registry of the app's own, so that several apps can run in one process (tests).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from .generation import SamplingParams
from .serving import Event, Refused, Scheduler, ServeRequest

RETRY_AFTER_S = 1


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class Sampling(BaseModel):
    """The request fields both endpoints share. Fields OpenAI has and we do not use are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=1)] | None = None  # not OpenAI's; vLLM and others take it
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    schedule: str | None = None  # lazyprefill's: any string `lazyprefill generate --schedule` takes


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]


class CompletionRequest(Sampling):
    prompt: str | list[int]


@dataclass
class Metrics:
    """What /metrics shows, fed by the scheduler's `observe(name, value)`."""

    registry: CollectorRegistry

    def __post_init__(self) -> None:
        r = self.registry
        self.ttft = Histogram("lazyprefill_ttft_seconds", "Arrival to first token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
        self.inter_token = Histogram("lazyprefill_inter_token_seconds", "Time between two tokens of a request",
                                     registry=r, buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.queue = Gauge("lazyprefill_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("lazyprefill_running_requests", "Requests prefilling or decoding", registry=r)
        self.tokens = Counter("lazyprefill_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_s = Gauge("lazyprefill_tokens_per_second", "Tokens generated over the last 10 s, per s",
                                  registry=r)
        self.saved = Counter("lazyprefill_prefill_rows_saved", "Prefill (token, layer) rows not computed",
                             registry=r)
        self.revived = Counter("lazyprefill_revived_rows", "Rows resumed from the Aux Cache in decoding steps",
                               registry=r)
        self.requests = Counter("lazyprefill_requests", "Requests ended, by finish reason or HTTP status",
                                ["outcome"], registry=r)
        self._recent: deque[float] = deque()  # perf_counter() of the tokens of the last 10 s
        self.sinks: dict[str, Callable[[float], None]] = {
            "ttft": self.ttft.observe, "inter_token": self.inter_token.observe, "queue": self.queue.set,
            "running": self.running.set, "tokens": self._tokens, "prefill_rows_saved": self.saved.inc,
            "revived_rows": self.revived.inc,
        }

    def observe(self, name: str, value: float) -> None:
        """The scheduler's hook (its thread): one of `sinks`' names and a value."""
        self.sinks[name](value)

    def _tokens(self, count: float) -> None:
        self.tokens.inc(count)
        now = time.perf_counter()
        self._recent.append(now)
        while now - self._recent[0] > 10:
            self._recent.popleft()
        self.tokens_per_s.set(len(self._recent) / 10)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(scheduler: Scheduler, model_name: str) -> FastAPI:
    """The OpenAI-compatible app over a running scheduler (the caller closes it)."""
    app = FastAPI(title="lazyprefill", docs_url=None, redoc_url=None)
    metrics = Metrics(CollectorRegistry())
    scheduler.observe = metrics.observe
    tokenizer = scheduler.tokenizer

    def refuse(err: Refused) -> JSONResponse:
        metrics.requests.labels(str(err.status)).inc()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None
        return JSONResponse(error_body(str(err), err.status, err.param, err.code), err.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        metrics.requests.labels("400").inc()
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('msg', '')}", 400), 400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, 400, where or None), 400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **scheduler.stats()}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "lazyprefill"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        if getattr(tokenizer, "chat_template", None) is None:
            return refuse(Refused("this model has no chat template: use /v1/completions", param="messages"))
        text = tokenizer.apply_chat_template([m.model_dump() for m in body.messages], add_generation_prompt=True,
                                             tokenize=False)
        return await respond(body, tokenizer(text, add_special_tokens=False)["input_ids"], "chat.completion")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        ids = body.prompt if isinstance(body.prompt, list) else tokenizer(body.prompt)["input_ids"]
        if not ids:
            return refuse(Refused("the prompt is empty", param="prompt"))
        if max(ids) >= scheduler.adapter.vocab_size or min(ids) < 0:
            return refuse(Refused("a prompt token id is outside the vocabulary", param="prompt"))
        return await respond(body, ids, "text_completion")

    async def respond(body: Sampling, ids: list[int], kind: str):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            request = ServeRequest(
                prompt=ids, max_new_tokens=_max_tokens(body, scheduler.config.max_new_tokens),
                sampling=_sampling(body), schedule=body.schedule or "",
                stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()),
                emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
            scheduler.submit(request)
        except Refused as err:
            return refuse(err)
        reply = Reply(request, kind, model_name, len(ids), scheduler.parse(body.schedule).describe())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(stream(reply, events, usage), media_type="text/event-stream")
        while (event := await events.get()).finish_reason is None:
            pass
        metrics.requests.labels(event.finish_reason).inc()
        if event.finish_reason == "error":
            return JSONResponse(error_body(event.error or "the model failed", 500), 500)
        return reply.whole(event.finish_reason)

    async def stream(reply: Reply, events: asyncio.Queue[Event], usage: bool) -> AsyncIterator[str]:
        finish = None
        try:
            yield sse(reply.chunk(role=True))
            while (event := await events.get()).finish_reason is None:
                if event.text:  # a token whose text is held back (a stop string may begin) sends nothing yet
                    yield sse(reply.chunk(text=event.text))
            finish = event.finish_reason
            if finish == "error":
                yield sse(error_body(event.error or "the model failed", 500))
            else:
                yield sse(reply.chunk(finish=finish))
                if usage:
                    yield sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            if finish is None:  # the client left: free the slot
                reply.request.cancel()
                finish = "cancelled"
            metrics.requests.labels(finish).inc()

    return app


@dataclass
class Reply:
    """Builds a request's OpenAI response objects (whole, or streamed chunk by chunk)."""

    request: ServeRequest
    kind: str  # "chat.completion" or "text_completion"
    model: str
    prompt_tokens: int
    schedule: str

    def __post_init__(self) -> None:
        prefix = "chatcmpl" if self.kind == "chat.completion" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self) -> dict:
        done = len(self.request.new_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}

    def figures(self) -> dict:
        """lazyprefill's own: the schedule, time to first token, prefill work (share of dense), rows revived."""
        r = self.request
        return {"schedule": self.schedule, "ttft_s": r.first_token_s, "prefill_work": r.prefill_work,
                "revived_rows": r.revived}

    def whole(self, finish: str) -> dict:
        text = self.request.text
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if self.kind == "chat.completion" else {"index": 0, "text": text, "finish_reason": finish})
        return {**self._base(self.kind), "choices": [choice], "usage": self.usage(), "lazyprefill": self.figures()}

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None) -> dict:
        if self.kind == "chat.completion":
            delta = {"role": "assistant", "content": ""} if role else ({} if finish else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            out = {**self._base("chat.completion.chunk"), "choices": [choice]}
        else:
            out = {**self._base("text_completion"), "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
        if finish:
            out["lazyprefill"] = self.figures()
        return out

    def usage_chunk(self) -> dict:
        kind = "chat.completion.chunk" if self.kind == "chat.completion" else "text_completion"
        return {**self._base(kind), "choices": [], "usage": self.usage()}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _max_tokens(body: Sampling, default: int) -> int:
    value = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if value is None:
        return default
    if value <= 0:
        raise Refused(f"max_tokens must be at least 1, got {value}", param="max_tokens")
    return value


def _sampling(body: Sampling) -> SamplingParams:
    """OpenAI's fields as SamplingParams: temperature 1 when not given, as OpenAI samples; 0 is greedy."""
    temperature = 1.0 if body.temperature is None else body.temperature
    if temperature == 0:
        return SamplingParams(seed=body.seed)
    return SamplingParams(do_sample=True, temperature=temperature, top_k=body.top_k, top_p=body.top_p,
                          seed=body.seed)
