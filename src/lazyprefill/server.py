"""`lazyprefill serve`: OpenAI's chat and completions protocol over the continuous-batching scheduler (serving.py).

FastAPI parses and validates, the scheduler's thread runs the model, and each request's events cross from that
thread to the event loop through an asyncio queue. Errors have OpenAI's body ({"error": {"message", "type",
"param", "code"}}); a client that leaves a stream cancels its request, which frees its slot at the next step.
A body over the server's limit is refused (413) before anything parses it (BodyLimit), and a request's schedule
never names a file on the server (Scheduler.parse).
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
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from .generation import SamplingParams
from .serving import Event, Refused, Scheduler, ServeRequest

RETRY_AFTER_S = 1
# The largest request body by default: a 128K-token prompt is about 0.5 MB of text, or 0.9 MB as token ids.
MAX_REQUEST_BYTES = 16 * 2**20


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
    seed: Annotated[int, Field(ge=0, lt=2**62)] | None = None  # torch seeds sequence i with seed + i
    stop: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                          Field(max_length=4)] | None = None
    n: Literal[1] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    schedule: str | None = None  # lazyprefill's: a preset, a spec or a registered name, never a path


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
        self.tokens_per_s.set_function(self._rate)
        self.saved = Counter("lazyprefill_prefill_rows_saved", "Prefill (token, layer) rows not computed",
                             registry=r)
        self.revived = Counter("lazyprefill_revived_rows", "Rows resumed from the Aux Cache in decoding steps",
                               registry=r)
        self.requests = Counter("lazyprefill_requests", "Requests ended, by finish reason or HTTP status",
                                ["outcome"], registry=r)
        self.prefix_hits = Counter("lazyprefill_prefix_hits", "Requests prefilled from a cached prefix", registry=r)
        self.prefix_reused = Counter("lazyprefill_prefix_tokens_reused", "Prompt tokens taken from cached prefixes",
                                     registry=r)
        self.prefix_bytes = Gauge("lazyprefill_prefix_cache_bytes", "Memory of the cached prefixes", registry=r)
        self._recent: deque[float] = deque()  # perf_counter() of the tokens of the last 10 s
        self.sinks: dict[str, Callable[[float], None]] = {
            "ttft": self.ttft.observe, "inter_token": self.inter_token.observe, "queue": self.queue.set,
            "running": self.running.set, "tokens": self._tokens, "prefill_rows_saved": self.saved.inc,
            "revived_rows": self.revived.inc, "prefix_hits": self.prefix_hits.inc,
            "prefix_tokens_reused": self.prefix_reused.inc, "prefix_cache_bytes": self.prefix_bytes.set,
        }

    def observe(self, name: str, value: float) -> None:
        """The scheduler's hook (its thread): one of `sinks`' names and a value."""
        self.sinks[name](value)

    def _tokens(self, count: float) -> None:
        self.tokens.inc(count)
        self._recent.append(time.perf_counter())

    def _rate(self) -> float:
        """Tokens of the last 10 s, per second, when scraped (so an idle server reads 0)."""
        now = time.perf_counter()
        while self._recent and now - self._recent[0] > 10:
            self._recent.popleft()
        return len(self._recent) / 10


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object; its type as OpenAI names them (404, an unknown path, is an invalid request too)."""
    kind = ("rate_limit_error" if status == 429 else "invalid_request_error" if 400 <= status < 500
            else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before the app parses or tokenizes any of it, at
    once by its Content-Length, or, for a body without one (chunked), as soon as more than `limit` bytes have come,
    so that the server never holds much more than `limit` of a body. A body within the limit reaches the app as one
    message, and then `receive` as it was (where a plain request's handler hears the client leave)."""

    def __init__(self, app: ASGIApp, limit: int, refused: Callable[[], None]) -> None:
        self.app, self.limit, self.refused = app, limit, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        body = None if length.isdigit() and int(length) > self.limit else await self.read(receive)
        if body is None:
            self.refused()
            message = f"the request body is larger than this server's limit of {self.limit} bytes"
            await JSONResponse(error_body(message, 413), 413)(scope, receive, send)
            return
        if body["type"] == "http.disconnect":  # the client left while sending: nobody to answer
            return
        given = False

        async def replay() -> ASGIMessage:
            nonlocal given
            if given:
                return await receive()
            given = True
            return body

        await self.app(scope, replay, send)

    async def read(self, receive: Receive) -> ASGIMessage | None:
        """The whole body as one message (or the client's leaving, as it came), or None once it passes the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}


def create_app(scheduler: Scheduler, model_name: str, max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The OpenAI-compatible app over a running scheduler (the caller closes it): routes only; `Endpoints` answers.
    A request body over `max_request_bytes` gets 413 (BodyLimit)."""
    app = FastAPI(title="lazyprefill", docs_url=None, redoc_url=None)
    api = Endpoints(scheduler, model_name, Metrics(CollectorRegistry()))
    app.add_middleware(BodyLimit, limit=max_request_bytes, refused=api.metrics.requests.labels("413").inc)
    app.exception_handler(StarletteHTTPException)(api.http_error)
    app.exception_handler(RequestValidationError)(api.invalid)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **await run_in_threadpool(scheduler.stats)}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(api.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "lazyprefill"}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, http: Request):
        return await api.chat(body, http)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: Request):
        return await api.completions(body, http)

    return app


class Endpoints:
    """What the app's routes do: tokenize, submit to the scheduler, and answer in one piece or as a stream."""

    def __init__(self, scheduler: Scheduler, model_name: str, metrics: Metrics) -> None:
        self.scheduler, self.model_name, self.metrics = scheduler, model_name, metrics
        self.tokenizer = scheduler.tokenizer
        scheduler.observe = metrics.observe

    def refuse(self, err: Refused) -> JSONResponse:
        self.metrics.requests.labels(str(err.status)).inc()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None
        return JSONResponse(error_body(str(err), err.status, err.param, err.code), err.status, headers=headers)

    async def http_error(self, _request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(err.detail), err.status_code), err.status_code, headers=err.headers)

    async def invalid(self, _request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        self.metrics.requests.labels("400").inc()
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"the body is not valid JSON: {first.get('msg', '')}", 400), 400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, 400, where or None), 400)

    async def chat(self, body: ChatRequest, http: Request):
        tok = self.tokenizer
        if getattr(tok, "chat_template", None) is None:
            return self.refuse(Refused("this model has no chat template: use /v1/completions", param="messages"))
        text = tok.apply_chat_template([m.model_dump() for m in body.messages], add_generation_prompt=True,
                                       tokenize=False)
        return await self.respond(body, tok(text, add_special_tokens=False)["input_ids"], "chat.completion", http)

    async def completions(self, body: CompletionRequest, http: Request):
        ids = body.prompt if isinstance(body.prompt, list) else self.tokenizer(body.prompt)["input_ids"]
        if not ids:
            return self.refuse(Refused("the prompt is empty", param="prompt"))
        if max(ids) >= self.scheduler.adapter.vocab_size or min(ids) < 0:
            return self.refuse(Refused("a prompt token id is outside the vocabulary", param="prompt"))
        return await self.respond(body, ids, "text_completion", http)

    async def respond(self, body: Sampling, ids: list[int], kind: str, http: Request):
        """Submit (in a worker thread: the scheduler's lock may be held while it builds an engine), then stream
        the events or gather them into one answer."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # the scheduler's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                request.cancel()

        try:
            request = ServeRequest(
                prompt=ids, max_new_tokens=_max_tokens(body, self.scheduler.config.max_new_tokens),
                sampling=_sampling(body), schedule=body.schedule or "",
                stop=(body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ()), emit=emit)
            await run_in_threadpool(self.scheduler.submit, request)
        except Refused as err:
            return self.refuse(err)
        reply = Reply(request, kind, self.model_name, len(ids), self.scheduler.parse(body.schedule).describe())
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self.stream(reply, events, usage), media_type="text/event-stream")
        event = await self.gather(request, events, http)
        self.metrics.requests.labels(event.finish_reason).inc()
        if event.finish_reason in ENDED_BY_SERVER:
            return ended_by_server(event)
        return reply.whole(event.finish_reason)

    async def gather(self, request: ServeRequest, events: asyncio.Queue[Event], http: Request) -> Event:
        """The last event of a request answered in one piece; a client that leaves meanwhile cancels it (a task
        waits for the disconnect message, as StreamingResponse does for streams)."""

        async def watch() -> None:
            while (await http.receive())["type"] != "http.disconnect":
                pass
            request.cancel()

        watcher = asyncio.create_task(watch())
        try:
            while (event := await events.get()).finish_reason is None:
                pass
            return event
        finally:
            watcher.cancel()

    async def stream(self, reply: Reply, events: asyncio.Queue[Event], usage: bool) -> AsyncIterator[str]:
        finish = None
        try:
            yield sse(reply.chunk(role=True, usage=usage))
            while (event := await events.get()).finish_reason is None:
                if event.text:  # a token whose text is held back (a stop string may begin) sends nothing yet
                    yield sse(reply.chunk(text=event.text, usage=usage))
            finish = event.finish_reason
            if finish in ENDED_BY_SERVER:
                yield sse(json.loads(ended_by_server(event).body))
            else:
                yield sse(reply.chunk(finish=finish, usage=usage))
                if usage:
                    yield sse(reply.usage_chunk())
            yield "data: [DONE]\n\n"
        finally:
            if finish is None:  # the client left: free the slot
                reply.request.cancel()
                finish = "cancelled"
            self.metrics.requests.labels(finish).inc()


# A request the server ended: a failed step (500), or the server shutting down (503).
ENDED_BY_SERVER = ("error", "cancelled")


def ended_by_server(event: Event) -> JSONResponse:
    if event.finish_reason == "error":
        return JSONResponse(error_body(event.error or "the model failed", 500), 500)
    return JSONResponse(error_body("the server is shutting down", 503), 503, headers={"Retry-After": "1"})


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
                "total_tokens": self.prompt_tokens + done,
                "prompt_tokens_details": {"cached_tokens": self.request.reused}}  # OpenAI's: a reused prefix

    def figures(self) -> dict:
        """lazyprefill's own: the schedule, time to first token, prefill work (share of dense), rows revived."""
        r = self.request
        return {"schedule": self.schedule, "ttft_s": r.first_token_s, "prefill_work": r.prefill_work,
                "revived_rows": r.revived}

    def whole(self, finish: str) -> dict:
        text = self.request.text
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                   "finish_reason": finish} if self.kind == "chat.completion"
                  else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
        return {**self._base(self.kind), "choices": [choice], "usage": self.usage(), "lazyprefill": self.figures()}

    def chunk(self, text: str = "", role: bool = False, finish: str | None = None, usage: bool = False) -> dict:
        """A streamed chunk; with `usage` (stream_options.include_usage) it carries "usage": null, as OpenAI's do."""
        if self.kind == "chat.completion":
            delta = {"role": "assistant", "content": ""} if role else ({} if finish else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out = {**self._base("chat.completion.chunk"), "choices": [choice]}
        else:
            out = {**self._base("text_completion"),
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if usage:
            out["usage"] = None
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
