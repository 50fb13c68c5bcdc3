"""Requests that are not valid protobuf get INVALID_ARGUMENT, not UNKNOWN.

grpc answers a request its deserializer cannot parse with UNKNOWN ("Unexpected DecodeError"),
which reads like a server fault. `MalformedRequests` wraps every method's deserializer: a
message that does not parse becomes a marker, and the method aborts with INVALID_ARGUMENT
naming the message type before the servicer sees it (on a request stream, the stream ends at
that message, as the data path closes a connection on a malformed frame: the servicer sees
the requests before it, then an end of input, and the call ends with INVALID_ARGUMENT).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Malformed:
    """Stands in for a request message that did not parse."""

    reason: str


def _safe(deserialize: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # protobuf raises DecodeError, custom decoders ValueError & co.
            return Malformed(f"{type(e).__name__}: {e}")

    return parse


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], method: str, bad: Malformed) -> None:
    log.info("malformed request to %s from %s: %s", method, context.peer(), bad.reason)
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the request to {method} is not a valid message: {bad.reason}"[:500],
    )


def _until_malformed(requests: AsyncIterator[Any], found: list[Malformed]) -> AsyncIterator[Any]:
    """The requests up to the first malformed one, which ends the stream as a half-close
    would and is kept in `found`: the wrapper refuses the call from the handler's own task
    once the servicer is done (an abort raised inside the servicer's reading task could be
    swallowed there and leave the call without a status)."""

    async def gen() -> AsyncIterator[Any]:
        async for item in requests:
            if isinstance(item, Malformed):
                found.append(item)
                return
            yield item

    return gen()


def _wrap_behavior(behavior: Callable[..., Any], streaming_in: bool, method: str) -> Any:
    def inputs(request: Any, found: list[Malformed]) -> Any:
        return _until_malformed(request, found) if streaming_in else request

    if inspect.isasyncgenfunction(behavior):

        async def stream_out(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if not streaming_in and isinstance(request, Malformed):
                await _refuse(context, method, request)
            found: list[Malformed] = []
            replies = behavior(inputs(request, found), context)
            try:
                async for reply in replies:
                    yield reply
            finally:
                await replies.aclose()  # the servicer's clean-up runs now, not at GC
            if found:
                await _refuse(context, method, found[0])

        return stream_out

    async def unary_out(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if not streaming_in and isinstance(request, Malformed):
            await _refuse(context, method, request)
        found: list[Malformed] = []
        result = behavior(inputs(request, found), context)
        reply = await result if inspect.isawaitable(result) else result
        if found:
            await _refuse(context, method, found[0])
        return reply

    return unary_out


class MalformedRequests(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = str(handler_call_details.method)
        streaming_in = bool(handler.request_streaming)
        kind = (streaming_in, bool(handler.response_streaming))
        behavior = {
            (False, False): handler.unary_unary,
            (False, True): handler.unary_stream,
            (True, False): handler.stream_unary,
            (True, True): handler.stream_stream,
        }[kind]
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[kind]
        return make(
            _wrap_behavior(behavior, streaming_in, method),
            request_deserializer=_safe(handler.request_deserializer, method),
            response_serializer=handler.response_serializer,
        )
