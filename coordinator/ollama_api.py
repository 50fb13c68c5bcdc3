"""Ollama's HTTP API beside the OpenAI one: /api/chat, /api/generate, /api/tags, /api/show,
/api/ps and /api/version, with Ollama's field names, options and NDJSON streaming.

Thin edge over the OpenAI routes' machinery (coordinator/api.py): the same chat template,
admission, sampling, incremental detokenizer, stop-string matcher, cancellation on
disconnect and API key; only the request and answer shapes are Ollama's. Errors are Ollama's
shape, `{"error": "<message>"}` with a 4xx/5xx status, and name the field at fault.

Trust boundary: every request body is untrusted; it is parsed here (strict types: a string is
not a number) before anything reaches the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from coordinator.api import ApiError, ApiState, EventStreamResponse, Job, Piece
from coordinator.pipeline import GenerationParams, PipelineError
from coordinator.session import ModelInfo

log = logging.getLogger(__name__)

# Ollama's sampling defaults (its Modelfile PARAMETER defaults), used when a request names none.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.9
MAX_STOP_STRINGS = 16
_NOT_SUPPORTED = {
    "/api/pull": "pulling models",
    "/api/push": "pushing models",
    "/api/create": "creating models",
    "/api/copy": "copying models",
    "/api/delete": "deleting models",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
}


@dataclass(frozen=True)
class Serving:
    """The generation machinery of create_app that the Ollama routes share."""

    authorize: Callable[[Request], Awaitable[None]]
    # start(job, endpoint) -> (first piece, the rest): admission and the first token
    start: Callable[[Job, str], Awaitable[tuple[Piece, AsyncGenerator[Piece, None]]]]
    # the whole answer; the generation is cancelled if the client leaves first
    collect_unless_gone: Callable[[Request, Piece, AsyncGenerator[Piece, None]], Awaitable[Piece]]


# ----- request bodies ------------------------------------------------------------------------

_STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class Options(BaseModel):
    """Ollama's `options`. Unknown names are refused; options LayerLink cannot honour are
    accepted only at their neutral value, so nothing changes the output silently."""

    model_config = ConfigDict(extra="forbid", **_STRICT)
    # honoured
    num_predict: int | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-1, lt=2**63)
    # about where and how the model runs (the planner's business here): accepted, no effect
    num_ctx: int | None = Field(default=None, ge=1)
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    num_thread: int | None = None
    num_keep: int | None = None
    numa: bool | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    vocab_only: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    embedding_only: bool | None = None
    # samplers LayerLink does not have: only their neutral values (checked in `neutral`)
    top_k: int | None = None
    min_p: float | None = None
    typical_p: float | None = None
    tfs_z: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    mirostat: int | None = None
    # no effect while the samplers above are neutral
    repeat_last_n: int | None = None
    penalize_newline: bool | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None


# option -> its neutral value (what leaves the sampling as LayerLink does it)
_NEUTRAL: dict[str, float] = {
    "top_k": 0,
    "min_p": 0.0,
    "typical_p": 1.0,
    "tfs_z": 1.0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "mirostat": 0,
}


class _Generating(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)
    model: str
    stream: bool | None = None  # Ollama streams unless told not to
    options: Options | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | float | None = None  # accepted; the model stays loaded while we serve
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)
    role: str = Field(pattern="^(system|user|assistant|tool)$")
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class ChatBody(_Generating):
    messages: list[Message]
    tools: list[Any] | None = None


class GenerateBody(_Generating):
    prompt: str = ""
    system: str | None = None
    raw: bool | None = None
    template: str | None = None
    suffix: str | None = None
    context: list[int] | None = None
    images: list[Any] | None = None


class ShowBody(BaseModel):
    model_config = ConfigDict(extra="ignore", **_STRICT)
    model: str | None = None
    name: str | None = None  # Ollama's older spelling
    verbose: bool | None = None


_Body = TypeVar("_Body", bound=BaseModel)


def parse(kind: type[_Body], raw: bytes) -> _Body:
    """The body as `kind`, or a 400 naming the first field at fault."""
    try:
        return kind.model_validate_json(raw or b"{}")
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        kind_ = first.get("type", "")
        if kind_ == "json_invalid":
            msg = f"the request body is not valid JSON: {(first.get('ctx') or {}).get('error', '')}"
        elif kind_ == "model_type":
            msg = "the request body must be a JSON object"
        elif kind_ == "missing":
            msg = f"{loc} is required"
        elif kind_ == "extra_forbidden" and loc.startswith("options."):
            msg = f"{loc}: not an Ollama option"
        else:
            msg = f"{loc}: {first.get('msg', 'invalid value')}"
        raise ApiError(400, msg, param=loc or None) from None


def _unsupported(param: str, why: str) -> ApiError:
    return ApiError(400, f"{param}: {why}", param=param)


def check_generating(body: _Generating) -> None:
    if body.format not in (None, ""):
        raise _unsupported("format", "structured output (json, a schema) is not supported")
    if body.think not in (None, False):
        raise _unsupported("think", "thinking is not supported")
    if body.logprobs:
        raise _unsupported("logprobs", "not supported")
    if body.top_logprobs:
        raise _unsupported("top_logprobs", "not supported")
    opts = body.options
    if opts is None:
        return
    for name, neutral in _NEUTRAL.items():
        value = getattr(opts, name)
        if value is not None and value != neutral:
            raise _unsupported(
                f"options.{name}",
                f"not supported: leave it out or send {neutral} (LayerLink samples with "
                "temperature, top_p and seed only)",
            )


# ----- what is known about the served model --------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """The served model as Ollama describes a model (its tags/show/ps entries)."""

    name: str  # NAME:TAG, as Ollama names models
    format: str  # "gguf" or "safetensors"
    family: str  # the architecture, e.g. "llama"
    parameter_count: int | None
    quantization_level: str
    size: int  # bytes of the weight files
    digest: str  # sha256 hex
    modified_at: str
    template: str  # the chat template (Jinja, as the tokenizer holds it; Ollama's are Go)
    model_info: Mapping[str, Any]

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": self.format,
            "family": self.family,
            "families": [self.family] if self.family else None,
            "parameter_size": _parameter_size(self.parameter_count),
            "quantization_level": self.quantization_level,
        }


def tagged(name: str) -> str:
    """NAME:TAG (Ollama's `latest` when the name has no tag)."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def _parameter_size(n: int | None) -> str:
    if not n:
        return ""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _quantization(folder: Path, config: Mapping[str, Any]) -> str:
    """The GGUF's most common quantized tensor type when the folder was converted from one,
    else MLX's quantization bits, else the stored dtype."""
    try:
        types = json.loads((folder / "layerlink-source.json").read_text())["types"]
        quantized = {k: v for k, v in types.items() if k not in ("F32", "F16", "BF16")}
        return str(max(quantized or types, key=lambda k: (quantized or types)[k]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    quant = config.get("quantization")
    if isinstance(quant, dict) and "bits" in quant:
        return f"Q{quant['bits']}"
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "")
    return {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(dtype, dtype.upper())


def _weight_files(info: ModelInfo) -> tuple[str, int, float, str]:
    """(format, bytes, modification time, digest) of the model's weight files. The digest is
    the name of an Ollama blob (sha256-<hex>), else a hash of the names and sizes (with the
    config): it tells models apart, it does not hash the weights."""
    if info.gguf is not None:
        st = info.gguf.stat()
        name = info.gguf.name
        if name.startswith("sha256-"):
            digest = name.removeprefix("sha256-")
        else:
            digest = hashlib.sha256(f"{name}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        return "gguf", st.st_size, st.st_mtime, digest
    files = sorted(info.path.glob("*.safetensors"))
    config = info.path / "config.json"
    h = hashlib.sha256(config.read_bytes())
    for f in files:
        h.update(f"|{f.name}|{f.stat().st_size}".encode())
    size = sum(f.stat().st_size for f in files)
    return "safetensors", size, config.stat().st_mtime, h.hexdigest()


def describe(state: ApiState) -> ModelCard:
    """The card of the served model; what cannot be read is left empty."""
    from coordinator.costmodel import ModelSpec

    info = state.model_info
    template = str(getattr(state.tokenizer, "chat_template", None) or "")
    if info is None:
        return ModelCard(
            name=tagged(state.model_name),
            format="",
            family="",
            parameter_count=None,
            quantization_level="",
            size=0,
            digest="",
            modified_at=_rfc3339(state.created),
            template=template,
            model_info={},
        )
    config = info.config.get("text_config", info.config)
    family = str(config.get("model_type") or info.config.get("model_type") or "")
    try:
        spec: ModelSpec | None = ModelSpec.from_config_dir(info.path, info.name)
    except ValueError as e:
        log.info("cannot size %s for the Ollama API: %s", info.path, e)
        spec = None
    try:
        fmt, size, modified, digest = _weight_files(info)
    except OSError as e:
        log.info("cannot read %s for the Ollama API: %s", info.path, e)
        fmt, size, modified, digest = "", 0, state.created, ""
    model_info: dict[str, Any] = {"general.architecture": family, "general.basename": info.name}
    if spec is not None:
        model_info["general.parameter_count"] = spec.params
        for key, value in (
            ("block_count", spec.layers),
            ("context_length", config.get("max_position_embeddings")),
            ("embedding_length", spec.hidden),
            ("feed_forward_length", spec.intermediate),
            ("attention.head_count", spec.heads),
            ("attention.head_count_kv", spec.kv_heads),
            ("attention.key_length", spec.head_dim),
            ("vocab_size", spec.vocab),
        ):
            if value is not None:
                model_info[f"{family}.{key}"] = value
    return ModelCard(
        name=tagged(state.model_name),
        format=fmt,
        family=family,
        parameter_count=spec.params if spec is not None else None,
        quantization_level=_quantization(info.path, info.config),
        size=size,
        digest=digest,
        modified_at=_rfc3339(modified),
        template=template,
        model_info=model_info,
    )


# ----- responses -----------------------------------------------------------------------------


class NdjsonResponse(EventStreamResponse):
    """One JSON object per line (Ollama's streaming), with the SSE response's disconnect
    handling: a client that leaves cancels the generation."""

    media_type = "application/x-ndjson"


def ollama_error(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)


def _line(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class _Clock:
    """Nanosecond marks of one request: arrival, first token, end."""

    arrived: int
    first: int = 0

    def stats(self, job: Job, done: Piece) -> dict[str, Any]:
        end = time.perf_counter_ns()
        return {
            "done_reason": done.finish_reason,
            "total_duration": end - self.arrived,
            "load_duration": 0,  # the stages were loaded before the API opened
            "prompt_eval_count": len(job.prompt),
            "prompt_eval_duration": self.first - self.arrived,
            "eval_count": done.completion_tokens,
            "eval_duration": end - self.first,
        }


# ----- the routes ----------------------------------------------------------------------------


def mount_ollama(app: FastAPI, state: ApiState, serving: Serving) -> None:
    card: list[ModelCard] = []

    def model_card() -> ModelCard:
        if not card:
            card.append(describe(state))
        return card[0]

    def check_model(name: str | None) -> None:
        if not name:
            raise ApiError(400, "model is required", param="model")
        if name not in (state.model_name, tagged(state.model_name)):
            raise ApiError(
                404,
                f"model '{name}' not found; this coordinator serves '{tagged(state.model_name)}'",
                param="model",
            )

    def make_job(kind: Literal["chat", "completion"], prompt: list[int], body: _Generating) -> Job:
        opts = body.options or Options()
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = state.context_length - len(prompt)
        if room < 1:
            raise ApiError(
                400,
                f"the prompt ({len(prompt)} tokens) does not fit the context length "
                f"{state.context_length}",
                param="prompt",
            )
        n = opts.num_predict
        if n is None:
            max_tokens = min(state.default_max_tokens, room)
        elif n in (-1, -2):  # Ollama: until the context is full
            max_tokens = room
        elif n < 1:
            raise ApiError(
                400,
                "options.num_predict: must be >= 1, or -1 for as many as the context holds",
                param="options.num_predict",
            )
        elif n > room:
            raise ApiError(
                400,
                f"options.num_predict: the prompt ({len(prompt)} tokens) + num_predict ({n}) "
                f"exceeds the context length {state.context_length}",
                param="options.num_predict",
            )
        else:
            max_tokens = n
        stop = opts.stop
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"options.stop: at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ApiError(400, "options.stop: stop strings must not be empty")
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=DEFAULT_TEMPERATURE if opts.temperature is None else opts.temperature,
            top_p=DEFAULT_TOP_P if opts.top_p is None else opts.top_p,
            seed=None if opts.seed is None or opts.seed < 0 else opts.seed,
            stop_token_ids=frozenset(state.tokenizer.eos_token_ids),
        )
        return Job(
            kind=kind,
            prompt=tuple(prompt),
            params=params,
            stops=tuple(stops),
            stream=body.stream is not False,  # Ollama streams unless told not to
            include_usage=False,
        )

    def require_loaded() -> None:
        if state.pipeline is None:
            raise ApiError(503, "no plan is loaded yet; the cluster is starting")

    async def run(
        request: Request,
        job: Job,
        endpoint: str,
        clock: _Clock,
        shape: Callable[[str], dict[str, Any]],
    ) -> Response:
        """Generate and answer whole or as NDJSON; `shape(text)` is one answer object."""
        first, gen = await serving.start(job, endpoint)
        clock.first = time.perf_counter_ns()
        if job.stream:

            async def body() -> AsyncGenerator[bytes, None]:
                piece = first
                if piece.text:
                    yield _line(shape(piece.text))
                try:
                    while piece.finish_reason is None:
                        piece = await gen.__anext__()
                        if piece.text:
                            yield _line(shape(piece.text))
                except PipelineError as e:
                    yield _line({"error": f"generation failed: {e}"})
                    return
                yield _line({**shape(""), "done": True, **clock.stats(job, piece)})

            return NdjsonResponse(body(), on_close=gen.aclose)
        done = await serving.collect_unless_gone(request, first, gen)
        return JSONResponse({**shape(done.text), "done": True, **clock.stats(job, done)})

    def loaded(shape: Callable[[str], dict[str, Any]]) -> JSONResponse:
        """Ollama's answer to a request with nothing to generate: the model is loaded."""
        require_loaded()
        return JSONResponse({**shape(""), "done": True, "done_reason": "load"})

    async def guarded(request: Request, handler: Callable[[], Awaitable[Response]]) -> Response:
        try:
            await serving.authorize(request)
            return await handler()
        except ApiError as e:
            return ollama_error(e)

    @app.post("/api/chat", include_in_schema=False)
    async def chat(request: Request) -> Response:
        clock = _Clock(time.perf_counter_ns())

        async def handle() -> Response:
            body = parse(ChatBody, await request.body())
            check_model(body.model)
            check_generating(body)
            if body.tools:
                raise _unsupported("tools", "tool calling is not supported")
            model = body.model

            def shape(text: str) -> dict[str, Any]:
                return {
                    "model": model,
                    "created_at": _now(),
                    "message": {"role": "assistant", "content": text},
                    "done": False,
                }

            if not body.messages:
                return loaded(shape)
            for i, m in enumerate(body.messages):
                if m.images:
                    raise _unsupported(f"messages.{i}.images", "images are not supported")
                if m.tool_calls:
                    raise _unsupported(f"messages.{i}.tool_calls", "tool calls are not supported")
            messages = [{"role": m.role, "content": m.content} for m in body.messages]
            try:
                prompt = list(
                    state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                )
            except Exception as e:  # the template rejects the conversation (jinja raises freely)
                raise ApiError(
                    400, f"messages: the chat template rejected them: {e}", param="messages"
                ) from None
            job = make_job("chat", prompt, body)
            return await run(request, job, "ollama_chat", clock, shape)

        return await guarded(request, handle)

    @app.post("/api/generate", include_in_schema=False)
    async def generate(request: Request) -> Response:
        clock = _Clock(time.perf_counter_ns())

        async def handle() -> Response:
            body = parse(GenerateBody, await request.body())
            check_model(body.model)
            check_generating(body)
            for name in ("template", "suffix"):
                if getattr(body, name):
                    raise _unsupported(
                        name, "not supported (the model's own chat template is used)"
                    )
            if body.context:
                raise _unsupported("context", "not supported: send the conversation to /api/chat")
            if body.images:
                raise _unsupported("images", "images are not supported")
            if body.raw and body.system:
                raise _unsupported("system", "not used with raw=true: put it in the prompt")
            model = body.model

            def shape(text: str) -> dict[str, Any]:
                return {"model": model, "created_at": _now(), "response": text, "done": False}

            if not body.prompt:
                return loaded(shape)
            if body.raw:
                prompt = list(state.tokenizer.encode(body.prompt))
            else:
                messages = [{"role": "system", "content": body.system}] if body.system else []
                messages.append({"role": "user", "content": body.prompt})
                try:
                    prompt = list(
                        state.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                    )
                except Exception as e:  # the template rejects it (jinja raises freely)
                    raise ApiError(
                        400, f"prompt: the chat template rejected it: {e}", param="prompt"
                    ) from None
            job = make_job("completion" if body.raw else "chat", prompt, body)
            return await run(request, job, "ollama_generate", clock, shape)

        return await guarded(request, handle)

    def entry(c: ModelCard) -> dict[str, Any]:
        return {
            "name": c.name,
            "model": c.name,
            "modified_at": c.modified_at,
            "size": c.size,
            "digest": c.digest,
            "details": c.details(),
        }

    @app.get("/api/tags", include_in_schema=False)
    async def tags(request: Request) -> Response:
        async def handle() -> Response:
            return JSONResponse({"models": [entry(model_card())]})

        return await guarded(request, handle)

    @app.get("/api/ps", include_in_schema=False)
    async def ps(request: Request) -> Response:
        async def handle() -> Response:
            if state.pipeline is None:
                return JSONResponse({"models": []})
            c = model_card()
            loaded = {**entry(c), "expires_at": None, "context_length": state.context_length}
            del loaded["modified_at"]
            return JSONResponse({"models": [loaded]})

        return await guarded(request, handle)

    @app.post("/api/show", include_in_schema=False)
    async def show(request: Request) -> Response:
        async def handle() -> Response:
            body = parse(ShowBody, await request.body())
            check_model(body.model or body.name)
            c = model_card()
            parameters = "\n".join(
                f"{k:<15} {v}"
                for k, v in (
                    ("num_ctx", state.context_length),
                    ("num_predict", state.default_max_tokens),
                    ("temperature", DEFAULT_TEMPERATURE),
                    ("top_p", DEFAULT_TOP_P),
                )
            )
            info = state.model_info
            source = None if info is None else info.gguf or info.path
            modelfile = "\n".join(
                [
                    "# Modelfile generated by LayerLink (the template is the tokenizer's Jinja)",
                    f"FROM {source or state.model_name}",
                    f'TEMPLATE """{c.template}"""',
                    *(f"PARAMETER {line}" for line in parameters.splitlines()),
                ]
            )
            return JSONResponse(
                {
                    "modelfile": modelfile,
                    "parameters": parameters,
                    "template": c.template,
                    "details": c.details(),
                    "model_info": dict(c.model_info),
                    "capabilities": ["completion"],
                    "modified_at": c.modified_at,
                }
            )

        return await guarded(request, handle)

    @app.get("/api/version", include_in_schema=False)
    async def version() -> dict[str, str]:
        return {"version": app.version}

    def refuse(path: str, what: str) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            return ollama_error(
                ApiError(
                    404,
                    f"{path}: {what} is not supported by LayerLink; the coordinator serves the "
                    "one model it was started with (coordinator up --model)",
                )
            )

        return handler

    for path, what in _NOT_SUPPORTED.items():
        method = "DELETE" if path == "/api/delete" else "POST"
        app.add_api_route(path, refuse(path, what), methods=[method], include_in_schema=False)

    # Registered last: any other /api/ request gets Ollama's error shape too (the dashboard's
    # GET /api/state is matched before this).
    @app.api_route(
        "/api/{rest:path}",
        methods=["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"],
        include_in_schema=False,
    )
    async def unknown(request: Request, rest: str) -> Response:
        path = request.url.path
        allowed = sorted(
            m
            for r in app.routes
            if isinstance(r, APIRoute) and r.path == path and r.endpoint is not unknown
            for m in r.methods or ()
        )
        if allowed:
            return ollama_error(
                ApiError(405, f"{path} takes {', '.join(allowed)}, not {request.method}")
            )
        return ollama_error(ApiError(404, f"{path}: no such endpoint"))
