"""A request whose client went away must stop at once and free its KV caches.

Found by a CI run where a disconnected stream kept generating to max_tokens: Python 3.11's
asyncio.wait_for returns its result instead of raising when it is cancelled in the same loop
turn as that result arrives, so the cancel of a stream waiting for its next token could be
lost. These tests pin each link of the chain without timing: the token wait, the supervisor's
inner stream, and the SSE response's own stop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from types import SimpleNamespace
from typing import Any

import pytest

from coordinator.api import EventStreamResponse
from coordinator.pipeline import GenerationParams, Pipeline, PipelineError, TokenEvent, _Waiter
from coordinator.supervisor import Supervisor
from node._proto.layerlink.v1 import node_pb2 as pb


def test_token_wait_cancelled_as_its_token_arrives_raises() -> None:
    async def scenario() -> None:
        waiter = _Waiter()
        task = asyncio.create_task(Pipeline._next_event(None, waiter, "r", 0, 30.0))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the task now waits for the queue
        waiter.queue.put_nowait(pb.StageEvent(request_id="r", step=0, token=5))
        task.cancel()  # same loop turn: the token is there, the task has not run yet
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_token_wait_still_times_out() -> None:
    async def scenario() -> None:
        with pytest.raises(PipelineError, match="no token for request r step 3"):
            await Pipeline._next_event(None, _Waiter(), "r", 3, 0.05)  # type: ignore[arg-type]

    asyncio.run(scenario())


def test_closing_a_supervised_stream_closes_the_pipelines_stream_at_once() -> None:
    released: list[str] = []

    async def stream(
        prompt: list[int], params: GenerationParams, request_id: str | None = None
    ) -> AsyncGenerator[TokenEvent, None]:
        try:
            for step in range(100):
                yield TokenEvent(token=step, step=step, logits=None)
        finally:
            released.append(request_id or "")

    async def scenario() -> None:
        sup = Supervisor([], planner=None, opener=None)  # type: ignore[arg-type]
        sup.pipeline = SimpleNamespace(failed=None, stream=stream)  # type: ignore[assignment]
        events = sup.stream([1, 2], GenerationParams(max_tokens=100), request_id="req-1")
        assert (await events.__anext__()).token == 0
        await events.aclose()
        # Not left to the garbage collector's finalizer (a task scheduled for later).
        assert released == ["req-1"]

    asyncio.run(scenario())


def test_event_stream_stops_after_a_disconnect_even_if_a_cancel_is_lost() -> None:
    produced = 0
    closed: list[str] = []

    async def stubborn_body() -> AsyncGenerator[bytes, None]:
        """Keeps yielding through one cancel, as a lost cancel would."""
        nonlocal produced
        swallowed = False
        while produced < 10_000:
            try:
                await asyncio.sleep(0.001)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True
            produced += 1
            yield b"data: x\n\n"

    async def on_close() -> None:
        closed.append("on_close")

    async def scenario() -> None:
        disconnect = asyncio.Event()
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if len(sent) == 5:
                disconnect.set()

        response = EventStreamResponse(stubborn_body(), on_close=on_close)
        await asyncio.wait_for(response({"type": "http"}, receive, send), 10)  # type: ignore[arg-type]
        assert response.disconnected
        assert closed == ["on_close"]
        assert produced < 20, f"the body ran on for {produced} chunks after the disconnect"

    asyncio.run(scenario())
