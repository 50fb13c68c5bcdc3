"""The OpenAI-compatible HTTP API (FastAPI under uvicorn), the dashboard and /metrics;
Ollama's API is mounted beside it from coordinator/ollama_api.py.

Thin edge: validate the body, tokenize, wait for a pipeline slot, run the request on the
pipeline and shape the answer, streamed as server-sent events or whole. Errors use OpenAI's
error JSON: {"error": {"message", "type", "param", "code"}}.

Text leaves through one path for streaming and non-streaming requests alike: an incremental
detokenizer (never splits a multi-byte character) followed by a stop-string matcher (holds
back any tail that may be the start of a stop string, cuts exactly before a match).

A streaming response watches the client: when it disconnects, the generation is cancelled,
which sends a RELEASE down the pipeline and frees the request's KV cache on every stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from coordinator.dashboard import STATIC_DIR
from coordinator.dashboard.state import (
    AlertLog,
    NodeMonitor,
    build_state,
    current_alerts,
    hop_estimate,
    links_of,
)
from coordinator.httpsec import BodyLimit
from coordinator.metrics import CONTENT_TYPE, RequestTrace, ServingMetrics
from coordinator.pipeline import GenerationParams, Pipeline, PipelineError
from coordinator.router import ReplicaRouter
from coordinator.shipboard import ShipBoard
from coordinator.supervisor import Supervisor

if TYPE_CHECKING:
    from coordinator.session import ModelInfo

log = logging.getLogger(__name__)

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = dict(headers or {})


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ----- request bodies ------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(system|user|assistant|tool|developer)$")
    content: str | list[dict[str, Any]] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None


# ----- admission -----------------------------------------------------------------------------


class QueueFull(Exception):
    pass


class Admission:
    """At most `max_running` requests on the pipeline, at most `max_waiting` more in line
    (first come, first served); beyond that a request is turned away at once."""

    def __init__(self, max_running: int = 16, max_waiting: int = 64) -> None:
        if max_running < 1 or max_waiting < 0:
            raise ValueError("max_running must be >= 1 and max_waiting >= 0")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._sem = asyncio.Semaphore(max_running)

    async def acquire(self) -> None:
        """Wait for a slot; raises QueueFull (before waiting) when the line is full."""
        if self.running + self.waiting >= self.max_running + self.max_waiting:
            raise QueueFull
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._sem.release()


# ----- text: incremental detokenizing and stop strings ---------------------------------------


class IncrementalDetokenizer:
    """The text of a growing token sequence, one piece per token, never splitting a multi-byte
    character: a piece is released only once its decoded text no longer ends in U+FFFD.

    Each decode covers only the tokens since the previous release plus that release itself
    (as context, so tokenizers that treat a leading space specially decode consistently)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._prefix = 0  # tokens[_prefix:_read] were released last; kept as context
        self._read = 0  # tokens[_read:] are not released yet

    def add(self, token: int) -> str:
        self._tokens.append(token)
        before = self._decode(self._tokens[self._prefix : self._read])
        text = self._decode(self._tokens[self._prefix :])
        if len(text) > len(before) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._tokens)
            return text[len(before) :]
        return ""

    def flush(self) -> str:
        """What is still held at the end (an incomplete character comes out as U+FFFD)."""
        before = self._decode(self._tokens[self._prefix : self._read])
        text = self._decode(self._tokens[self._prefix :])
        self._prefix = self._read = len(self._tokens)
        return text[len(before) :]


class StopMatcher:
    """Cuts text exactly before the first stop string; holds back any tail that could be the
    beginning of a stop string until the next piece decides it."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to release now, and True when a stop string ended the text."""
        buf = self._held + text
        if not self.stops:
            return buf, False
        cut = min((i for s in self.stops if (i := buf.find(s)) >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return buf[:cut], True
        keep = 0
        longest = max(len(s) for s in self.stops) - 1
        for k in range(min(len(buf), longest), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


@dataclass(frozen=True)
class Piece:
    """Text released after one generated token; the last piece carries the finish reason."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None


# ----- state ---------------------------------------------------------------------------------


@dataclass
class ApiState:
    """What the API serves from; `pipeline` is None while no plan is loaded. `probe` is a
    measurement result (`ProbeResult.to_json()`, with `nodes` and `links`) when one exists."""

    model_name: str
    tokenizer: Any
    # The serving pipeline; a Supervisor (re-plans when a stage dies) under `coordinator up`.
    pipeline: Pipeline | Supervisor | ReplicaRouter | None
    context_length: int = 2048
    default_max_tokens: int = 256
    vocab_size: int | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: ServingMetrics = field(default_factory=ServingMetrics)
    admission: Admission = field(default_factory=Admission)
    monitor: NodeMonitor | None = None
    probe: Mapping[str, Any] | None = None
    api_key: str | None = None
    # Weight shipments (coordinator up): the dashboard's progress bars.
    shipping: ShipBoard | None = None
    # The served model's folder and config (coordinator up): the Ollama API's model details.
    model_info: ModelInfo | None = None
    # With replicas (coordinator/replicas.py): what the planner predicted for them together.
    serving: Mapping[str, Any] | None = None
    # What `coordinator up` is doing while `pipeline` is None ("planning", "shipping
    # weights", "loading stages", "warming up", ...): GET /health names it.
    phase: str = "starting"

    def not_ready(self) -> str | None:
        """Why requests cannot be served now (None when they can)."""
        p = self.pipeline
        if p is None:
            return f"the model is not loaded yet ({self.phase})"
        return p.fatal if isinstance(p, Supervisor | ReplicaRouter) else p.failed


@dataclass(frozen=True)
class Job:
    """A validated request, ready to run."""

    kind: Literal["chat", "completion"]
    prompt: tuple[int, ...]
    params: GenerationParams
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool


def _text_of(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text":
            raise ApiError(
                400,
                f"messages[{index}].content: only text parts are supported, got "
                f"{part.get('type')!r}",
                param=f"messages.{index}.content",
            )
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")


# ----- the SSE response ----------------------------------------------------------------------


class EventStreamResponse(StreamingResponse):
    """Server-sent events that stop (and clean up) as soon as the client goes away.

    The body is sent by one task while another listens for `http.disconnect`; whichever ends
    first ends both, then the body and `on_close` are closed explicitly, so a cancelled
    generation releases its KV caches right away and not when garbage is collected."""

    media_type = "text/event-stream"

    def __init__(
        self, body: AsyncGenerator[bytes, None], on_close: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(
            body,
            media_type=self.media_type,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._body = body
        self._on_close = on_close
        self.disconnected = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def produce() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in self._body:
                if self.disconnected:  # stop even if the cancel below was lost on its way
                    return
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.disconnected = True

        producer = asyncio.create_task(produce())
        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            producer.cancel()
            watcher.cancel()
            results = await asyncio.gather(producer, watcher, return_exceptions=True)
            await self._body.aclose()
            await self._on_close()
        error = results[0]
        if isinstance(error, OSError):
            self.disconnected = True  # the client went away while we were sending
        elif isinstance(error, Exception):
            raise error
        if self.disconnected:
            log.info("client disconnected mid-stream; the request was cancelled")


async def _until_disconnect(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: Mapping[str, Any] | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


# ----- the app -------------------------------------------------------------------------------


def create_app(state: ApiState) -> FastAPI:
    metrics = state.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if state.monitor is not None:
            await state.monitor.start()
        try:
            yield
        finally:
            if state.monitor is not None:
                await state.monitor.close()

    app = FastAPI(title="LayerLink", version="0.1.0", lifespan=lifespan, docs_url=None)
    app.state.layerlink = state
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(BodyLimit)  # bodies over 8 MiB: 413 before any parsing

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.type, exc.param, exc.code),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return JSONResponse(
                error_body(
                    f"the request body is not valid JSON: {detail}", "invalid_request_error"
                ),
                status_code=400,
            )
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = (
            f"{loc}: {first.get('msg', 'invalid request body')}"
            if loc
            else str(first.get("msg", "invalid body"))
        )
        return JSONResponse(error_body(msg, "invalid_request_error", loc or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code
        )

    async def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), state.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                type_="invalid_request_error",
                code="invalid_api_key",
            )

    # ----- dashboard and metrics -----------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    alert_log = state.monitor.alert_log if state.monitor is not None else AlertLog()

    @app.get("/api/state")
    async def api_state() -> dict[str, object]:
        plan = state.pipeline.plan if state.pipeline is not None else None
        nodes = state.monitor.views() if state.monitor is not None else ()
        alert_log.update(current_alerts(plan, list(metrics.recent), nodes))
        out = build_state(
            state.model_name,
            plan,
            metrics,
            nodes,
            state.probe,
            None if state.shipping is None else state.shipping.to_json(),
        )
        if isinstance(state.pipeline, ReplicaRouter):
            out["replicas"] = state.pipeline.to_json()
        if state.serving is not None:
            out["serving"] = dict(state.serving)
        return out

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> PlainTextResponse:
        _update_cluster_gauges()
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE)

    def _update_cluster_gauges() -> None:
        if isinstance(state.pipeline, ReplicaRouter):
            metrics.set_replicas(state.pipeline.to_json())
        plan = state.pipeline.plan if state.pipeline is not None else None
        for g in (metrics.stage_layers, metrics.stage_active, metrics.stage_compute):
            g.clear()
        metrics.hop_seconds.clear()
        steps: dict[tuple[str, ...], float] = {}
        seconds: dict[tuple[str, ...], float] = {}
        if plan is not None:
            # By node: a node's GetInfo lists the stages of its device workers too.
            views = {v.node_id: v for v in state.monitor.views()} if state.monitor else {}
            computes: list[float] = []
            for i, s in enumerate(plan.stages):
                labels = {"stage": str(i), "node": s.node_name}
                metrics.stage_layers.set(s.layer_count, **labels)
                view = views.get(s.node_id)
                if view is None or not view.reachable:
                    continue
                mine = [st for st in view.stages if st.plan_id == plan.plan_id]
                metrics.stage_active.set(sum(st.active_requests for st in mine), **labels)
                this = next((st for st in mine if st.start == s.start), None)
                if this is None:
                    continue
                steps[(str(i), s.node_name)] = this.decode_steps
                seconds[(str(i), s.node_name)] = this.decode_seconds
                if this.recent_ms is not None:
                    metrics.stage_compute.set(this.recent_ms / 1e3, **labels)
                    computes.append(this.recent_ms / 1e3)
            hop = hop_estimate(plan, computes, list(metrics.recent))
            if hop is not None:
                metrics.hop_seconds.set(hop)
        metrics.stage_decode_steps.mirror(steps)
        metrics.stage_decode_seconds.mirror(seconds)
        metrics.link_latency.clear()
        metrics.link_bandwidth.clear()
        for lk in links_of(state.probe) or ():
            metrics.link_latency.set(lk.latency_us * 1e-6, src=lk.src, dst=lk.dst)
            metrics.link_bandwidth.set(lk.bandwidth_gbs * 1e9, src=lk.src, dst=lk.dst)

    # ----- OpenAI API ----------------------------------------------------------------------

    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        """200 once requests can be served; 503 before (naming the loading phase) or after
        the model can no longer be served. No API key: it says nothing but this."""
        why = state.not_ready()
        if why is None:
            body = {"status": "ok", "phase": "serving", "model": state.model_name}
            return JSONResponse(body, status_code=200)
        phase = state.phase if state.pipeline is None else "failed"
        body = {"status": "unavailable", "phase": phase, "model": state.model_name, "reason": why}
        return JSONResponse(body, status_code=503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict[str, Any]:
        # Listed only when it can be served: front ends that wait for the model to appear
        # here then get answers, not 503s.
        if state.not_ready() is not None:
            return {"object": "list", "data": []}
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "layerlink",
                }
            ],
        }

    def check_common(body: _Common) -> None:
        if body.model != state.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; try {state.model_name!r}",
                param="model",
                code="model_not_found",
            )
        if body.n not in (None, 1):
            raise _unsupported("n", "only n=1 is supported")
        if body.stream_options is not None and not body.stream:
            raise ApiError(
                400,
                "stream_options: only allowed when stream is true",
                param="stream_options",
            )
        if body.presence_penalty or body.frequency_penalty:
            raise _unsupported(
                "presence_penalty" if body.presence_penalty else "frequency_penalty",
                "penalties are not supported (send 0 or leave it out)",
            )
        if body.logit_bias:
            raise _unsupported("logit_bias", "not supported")

    def stops_of(body: _Common) -> tuple[str, ...]:
        stop = body.stop
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop: at most {MAX_STOP_STRINGS} stop strings", param="stop")
        if any(not s for s in stops):
            raise ApiError(400, "stop: stop strings must not be empty", param="stop")
        return tuple(stops)

    def make_job(kind: Literal["chat", "completion"], body: _Common, prompt: list[int]) -> Job:
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if state.vocab_size is not None and any(not 0 <= t < state.vocab_size for t in prompt):
            raise ApiError(
                400, f"prompt: token ids must lie in [0, {state.vocab_size})", param="prompt"
            )
        room = state.context_length - len(prompt)
        requested = body.max_completion_tokens or body.max_tokens
        if room < 1 or (requested is not None and requested > room):
            param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise ApiError(
                400,
                f"the prompt ({len(prompt)} tokens) + {param} ({requested or 1}) exceeds the "
                f"context length {state.context_length}",
                param=param if room >= 1 else "messages" if kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        params = GenerationParams(
            max_tokens=requested or min(state.default_max_tokens, room),
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop_token_ids=frozenset(state.tokenizer.eos_token_ids),
        )
        return Job(
            kind=kind,
            prompt=tuple(prompt),
            params=params,
            stops=stops_of(body),
            stream=bool(body.stream),
            include_usage=bool(
                body.stream and body.stream_options and body.stream_options.include_usage
            ),
        )

    def require_pipeline() -> Pipeline | Supervisor | ReplicaRouter:
        if state.pipeline is None:
            metrics.rejected.inc(reason="no_plan")
            raise ApiError(
                503,
                "no plan is loaded yet; the cluster is starting",
                type_="service_unavailable",
                code="no_plan",
            )
        return state.pipeline

    async def generate(
        pipeline: Pipeline | Supervisor | ReplicaRouter, job: Job, trace: RequestTrace
    ) -> AsyncGenerator[Piece, None]:
        """Pieces of text, one per token; the last one has the finish reason. Owns the
        request's admission slot and trace from its first step on."""
        detok = IncrementalDetokenizer(lambda ids: str(state.tokenizer.decode(ids)))
        matcher = StopMatcher(job.stops)
        n = 0
        try:
            finish = "length"
            # Pipeline.stream is an async generator: closing it sends the RELEASE.
            events = pipeline.stream(list(job.prompt), job.params, request_id=trace.request_id)
            async with contextlib.aclosing(events):
                async for ev in events:
                    trace.token()
                    if ev.token in job.params.stop_token_ids:
                        finish = "stop"  # end-of-sequence: not part of the text or the count
                        break
                    n += 1
                    text, hit = matcher.feed(detok.add(ev.token))
                    if hit:
                        trace.finish("stop", n)
                        yield Piece(text, n, "stop")
                        return
                    yield Piece(text, n)
            text, hit = matcher.feed(detok.flush())
            if hit:
                finish = "stop"
            else:
                text += matcher.flush()
            trace.finish(finish, n)
            yield Piece(text, n, finish)
        except PipelineError:
            trace.finish("error", n)
            raise
        finally:
            trace.finish("cancelled", n)  # no-op when the request already finished
            state.admission.release()

    async def start(job: Job, endpoint: str) -> tuple[Piece, AsyncGenerator[Piece, None]]:
        """Admit the job and run it to its first piece (so failures before the first token
        still get a proper HTTP status)."""
        pipeline = require_pipeline()
        trace = metrics.start(f"req-{uuid.uuid4().hex[:16]}", endpoint)
        try:
            await state.admission.acquire()
        except QueueFull:
            trace.reject("queue_full")
            adm = state.admission
            raise ApiError(
                429,
                f"the server is busy: {adm.running} requests running and {adm.waiting} "
                "waiting, the most it takes; retry shortly",
                type_="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except BaseException:
            trace.finish("cancelled")
            raise
        trace.admit(len(job.prompt))
        gen = generate(pipeline, job, trace)
        try:
            first = await gen.__anext__()
        except PipelineError as e:
            raise ApiError(
                503, f"generation failed: {e}", type_="service_unavailable", code="pipeline_error"
            ) from None
        except BaseException:
            await gen.aclose()
            raise
        return first, gen

    def usage(job: Job, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": len(job.prompt),
            "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt) + completion_tokens,
        }

    async def collect(first: Piece, gen: AsyncGenerator[Piece, None]) -> Piece:
        parts = [first.text]
        last = first
        async with contextlib.aclosing(gen):
            try:
                while last.finish_reason is None:
                    last = await gen.__anext__()
                    parts.append(last.text)
            except PipelineError as e:
                raise ApiError(
                    503,
                    f"generation failed: {e}",
                    type_="service_unavailable",
                    code="pipeline_error",
                ) from None
        return Piece("".join(parts), last.completion_tokens, last.finish_reason)

    async def collect_unless_gone(
        request: Request, first: Piece, gen: AsyncGenerator[Piece, None]
    ) -> Piece:
        """The whole answer; if the client disconnects first, the generation is cancelled
        (its KV caches freed) instead of running on for nobody."""
        work = asyncio.create_task(collect(first, gen))
        watch = asyncio.create_task(_until_disconnect(request))
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)
        if work.cancelled():
            log.info("client disconnected before the answer was complete; request cancelled")
            raise ApiError(499, "the client closed the request", code="client_closed_request")
        return work.result()

    def stream_response(
        job: Job,
        first: Piece,
        gen: AsyncGenerator[Piece, None],
        chunk: Callable[[str | None, str | None, bool], dict[str, Any]],
    ) -> EventStreamResponse:
        """chunk(text, finish_reason, is_first) -> one OpenAI chunk object."""

        async def body() -> AsyncGenerator[bytes, None]:
            piece = first
            if job.kind == "chat" or piece.text:  # a chat stream opens with the role
                head = chunk(piece.text, None, True)
                if job.include_usage:
                    head["usage"] = None
                yield _sse(head)
            try:
                while True:
                    if piece.finish_reason is not None:
                        break
                    piece = await gen.__anext__()
                    if piece.text:
                        c = chunk(piece.text, None, False)
                        if job.include_usage:
                            c["usage"] = None
                        yield _sse(c)
            except PipelineError as e:
                yield _sse(
                    error_body(
                        f"generation failed: {e}", "service_unavailable", None, "pipeline_error"
                    )
                )
                return
            tail = chunk(None, piece.finish_reason, False)
            if job.include_usage:
                tail["usage"] = None
            yield _sse(tail)
            if job.include_usage:
                final = chunk(None, None, False)
                final["choices"] = []
                final["usage"] = usage(job, piece.completion_tokens)
                yield _sse(final)
            yield _sse("[DONE]")

        return EventStreamResponse(body(), on_close=gen.aclose)

    @app.post("/v1/completions", dependencies=[Depends(authorize)], response_model=None)
    async def completions(
        body: CompletionRequest, request: Request
    ) -> dict[str, Any] | EventStreamResponse:
        check_common(body)
        if body.echo:
            raise _unsupported("echo", "not supported")
        if body.logprobs is not None:
            raise _unsupported("logprobs", "not supported")
        if body.best_of not in (None, 1):
            raise _unsupported("best_of", "only best_of=1 is supported")
        if body.suffix:
            raise _unsupported("suffix", "not supported")
        raw = body.prompt
        if isinstance(raw, list) and raw and not isinstance(raw[0], int):
            if len(raw) != 1:
                raise _unsupported("prompt", "one prompt per request (a list of one)")
            raw = raw[0]
        if isinstance(raw, str):
            prompt = list(state.tokenizer.encode(raw))
        else:
            prompt = [int(t) for t in raw if isinstance(t, int)]
        job = make_job("completion", body, prompt)
        first, gen = await start(job, "completions")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None, is_first: bool) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": state.model_name,
                "choices": [
                    {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
                ],
            }

        if job.stream:
            return stream_response(job, first, gen, chunk)
        done = await collect_unless_gone(request, first, gen)
        return {
            **chunk(done.text, done.finish_reason, False),
            "usage": usage(job, done.completion_tokens),
        }

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], response_model=None)
    async def chat(body: ChatRequest, request: Request) -> dict[str, Any] | EventStreamResponse:
        check_common(body)
        if body.logprobs:
            raise _unsupported("logprobs", "not supported")
        if body.tools:
            raise _unsupported("tools", "tool calling is not supported")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise _unsupported("response_format", "only the 'text' format is supported")
        messages = [
            {"role": m.role, "content": _text_of(m.content, i)} for i, m in enumerate(body.messages)
        ]
        try:
            prompt = list(state.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as e:  # the template rejects the conversation (jinja raises freely)
            raise ApiError(
                400, f"messages: the chat template rejected them: {e}", param="messages"
            ) from None
        job = make_job("chat", body, prompt)
        first, gen = await start(job, "chat")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str | None, finish: str | None, is_first: bool) -> dict[str, Any]:
            delta: dict[str, Any] = {"role": "assistant"} if is_first else {}
            if text is not None:
                delta["content"] = text
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.model_name,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                ],
            }

        if job.stream:
            return stream_response(job, first, gen, chunk)
        done = await collect_unless_gone(request, first, gen)
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": state.model_name,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": done.text},
                    "logprobs": None,
                    "finish_reason": done.finish_reason,
                }
            ],
            "usage": usage(job, done.completion_tokens),
        }

    from coordinator.ollama_api import Serving, mount_ollama  # it imports this module

    mount_ollama(app, state, Serving(authorize, start, collect_unless_gone))
    return app
