"""The node's gRPC servicer: decode the request, run the stage on the compute thread,
encode the reply. Stage failures become gRPC status codes with a message a person can act on.

The forward path: messages arrive on a persistent `Forward` stream, run in arrival order on
the one compute thread, and their outputs leave in that same order — hidden states on the
stream to the next stage's node, sampled tokens as `StageEvent`s to the coordinator's
`Subscribe` stream. A rejected message is answered on the stream it came on (and reported to
subscribers); the stream itself keeps serving other requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import mlx.core as mx

from node import PROTOCOL_VERSION, __version__, codec, devicebench, hardware, linkprobe
from node._proto.layerlink.v1 import node_pb2 as pb
from node._proto.layerlink.v1 import node_pb2_grpc as pb_grpc
from node.stage import ErrorKind, ModelStage, Sampling, StageError, StageSpec, StepResult

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Keepalive pings find a dead peer on an idle connection. The server must accept pings at
# that rate, or it answers GOAWAY "too_many_pings" and idle pipelines break (a bug seen after
# ~30 s idle). LAYERLINK_GRPC_KEEPALIVE_MS shortens the interval for tests.
KEEPALIVE_MS = int(os.environ.get("LAYERLINK_GRPC_KEEPALIVE_MS", "10000"))
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_MS),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", max(100, KEEPALIVE_MS // 2)),
    ("grpc.http2.max_ping_strikes", 0),
]
_CODES = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    return _CODES[kind]


def code_number(code: grpc.StatusCode) -> int:
    value: tuple[int, str] = code.value
    return value[0]


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    name: str
    host: str
    port: int
    cluster: str
    model_dirs: tuple[Path, ...] = ()
    idle_timeout_s: float = 600.0
    llama_rpc_port: int = 0
    llama_rpc_version: int = 0


class Downstream:
    """A persistent Forward stream to the next stage's node, fed from a queue."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._queue: asyncio.Queue[pb.ForwardRequest | None] = asyncio.Queue()
        self._channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._task = asyncio.create_task(self._run())

    def send(self, msg: pb.ForwardRequest) -> None:
        self._queue.put_nowait(msg)

    async def _requests(self) -> AsyncIterator[pb.ForwardRequest]:
        while True:
            msg = await self._queue.get()
            if msg is None:
                return
            yield msg

    async def _run(self) -> None:
        stub = pb_grpc.NodeStub(self._channel)
        try:
            call = stub.Forward(self._requests())
            async for reply in call:
                log.warning(
                    "next stage %s rejected %s step %d: %s",
                    self.address,
                    reply.request_id,
                    reply.step,
                    reply.message,
                )
        except grpc.aio.AioRpcError as e:
            log.error(
                "stream to next stage %s ended: %s %s", self.address, e.code().name, e.details()
            )
        except asyncio.CancelledError:
            pass

    async def close(self) -> None:
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 2.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        await self._channel.close()


class LoadedStage:
    """A stage plus its async plumbing (downstream stream, subscribers)."""

    def __init__(self, stage: ModelStage) -> None:
        self.stage = stage
        self.subscribers: set[asyncio.Queue[pb.StageEvent]] = set()
        self.downstream: Downstream | None = None

    def publish(self, event: pb.StageEvent) -> None:
        for q in self.subscribers:
            q.put_nowait(event)

    def status(self) -> pb.StageStatus:
        s = self.stage.spec
        return pb.StageStatus(
            plan_id=s.plan_id,
            model=str(s.model_path),
            start=s.start,
            end=s.end,
            first=s.first,
            last=s.last,
            active_requests=len(self.stage.requests),
            weight_bytes=self.stage.weight_bytes,
            next_address=s.next_address,
        )


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, config: NodeConfig, hw: hardware.Hardware) -> None:
        self.config = config
        self.hw = hw
        # MLX is not thread-safe across streams: one compute thread runs every MLX call.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self.stages: dict[str, LoadedStage] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # ----- plumbing ------------------------------------------------------------------------

    async def run_compute(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    def start_background(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep())

    async def _sweep(self) -> None:
        period = min(30.0, max(0.5, self.config.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            for loaded in list(self.stages.values()):
                gone = await self.run_compute(loaded.stage.expire, self.config.idle_timeout_s)
                for rid in gone:
                    log.info("freed KV cache of idle request %s", rid)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for loaded in self.stages.values():
            if loaded.downstream is not None:
                await loaded.downstream.close()
        self._compute.shutdown(wait=False, cancel_futures=True)

    def resolve_model_path(self, raw: str) -> Path:
        """Resolve a requested model folder; it must lie inside a --model-dir root if any."""
        if not raw or "\x00" in raw or len(raw) > 4096:
            raise StageError(ErrorKind.INVALID_ARGUMENT, "model_path must be a non-empty path")
        path = Path(raw)
        if self.config.model_dirs:
            if not path.is_absolute():
                candidates = [root / path for root in self.config.model_dirs]
                path = next((c for c in candidates if c.exists()), candidates[0])
            resolved = path.resolve()
            roots = [r.resolve() for r in self.config.model_dirs]
            if not any(resolved == r or r in resolved.parents for r in roots):
                raise StageError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"model path {raw!r} is outside this node's model directories "
                    f"({', '.join(str(r) for r in roots)})",
                )
            return resolved
        return path.resolve()

    # ----- RPCs ----------------------------------------------------------------------------

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.NodeInfo:
        total, avail = hardware.memory()
        devices = [
            pb.DeviceInfo(
                index=d.index,
                name=d.name,
                kind=d.kind,
                mem_total_bytes=d.mem_total_bytes,
                mem_free_bytes=avail if d.kind in ("cpu", "metal") else d.mem_free_bytes,
                pcie=pb.PcieInfo(
                    gen=d.pcie_gen,
                    width=d.pcie_width,
                    max_gen=d.pcie_max_gen,
                    max_width=d.pcie_max_width,
                )
                if d.kind == "cuda"
                else None,
            )
            for d in self.hw.devices
        ]
        return pb.NodeInfo(
            node_id=self.config.node_id,
            name=self.config.name,
            protocol_version=PROTOCOL_VERSION,
            backend=self.hw.backend,
            os=self.hw.os,
            cpu=self.hw.cpu,
            hostname=self.hw.hostname,
            mem_total_bytes=total,
            mem_available_bytes=avail,
            devices=devices,
            stages=[s.status() for s in self.stages.values()],
            grpc_port=self.config.port,
            cluster=self.config.cluster,
            mlx_active_bytes=mx.get_active_memory(),
            llama_rpc_port=self.config.llama_rpc_port,
            llama_rpc_version=self.config.llama_rpc_version,
            version=__version__,
        )

    async def LoadStage(
        self, request: pb.LoadStageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadStageReply:
        try:
            if not request.plan_id or len(request.plan_id) > 128:
                raise StageError(ErrorKind.INVALID_ARGUMENT, "plan_id must be 1-128 characters")
            if request.stage_count and request.stage_index >= request.stage_count:
                raise StageError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"stage_index {request.stage_index} >= stage_count {request.stage_count}",
                )
            spec = StageSpec(
                plan_id=request.plan_id,
                model_path=self.resolve_model_path(request.model_path),
                start=request.start,
                end=request.end,
                stage_index=request.stage_index,
                stage_count=max(1, request.stage_count),
                next_address=request.next_address,
            )
            old = self.stages.pop(request.plan_id, None)
            if old is not None:
                await self._drop(old)
            stage = await self.run_compute(ModelStage, spec)
        except StageError as e:
            await context.abort(status_code(e.kind), str(e))
        loaded = LoadedStage(stage)
        if spec.next_address:
            loaded.downstream = Downstream(spec.next_address)
        self.stages[spec.plan_id] = loaded
        return pb.LoadStageReply(stage=loaded.status(), load_seconds=stage.load_seconds)

    async def _drop(self, loaded: LoadedStage) -> None:
        if loaded.downstream is not None:
            await loaded.downstream.close()
        loaded.stage.requests.clear()
        # Drop the weights on the compute thread, then let MLX return the memory.
        await self.run_compute(mx.clear_cache)

    async def UnloadStage(
        self, request: pb.UnloadStageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnloadStageReply:
        loaded = self.stages.pop(request.plan_id, None)
        if loaded is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"no stage of plan {request.plan_id!r} is loaded here"
            )
        assert loaded is not None  # abort raised otherwise
        await self._drop(loaded)
        del loaded
        await self.run_compute(mx.clear_cache)
        return pb.UnloadStageReply(unloaded=True)

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ReleaseReply:
        loaded = self.stages.get(request.plan_id)
        if loaded is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"plan {request.plan_id!r} is not loaded on this node",
            )
        assert loaded is not None  # abort raised otherwise
        released = await self.run_compute(loaded.stage.release, request.request_id)
        if not released:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown request id {request.request_id!r}"
            )
        return pb.ReleaseReply(released=True)

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StageEvent]:
        loaded = self.stages.get(request.plan_id)
        if loaded is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"plan {request.plan_id!r} is not loaded on this node",
            )
        assert loaded is not None  # abort raised otherwise
        queue: asyncio.Queue[pb.StageEvent] = asyncio.Queue()
        loaded.subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            loaded.subscribers.discard(queue)

    async def Forward(
        self,
        request_iterator: AsyncIterator[pb.ForwardRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ForwardReply]:
        replies: asyncio.Queue[pb.ForwardReply | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    self._dispatch(msg, replies)
            finally:
                replies.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await replies.get()) is not None:
                yield reply
        finally:
            reader.cancel()

    def _reject(
        self,
        msg: pb.ForwardRequest,
        loaded: LoadedStage | None,
        code: grpc.StatusCode,
        message: str,
        replies: asyncio.Queue[pb.ForwardReply | None],
    ) -> None:
        log.info("rejected %s step %d: %s %s", msg.request_id, msg.step, code.name, message)
        replies.put_nowait(
            pb.ForwardReply(
                request_id=msg.request_id, code=code_number(code), message=message, step=msg.step
            )
        )
        if loaded is not None:
            loaded.publish(
                pb.StageEvent(
                    request_id=msg.request_id,
                    step=msg.step,
                    token=-1,
                    code=code_number(code),
                    message=message,
                    stage_index=loaded.stage.spec.stage_index,
                )
            )

    def _dispatch(
        self, msg: pb.ForwardRequest, replies: asyncio.Queue[pb.ForwardReply | None]
    ) -> None:
        loaded = self.stages.get(msg.plan_id)
        if loaded is None:
            self._reject(
                msg,
                None,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"plan {msg.plan_id!r} is not loaded on this node",
                replies,
            )
            return
        if not msg.request_id or len(msg.request_id) > 128:
            self._reject(
                msg,
                loaded,
                grpc.StatusCode.INVALID_ARGUMENT,
                "request_id must be 1-128 characters",
                replies,
            )
            return
        if msg.phase == pb.PHASE_RELEASE:
            released = asyncio.get_running_loop().run_in_executor(
                self._compute, loaded.stage.release, msg.request_id
            )
            if loaded.downstream is not None:
                loaded.downstream.send(msg)
            released.add_done_callback(lambda f: f.exception())
            return
        if msg.phase not in (pb.PHASE_PREFILL, pb.PHASE_DECODE):
            self._reject(
                msg, loaded, grpc.StatusCode.INVALID_ARGUMENT, f"unknown phase {msg.phase}", replies
            )
            return
        stage = loaded.stage
        hidden = None
        if not stage.spec.first:
            if not msg.HasField("hidden"):
                self._reject(
                    msg,
                    loaded,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"stage {stage.spec.stage_index} expects hidden states, the message has none",
                    replies,
                )
                return
            try:
                hidden = codec.from_proto(
                    msg.hidden,
                    dtype=codec.dtype_name(stage.dtype),
                    ndim=3,
                    last_dim=stage.hidden_size,
                )
            except codec.CodecError as e:
                self._reject(msg, loaded, grpc.StatusCode.INVALID_ARGUMENT, str(e), replies)
                return
        sp = msg.sampling
        sampling = Sampling(
            temperature=max(0.0, float(sp.temperature)),
            top_p=float(sp.top_p) if 0 < sp.top_p <= 1 else 1.0,
            seed=int(sp.seed) if sp.has_seed else None,
        )
        fut = asyncio.get_running_loop().run_in_executor(
            self._compute,
            stage.step,
            msg.request_id,
            msg.position,
            msg.phase == pb.PHASE_PREFILL,
            sampling,
            list(msg.tokens) if stage.spec.first else None,
            hidden,
            msg.sample,
            msg.want_logits,
        )
        fut.add_done_callback(lambda f: self._finish(msg, loaded, f, replies))

    def _finish(
        self,
        msg: pb.ForwardRequest,
        loaded: LoadedStage,
        fut: asyncio.Future[StepResult],
        replies: asyncio.Queue[pb.ForwardReply | None],
    ) -> None:
        exc = fut.exception()
        if isinstance(exc, StageError):
            self._reject(msg, loaded, status_code(exc.kind), str(exc), replies)
            return
        if exc is not None:
            log.exception("stage step failed", exc_info=exc)
            self._reject(
                msg,
                loaded,
                grpc.StatusCode.INTERNAL,
                f"stage failed: {type(exc).__name__}: {exc}",
                replies,
            )
            return
        result = fut.result()
        spec = loaded.stage.spec
        if result.hidden is not None:
            assert loaded.downstream is not None
            out = pb.ForwardRequest(
                request_id=msg.request_id,
                plan_id=msg.plan_id,
                phase=msg.phase,
                hidden=codec.to_proto(result.hidden),
                sample=msg.sample,
                sampling=msg.sampling,
                want_logits=msg.want_logits,
                position=msg.position,
                step=msg.step,
            )
            loaded.downstream.send(out)
        elif spec.last and msg.sample:
            event = pb.StageEvent(
                request_id=msg.request_id,
                step=msg.step,
                token=result.token,
                stage_index=spec.stage_index,
                compute_seconds=result.compute_seconds,
            )
            if result.logits is not None:
                event.logits.CopyFrom(codec.to_proto(result.logits))
            loaded.publish(event)

    async def Echo(
        self,
        request_iterator: AsyncIterator[pb.EchoRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.EchoReply]:
        async for req in request_iterator:
            if req.reply_bytes:
                yield pb.EchoReply(payload=bytes(min(req.reply_bytes, MAX_MESSAGE_BYTES // 2)))
            else:
                yield pb.EchoReply(payload=req.payload)

    async def MeasureLink(
        self, request: pb.MeasureLinkRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MeasureLinkReply:
        try:
            reply: pb.MeasureLinkReply = await linkprobe.measure_link(request, self.config.node_id)
        except linkprobe.LinkProbeError as e:
            await context.abort(e.code, str(e))
        return reply

    async def MeasureDevices(
        self, request: pb.MeasureDevicesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.MeasureDevicesReply:
        t0 = time.perf_counter()
        try:
            reply: pb.MeasureDevicesReply = await self.run_compute(
                devicebench.measure_devices, request
            )
        except devicebench.BenchError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.info("measured devices in %.2fs", time.perf_counter() - t0)
        return reply
