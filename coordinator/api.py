"""The OpenAI-compatible HTTP API (FastAPI under uvicorn).

Thin edge: validate the body, tokenize, run the request on the pipeline, shape the answer.
Errors use OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from coordinator.pipeline import GenerationParams, Pipeline, PipelineError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


def error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(pattern="^(system|user|assistant|tool|developer)$")
    content: str | list[dict[str, Any]] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    n: int = 1
    stream: bool = False


class CompletionRequest(_Common):
    prompt: str | list[int]


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


@dataclass
class ApiState:
    """What the API serves from; `pipeline` is None while no plan is loaded."""

    model_name: str
    tokenizer: Any
    pipeline: Pipeline | None
    context_length: int = 2048
    default_max_tokens: int = 256
    created: int = field(default_factory=lambda: int(time.time()))


def _text_of(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if part.get("type") == "text")


def create_app(state: ApiState) -> FastAPI:
    app = FastAPI(title="LayerLink", version="0.1.0")
    app.state.layerlink = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
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

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
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

    def check(body: _Common) -> tuple[Pipeline, GenerationParams]:
        if body.model != state.model_name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; try {state.model_name!r}",
                param="model",
                code="model_not_found",
            )
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if state.pipeline is None:
            raise ApiError(
                503, "no plan is loaded yet; the cluster is starting", type_="service_unavailable"
            )
        max_tokens = body.max_completion_tokens or body.max_tokens or state.default_max_tokens
        params = GenerationParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_token_ids=frozenset(state.tokenizer.eos_token_ids),
        )
        return state.pipeline, params

    async def run(
        pipeline: Pipeline, prompt: list[int], params: GenerationParams
    ) -> tuple[list[int], str]:
        if len(prompt) + params.max_tokens > state.context_length:
            raise ApiError(
                400,
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the context length {state.context_length}",
                param="max_tokens",
            )
        try:
            result = await pipeline.generate(prompt, params)
        except PipelineError as e:
            raise ApiError(503, f"generation failed: {e}", type_="service_unavailable") from None
        tokens = list(result.tokens)
        if result.finish_reason == "stop":
            tokens = tokens[:-1]  # the stop token is not part of the text
        return tokens, result.finish_reason

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict[str, Any]:
        pipeline, params = check(body)
        prompt = (
            list(body.prompt)
            if isinstance(body.prompt, list)
            else list(state.tokenizer.encode(body.prompt))
        )
        if not prompt:
            raise ApiError(400, "prompt is empty", param="prompt")
        tokens, finish = await run(pipeline, prompt, params)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.model_name,
            "choices": [
                {
                    "index": 0,
                    "text": state.tokenizer.decode(tokens),
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(tokens),
                "total_tokens": len(prompt) + len(tokens),
            },
        }

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> dict[str, Any]:
        pipeline, params = check(body)
        messages = [{"role": m.role, "content": _text_of(m.content)} for m in body.messages]
        prompt = list(state.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        tokens, finish = await run(pipeline, prompt, params)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": state.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": state.tokenizer.decode(tokens)},
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(tokens),
                "total_tokens": len(prompt) + len(tokens),
            },
        }

    return app
