"""Driving a loaded plan: load stages on their nodes, feed token ids into stage 0, receive
sampled tokens from the last stage, and free every stage's KV cache when a request ends.

Hidden states go node to node; the coordinator only sends token ids and receives token ids.
Many requests share one data connection into stage 0 and one out of the last stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import numpy as np

from coordinator.nodeclient import NodeClient
from coordinator.plan import Plan
from node import datapath, trace
from node._proto.layerlink.v1 import node_pb2 as pb

log = logging.getLogger(__name__)

PREFILL_CHUNK = 512
# This coordinator process, as the owner of the stages it loads (LoadStageRequest.owner).
PROCESS_OWNER = uuid.uuid4().hex


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
    queue: asyncio.Queue[pb.StageEvent] = field(default_factory=asyncio.Queue)


class Pipeline:
    """One plan, loaded and streaming.

    Token ids go to stage 0 and sampled tokens come back from the last stage over the raw
    data path (node/datapath.py). Requests run in ring mode: the last stage feeds each sampled
    token straight back to stage 0, so the coordinator is off the per-token critical path and
    only watches tokens arrive. Control (load, unload) and per-stage error events use gRPC.
    """

    def __init__(self, plan: Plan, model_path: str, owner: str = "") -> None:
        self.plan = plan
        self.model_path = model_path
        # Who loads the stages (LoadStageRequest.owner): this process, unless told; a node
        # refuses to replace a stage that another owner still uses.
        self.owner = owner or PROCESS_OWNER
        # Stage index -> its shipped weights in the node's cache (coordinator/shipping.py);
        # a stage not named here loads model_path on its node.
        self.weights_ids: dict[int, str] = {}
        self.clients = {s.address: NodeClient(s.address) for s in plan.stages}
        self.data_addresses: list[str] = []
        self._waiters: dict[str, _Waiter] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._to_first: datapath.Link | None = None
        self._from_last: datapath.Link | None = None
        self._failed: str | None = None
        # Stage indices whose LoadStage succeeded: what close() unloads, even when the rest
        # of the plan failed to load.
        self._resident: set[int] = set()
        self.loaded = False
        self._closed = False
        self.in_flight = 0

    # ----- set-up --------------------------------------------------------------------------

    async def _data_ports(self) -> list[str]:
        out = []
        for s in self.plan.stages:
            try:
                info = await self.clients[s.address].get_info()
            except grpc.aio.AioRpcError as e:
                raise PipelineError(
                    f"node {s.node_name} ({s.address}) did not answer: {e.code().name}"
                ) from None
            if not info.data_port:
                raise PipelineError(f"node {s.node_name} ({s.address}) has no data path")
            out.append(datapath.data_address(s.address, info.data_port))
        return out

    async def load(
        self, on_stage_loaded: Callable[[int, pb.LoadStageReply], None] | None = None
    ) -> None:
        """Load every stage (in parallel) with its layer range, its next hop and the ring."""
        stages = self.plan.stages
        self.data_addresses = await self._data_ports()

        async def load_one(i: int) -> None:
            s = stages[i]
            last = i + 1 == len(stages)
            req = pb.LoadStageRequest(
                plan_id=self.plan.plan_id,
                model_path=self.model_path,
                weights_id=self.weights_ids.get(i, ""),
                start=s.start,
                end=s.end,
                next_address="" if last else stages[i + 1].address,
                next_data_address="" if last else self.data_addresses[i + 1],
                ring_data_address=self.data_addresses[0] if last else "",
                stage_index=i,
                stage_count=len(stages),
                owner=self.owner,
                device=s.device,
            )
            try:
                reply = await self.clients[s.address].load_stage(req)
            except grpc.aio.AioRpcError as e:
                raise PipelineError(
                    f"stage {i} on {s.node_name} ({s.address}) failed to load layers "
                    f"[{s.start}, {s.end}): {e.code().name}: {e.details()}"
                ) from None
            self._resident.add(i)
            if on_stage_loaded is not None:
                on_stage_loaded(i, reply)

        try:
            # Every load runs to its end, so that none is still landing when a failed plan
            # is cleaned up.
            results = await asyncio.gather(
                *(load_one(i) for i in range(len(stages))), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                raise errors[0]
        except BaseException:
            # Part of the plan loaded: free it, or its weights stay resident on those nodes.
            await self._unload_resident()
            raise
        self.loaded = True

    async def _unload_resident(self, skip: frozenset[str] = frozenset()) -> None:
        """Unload every stage of this plan that loaded (except on nodes in `skip`)."""
        stages = self.plan.stages
        resident = sorted(i for i in self._resident if stages[i].address not in skip)
        self._resident.clear()

        async def unload(i: int) -> None:
            s = stages[i]
            try:
                await self.clients[s.address].unload_stage(self.plan.plan_id, timeout=5.0)
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "could not unload stage %d of plan %s on %s: %s",
                    i,
                    self.plan.plan_id,
                    s.address,
                    e.code().name,
                )

        await asyncio.gather(*(unload(i) for i in resident))

    async def open(self) -> None:
        """Subscribe to every stage's events and open the data links to the ends."""
        if not self.data_addresses:
            self.data_addresses = await self._data_ports()
        # Errors only: tokens come over the data path (below), once. Each node acknowledges
        # its subscription once registered: no request goes out before every stage listens.
        calls = [
            self.clients[s.address].stub.Subscribe(
                pb.SubscribeRequest(plan_id=self.plan.plan_id, errors_only=True, ack=True)
            )
            for s in self.plan.stages
        ]
        try:
            streams = await asyncio.gather(
                *(self._wait_subscribed(i, call) for i, call in enumerate(calls))
            )
        except BaseException:
            for call in calls:
                call.cancel()
            raise
        for i, events in enumerate(streams):
            self._tasks.append(asyncio.create_task(self._pump_control_events(i, events)))
        try:
            self._to_first = await datapath.Link(self.data_addresses[0]).connect()
            self._from_last = await datapath.Link(self.data_addresses[-1]).connect()
        except (TimeoutError, OSError) as e:
            raise PipelineError(f"cannot open the data path: {e}") from None
        self._from_last.send(datapath.SUBSCRIBE, pb.SubscribeRequest(plan_id=self.plan.plan_id))
        assert self._from_last.reader is not None
        ack = await asyncio.wait_for(datapath.read_frame(self._from_last.reader), 10.0)
        if ack is None or not isinstance(ack[1], pb.StageEvent) or ack[1].code != 0:
            detail = ack[1].message if ack is not None and isinstance(ack[1], pb.StageEvent) else ""
            raise PipelineError(f"the last stage refused the subscription: {detail}")
        self._tasks.append(asyncio.create_task(self._pump_tokens()))

    async def _wait_subscribed(
        self,
        index: int,
        call: grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.StageEvent],
        timeout: float = 10.0,
    ) -> AsyncIterator[pb.StageEvent]:
        """Wait for the stage's acknowledgement of the control subscription
        (SubscribeRequest.ack); the stream's further events."""
        s = self.plan.stages[index]
        where = f"stage {index} on {s.node_name} ({s.address})"
        events: AsyncIterator[pb.StageEvent] = aiter(call)
        try:
            async with asyncio.timeout(timeout):
                ack = await anext(events)
        except TimeoutError:
            raise PipelineError(
                f"{where} did not acknowledge its event subscription within {timeout:.0f}s "
                "(is the node older than this coordinator? update it)"
            ) from None
        except StopAsyncIteration:
            raise PipelineError(f"{where} closed its event subscription at once") from None
        except grpc.aio.AioRpcError as e:
            raise PipelineError(f"{where} refused the subscription: {e.details()}") from None
        if ack.code != 0 or ack.request_id:
            raise PipelineError(f"{where} did not acknowledge its subscription: {ack.message}")
        return events

    def _route(self, event: pb.StageEvent) -> None:
        trace.mark("token", event.request_id, event.step)
        if not event.request_id:
            if event.code != 0:
                self.fail(f"stage {event.stage_index}: {event.message}")
            return
        waiter = self._waiters.get(event.request_id)
        if waiter is not None:
            waiter.queue.put_nowait(event)

    async def _pump_tokens(self) -> None:
        assert self._from_last is not None
        try:
            await datapath.pump_events(self._from_last, self._route)
        except asyncio.CancelledError:
            return
        except (ConnectionError, OSError, datapath.FrameError) as e:
            last = self.plan.stages[-1]
            self.fail(f"last stage on {last.node_name} ({last.address}): {e}")

    async def _pump_control_events(self, index: int, events: AsyncIterator[pb.StageEvent]) -> None:
        stage = self.plan.stages[index]
        try:
            async for event in events:
                if event.code != 0:  # tokens come over the data path; errors from every stage
                    self._route(event)
            reason = "closed its event stream"
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            return
        self.fail(f"stage {index} on {stage.node_name} ({stage.address}) {reason}")

    @property
    def failed(self) -> str | None:
        """Why this pipeline can no longer serve (None while it can)."""
        return self._failed

    def fail(self, reason: str) -> None:
        """Mark the pipeline broken and end every waiting request with `reason`."""
        if self._failed is None:
            log.error("pipeline failed: %s", reason)
        self._failed = reason
        code = grpc.StatusCode.UNAVAILABLE.value[0]
        for rid, waiter in self._waiters.items():
            waiter.queue.put_nowait(
                pb.StageEvent(request_id=rid, token=-1, code=code, message=reason)
            )

    async def close(self, unload: bool = True, skip: frozenset[str] = frozenset()) -> None:
        """Stop streaming; unload the plan's stages that loaded, all or some (except on nodes
        in `skip`, e.g. dead). Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for link in (self._to_first, self._from_last):
            if link is not None:
                await link.close()
        if unload:
            await self._unload_resident(skip)
        for c in self.clients.values():
            await c.close()

    # ----- requests ------------------------------------------------------------------------

    def _send(self, msg: pb.ForwardRequest) -> None:
        if self._to_first is None:
            raise PipelineError("the pipeline is not open")
        trace.mark("send", msg.request_id, msg.step)
        try:
            self._to_first.send(datapath.FORWARD, msg)
        except ConnectionError as e:
            self.fail(str(e))
            raise PipelineError(str(e)) from None

    async def stream(
        self, prompt: list[int], params: GenerationParams, request_id: str | None = None
    ) -> AsyncGenerator[TokenEvent, None]:
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
                self._send(
                    pb.ForwardRequest(
                        request_id=rid,
                        plan_id=plan_id,
                        phase=pb.PHASE_PREFILL,
                        tokens=prompt[i : i + PREFILL_CHUNK],
                        sample=i + PREFILL_CHUNK >= len(prompt),
                        sampling=sampling,
                        want_logits=params.want_logits,
                        position=i,
                        step=0,
                        max_tokens=params.max_tokens,
                        stop_tokens=sorted(params.stop_token_ids),
                    )
                )
            for step in range(params.max_tokens):
                event = await self._next_event(waiter, rid, step, params.step_timeout_s)
                logits = None
                if event.HasField("logits") and event.logits.data:
                    logits = np.frombuffer(event.logits.data, dtype=np.float32).reshape(
                        tuple(event.logits.shape)
                    )
                yield TokenEvent(token=event.token, step=step, logits=logits)
                if event.token in params.stop_token_ids:
                    return
        finally:
            self.in_flight -= 1
            self._waiters.pop(rid, None)
            if self._failed is None and self._to_first is not None:
                with contextlib.suppress(ConnectionError):
                    self._to_first.send(
                        datapath.FORWARD,
                        pb.ForwardRequest(request_id=rid, plan_id=plan_id, phase=pb.PHASE_RELEASE),
                    )

    async def _next_event(
        self, waiter: _Waiter, rid: str, step: int, timeout: float
    ) -> pb.StageEvent:
        while True:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result instead
            # of raising when it is cancelled just as the token arrives, and that lost cancel
            # kept a disconnected client's generation running to max_tokens.
            try:
                async with asyncio.timeout(timeout):
                    msg = await waiter.queue.get()
            except TimeoutError:
                raise PipelineError(
                    f"no token for request {rid} step {step} within {timeout:.0f}s"
                ) from None
            if msg.code != 0:
                raise PipelineError(f"request {rid} failed: {msg.message}")
            if msg.step == step:
                return msg

    async def generate(self, prompt: list[int], params: GenerationParams) -> GenerationResult:
        return await collect(self.stream(prompt, params), prompt, params)


async def collect(
    events: AsyncIterator[TokenEvent], prompt: list[int], params: GenerationParams
) -> GenerationResult:
    """Drain a token stream into a GenerationResult with its timings."""
    t0 = time.perf_counter()
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    t_first = 0.0
    async for ev in events:
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
