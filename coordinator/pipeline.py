"""Driving a loaded plan: load stages on their nodes, feed token ids into stage 0, receive
sampled tokens from the last stage, and free every stage's KV cache when a request ends.

Hidden states go node to node; the coordinator only sends token ids and receives token ids.
Many requests share one Forward stream into stage 0 and one Subscribe stream per stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from coordinator.nodeclient import NodeClient
from coordinator.plan import Plan
from node._proto.layerlink.v1 import node_pb2 as pb

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512


class PipelineError(RuntimeError):
    """A request or the pipeline failed; the message says where and why."""


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    want_logits: bool = False
    step_timeout_s: float = 120.0


@dataclass(frozen=True)
class TokenEvent:
    token: int
    step: int
    logits: np.ndarray | None = None


@dataclass(frozen=True)
class GenerationResult:
    prompt_tokens: int
    tokens: tuple[int, ...]
    finish_reason: str  # "stop" | "length"
    ttft_s: float
    decode_s: float
    logits: tuple[np.ndarray, ...] = ()

    @property
    def decode_tps(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass
class _Waiter:
    queue: asyncio.Queue[pb.StageEvent | pb.ForwardReply] = field(default_factory=asyncio.Queue)


class Pipeline:
    """One plan, loaded and streaming."""

    def __init__(self, plan: Plan, model_path: str) -> None:
        self.plan = plan
        self.model_path = model_path
        self.clients = {s.address: NodeClient(s.address) for s in plan.stages}
        self._waiters: dict[str, _Waiter] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._inbox: asyncio.Queue[pb.ForwardRequest | None] = asyncio.Queue()
        self._failed: str | None = None
        self.loaded = False
        self.in_flight = 0

    # ----- set-up --------------------------------------------------------------------------

    async def load(
        self, on_stage_loaded: Callable[[int, pb.LoadStageReply], None] | None = None
    ) -> None:
        """Load every stage (in parallel) with its layer range and its next hop."""
        stages = self.plan.stages

        async def load_one(i: int) -> None:
            s = stages[i]
            req = pb.LoadStageRequest(
                plan_id=self.plan.plan_id,
                model_path=self.model_path,
                start=s.start,
                end=s.end,
                next_address=stages[i + 1].address if i + 1 < len(stages) else "",
                stage_index=i,
                stage_count=len(stages),
            )
            try:
                reply = await self.clients[s.address].load_stage(req)
            except grpc.aio.AioRpcError as e:
                raise PipelineError(
                    f"stage {i} on {s.node_name} ({s.address}) failed to load layers "
                    f"[{s.start}, {s.end}): {e.code().name}: {e.details()}"
                ) from None
            if on_stage_loaded is not None:
                on_stage_loaded(i, reply)

        await asyncio.gather(*(load_one(i) for i in range(len(stages))))
        self.loaded = True

    async def open(self) -> None:
        """Subscribe to every stage's events and open the forward stream into stage 0."""
        for i, s in enumerate(self.plan.stages):
            call = self.clients[s.address].stub.Subscribe(
                pb.SubscribeRequest(plan_id=self.plan.plan_id)
            )
            self._tasks.append(asyncio.create_task(self._pump_events(i, call)))
        first = self.clients[self.plan.stages[0].address]
        fwd = first.stub.Forward(self._outgoing())
        self._tasks.append(asyncio.create_task(self._pump_replies(fwd)))
        # Wait until every subscription is live on its node so no event can be missed.
        for s in self.plan.stages:
            await self._wait_subscribed(s.address)

    async def _wait_subscribed(self, address: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            call = self.clients[address].stub.GetInfo(pb.GetInfoRequest(), timeout=5.0)
            info = await call
            if any(st.plan_id == self.plan.plan_id for st in info.stages):
                # Subscribe handlers register synchronously on their first read; a short
                # yield lets the server run them before the first request goes out.
                await asyncio.sleep(0.05)
                return
            await asyncio.sleep(0.05)
        raise PipelineError(f"stage on {address} never became ready")

    async def _outgoing(self) -> AsyncIterator[pb.ForwardRequest]:
        while True:
            msg = await self._inbox.get()
            if msg is None:
                return
            yield msg

    async def _pump_events(
        self, index: int, call: grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.StageEvent]
    ) -> None:
        stage = self.plan.stages[index]
        try:
            async for event in call:
                waiter = self._waiters.get(event.request_id)
                if waiter is not None:
                    waiter.queue.put_nowait(event)
            reason = "closed its event stream"
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            return
        self._fail(f"stage {index} on {stage.node_name} ({stage.address}) {reason}")

    async def _pump_replies(
        self, call: grpc.aio.StreamStreamCall[pb.ForwardRequest, pb.ForwardReply]
    ) -> None:
        try:
            async for reply in call:
                waiter = self._waiters.get(reply.request_id)
                if waiter is not None:
                    waiter.queue.put_nowait(reply)
            reason = "closed the forward stream"
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            return
        self._fail(f"stage 0 ({self.plan.stages[0].address}) {reason}")

    def _fail(self, reason: str) -> None:
        if self._failed is None:
            log.error("pipeline failed: %s", reason)
        self._failed = reason
        for waiter in self._waiters.values():
            waiter.queue.put_nowait(pb.ForwardReply(code=14, message=reason))

    async def close(self, unload: bool = True) -> None:
        self._inbox.put_nowait(None)
        for t in self._tasks:
            t.cancel()
        if unload and self.loaded:
            for s in self.plan.stages:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self.clients[s.address].unload_stage(self.plan.plan_id)
        for c in self.clients.values():
            await c.close()

    # ----- requests ------------------------------------------------------------------------

    async def stream(
        self, prompt: list[int], params: GenerationParams, request_id: str | None = None
    ) -> AsyncIterator[TokenEvent]:
        """Yield sampled tokens until a stop token or max_tokens. Leaving early (break,
        cancel, client disconnect) frees the request's KV cache on every stage."""
        if self._failed is not None:
            raise PipelineError(self._failed)
        if not prompt:
            raise PipelineError("the prompt has no tokens")
        if params.max_tokens < 1:
            raise PipelineError("max_tokens must be at least 1")
        rid = request_id or uuid.uuid4().hex
        waiter = _Waiter()
        self._waiters[rid] = waiter
        self.in_flight += 1
        plan_id = self.plan.plan_id
        sampling = pb.SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed or 0,
            has_seed=params.seed is not None,
        )
        try:
            for i in range(0, len(prompt), PREFILL_CHUNK):
                chunk = prompt[i : i + PREFILL_CHUNK]
                self._inbox.put_nowait(
                    pb.ForwardRequest(
                        request_id=rid,
                        plan_id=plan_id,
                        phase=pb.PHASE_PREFILL,
                        tokens=chunk,
                        sample=i + PREFILL_CHUNK >= len(prompt),
                        sampling=sampling,
                        want_logits=params.want_logits,
                        position=i,
                        step=0,
                    )
                )
            position = len(prompt)
            for step in range(params.max_tokens):
                event = await self._next_event(waiter, rid, step, params.step_timeout_s)
                logits = None
                if event.HasField("logits") and event.logits.data:
                    logits = np.frombuffer(event.logits.data, dtype=np.float32).reshape(
                        tuple(event.logits.shape)
                    )
                yield TokenEvent(token=event.token, step=step, logits=logits)
                if event.token in params.stop_token_ids or step + 1 == params.max_tokens:
                    return
                self._inbox.put_nowait(
                    pb.ForwardRequest(
                        request_id=rid,
                        plan_id=plan_id,
                        phase=pb.PHASE_DECODE,
                        tokens=[event.token],
                        sample=True,
                        sampling=sampling,
                        want_logits=params.want_logits,
                        position=position,
                        step=step + 1,
                    )
                )
                position += 1
        finally:
            self.in_flight -= 1
            self._waiters.pop(rid, None)
            self._inbox.put_nowait(
                pb.ForwardRequest(request_id=rid, plan_id=plan_id, phase=pb.PHASE_RELEASE)
            )

    async def _next_event(
        self, waiter: _Waiter, rid: str, step: int, timeout: float
    ) -> pb.StageEvent:
        while True:
            try:
                msg = await asyncio.wait_for(waiter.queue.get(), timeout)
            except asyncio.TimeoutError:
                raise PipelineError(
                    f"no token for request {rid} step {step} within {timeout:.0f}s"
                ) from None
            if isinstance(msg, pb.ForwardReply) or msg.code != 0:
                raise PipelineError(f"request {rid} failed: {msg.message}")
            if msg.step == step:
                return msg

    async def generate(self, prompt: list[int], params: GenerationParams) -> GenerationResult:
        t0 = time.perf_counter()
        tokens: list[int] = []
        logits: list[np.ndarray] = []
        t_first = 0.0
        async for ev in self.stream(prompt, params):
            if not tokens:
                t_first = time.perf_counter()
            tokens.append(ev.token)
            if ev.logits is not None:
                logits.append(ev.logits)
        t_end = time.perf_counter()
        finish = "stop" if tokens and tokens[-1] in params.stop_token_ids else "length"
        return GenerationResult(
            prompt_tokens=len(prompt),
            tokens=tuple(tokens),
            finish_reason=finish,
            ttft_s=t_first - t0,
            decode_s=t_end - t_first,
            logits=tuple(logits),
        )
