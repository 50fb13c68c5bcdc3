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
import collections
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import mlx.core as mx

from node import (
    PROTOCOL_VERSION,
    __version__,
    auth,
    codec,
    computedtype,
    cpus,
    devicebench,
    devices,
    hardware,
    inputs,
    linkprobe,
    trace,
)
from node._proto.layerlink.v1 import node_pb2 as pb
from node._proto.layerlink.v1 import node_pb2_grpc as pb_grpc
from node.downstream import Downstream, GrpcDownstream, TcpDownstream
from node.shipping import Chunk, WeightService, stage_error
from node.stage import (
    MAX_BATCH,
    DecodeItem,
    ErrorKind,
    ModelStage,
    Sampling,
    StageError,
    StageSpec,
    StepResult,
)
from node.weightcache import CachedStage, CacheError, default_root

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M")
LOCAL_RING = "local"
ReplySink = Callable[[pb.ForwardReply], None]
StepWork = tuple[pb.ForwardRequest, "LoadedStage", ReplySink]
Work = StepWork | Callable[[], object]

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


# How long GetInfo waits for a device worker's stages: well under the coordinator's 1 s
# heartbeat deadline, which a node's GetInfo must meet whatever its workers do.
WORKER_INFO_TIMEOUT_S = 0.3


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
    # Weight cache for shipped tensors (default: node.weightcache.default_root()), its cap
    # in bytes (0: a share of the disk).
    cache_dir: Path | None = None
    cache_max_bytes: int = 0
    data_port: int = 0
    # The devices this process and the node's device workers serve (node/devices.py).
    serving: devices.Serving = devices.Serving()


def _sampling_of(msg: pb.ForwardRequest) -> Sampling:
    sp = msg.sampling
    return Sampling(
        temperature=max(0.0, float(sp.temperature)),
        top_p=float(sp.top_p) if 0 < sp.top_p <= 1 else 1.0,
        seed=int(sp.seed) if sp.has_seed else None,
    )


def _from_any_thread(put: Callable[[M], None]) -> Callable[[M], None]:
    """`put` (an asyncio queue's, loop-bound) made callable from the compute thread too."""
    loop = asyncio.get_running_loop()

    def call(item: M) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closing
            loop.call_soon_threadsafe(put, item)

    return call


class LoadedStage:
    """A stage plus its async plumbing (downstream stream, subscribers)."""

    def __init__(self, stage: ModelStage, owner: str = "") -> None:
        self.stage = stage
        self.owner = owner  # the coordinator process that loaded it ("" unknown)
        self.subscribers: list[Callable[[pb.StageEvent], None]] = []
        # Where hidden states go (None on the last stage).
        self.downstream: Downstream | None = None
        # Last stage in ring mode: where the next decode step goes (stage 0's node), or
        # LOCAL_RING when this one stage is the whole pipeline.
        self.ring: Downstream | str | None = None
        # Single-token decode steps and their compute time (StageStatus); of those, the ones
        # that shared a forward pass with other requests' steps.
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self.batched_steps = 0

    def publish(self, event: pb.StageEvent) -> None:
        for push in list(self.subscribers):
            push(event)

    def subscribe(self, push: Callable[[pb.StageEvent], None]) -> Callable[[], None]:
        self.subscribers.append(push)
        return lambda: self.subscribers.remove(push) if push in self.subscribers else None

    def hop_failed(self, reason: str) -> None:
        """A hop this stage sends on is gone: tell every subscriber (request_id empty)."""
        code = code_number(grpc.StatusCode.UNAVAILABLE)
        self.publish(
            pb.StageEvent(
                token=-1, code=code, message=reason, stage_index=self.stage.spec.stage_index
            )
        )

    async def close_links(self) -> None:
        """Close the hops and drop them: they hold `hop_failed`, a reference back to this
        stage, and the cycle would keep the stage's weights alive until a GC pass."""
        downstream, ring = self.downstream, self.ring
        self.downstream = self.ring = None
        self.subscribers.clear()
        if downstream is not None:
            await downstream.close()
        if ring is not None and not isinstance(ring, str):
            await ring.close()

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
            weights_id=s.cached.weights_id if s.cached is not None else "",
            decode_steps=self.decode_steps,
            decode_seconds=self.decode_seconds,
            batched_steps=self.batched_steps,
            compute_dtype=codec.dtype_name(self.stage.dtype),
        )


class NodeService(pb_grpc.NodeServicer):
    def __init__(self, config: NodeConfig, hw: hardware.Hardware) -> None:
        self.config = config
        self.hw = hw
        # Channels to the node's device workers (GetInfo lists their stages).
        self._worker_channels: list[grpc.aio.Channel] = []
        self._worker_stubs: dict[int, pb_grpc.NodeStub] = {}
        # Every MLX call runs on this one thread: MLX streams belong to the thread that made
        # them, so an array left unevaluated by one thread cannot be evaluated by another.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        # Steps and releases wait here for the compute thread, which drains them in order
        # and batches the decode steps of one stage that wait together.
        self._work: collections.deque[Work] = collections.deque()
        self._work_lock = threading.Lock()
        self._draining = False
        self.stages: dict[str, LoadedStage] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.weights = WeightService(config.cache_dir or default_root(), config.cache_max_bytes)

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
        for channel in self._worker_channels:
            await channel.close()
        self.weights.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for loaded in self.stages.values():
            await loaded.close_links()
        self._compute.shutdown(wait=False, cancel_futures=True)

    def resolve_model_path(self, raw: str) -> Path:
        """Resolve a requested model folder; it must lie inside a --model-dir root if any
        (no '..', no symbolic link out of the roots: node/inputs.py)."""
        return inputs.confine_model_path(raw, self.config.model_dirs)

    # ----- RPCs ----------------------------------------------------------------------------

    def _memory_now(self) -> tuple[int, int, tuple[hardware.Device, ...]]:
        """Host memory and every device's memory, read now (NVML, vm_stat: milliseconds)."""
        total, avail = hardware.memory()
        return total, avail, hardware.live_devices(self.hw.devices, (total, avail))

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.NodeInfo:
        total, avail, live = await asyncio.to_thread(self._memory_now)
        serving = self.config.serving
        workers = {w.device: w for w in serving.workers}
        infos = [
            pb.DeviceInfo(
                index=d.index,
                name=d.name,
                kind=d.kind,
                mem_total_bytes=d.mem_total_bytes,
                mem_free_bytes=d.mem_free_bytes,
                pcie=pb.PcieInfo(
                    gen=d.pcie_gen,
                    width=d.pcie_width,
                    max_gen=d.pcie_max_gen,
                    max_width=d.pcie_max_width,
                )
                if d.kind == "cuda"
                else None,
                compute_dtype=computedtype.policy(),
                mem_source=d.mem_source,
                runs_stages=d.runs_stages,
                grpc_port=workers[d.index].grpc_port if d.index in workers else 0,
                data_port=workers[d.index].data_port if d.index in workers else 0,
            )
            for d in devices.served_devices(live, serving)
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
            devices=infos,
            stages=[*self._own_stages(), *await self._worker_stages()],
            grpc_port=self.config.port,
            cluster=self.config.cluster,
            mlx_active_bytes=mx.get_active_memory(),
            llama_rpc_port=self.config.llama_rpc_port,
            llama_rpc_version=self.config.llama_rpc_version,
            version=__version__,
            data_port=self.config.data_port,
            cpu_cores=sorted(cpus.available()),
        )

    def _own_stages(self) -> list[pb.StageStatus]:
        out = []
        for loaded in self.stages.values():
            status = loaded.status()
            status.device = str(self.config.serving.own)
            out.append(status)
        return out

    async def _worker_stages(self) -> list[pb.StageStatus]:
        """The stages the node's device workers hold (a worker that does not answer within
        WORKER_INFO_TIMEOUT_S is left out: its node stops when it exits)."""

        async def one(worker: devices.DeviceServer) -> list[pb.StageStatus]:
            try:
                info = await self._worker_stub(worker).GetInfo(
                    pb.GetInfoRequest(), timeout=WORKER_INFO_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as e:
                log.warning("device %d's worker did not answer: %s", worker.device, e.code().name)
                return []
            return list(info.stages)

        found = await asyncio.gather(*(one(w) for w in self.config.serving.workers))
        return [st for group in found for st in group]

    def _worker_stub(self, worker: devices.DeviceServer) -> pb_grpc.NodeStub:
        """The node's channel to one of its device workers (opened once, kept)."""
        stub = self._worker_stubs.get(worker.device)
        if stub is None:
            host = self.config.host
            local = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
            channel = auth.secure_channel(f"{local}:{worker.grpc_port}")
            self._worker_channels.append(channel)
            stub = self._worker_stubs[worker.device] = pb_grpc.NodeStub(channel)
        return stub

    def _check_not_in_use(self, plan_id: str, owner: str) -> None:
        """Plan ids follow from the model and the placement, so two coordinators with the
        same plan over the same nodes ask for the same id. The stage of one that is still
        connected (it has subscribers) is not replaced by another's; a coordinator that
        went away (no subscribers left) or the same one loading again may replace it."""
        old = self.stages.get(plan_id)
        if old is None or not owner or not old.owner or old.owner == owner:
            return
        if old.subscribers:
            raise StageError(
                ErrorKind.FAILED_PRECONDITION,
                f"plan {plan_id} is loaded on this node by another coordinator that is still "
                f"connected ({len(old.subscribers)} subscriber(s)); stop it first, or use a "
                "different plan",
            )

    async def LoadStage(
        self, request: pb.LoadStageRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadStageReply:
        try:
            if not request.plan_id or len(request.plan_id) > 128:
                raise StageError(ErrorKind.INVALID_ARGUMENT, "plan_id must be 1-128 characters")
            for field in ("next_address", "next_data_address", "ring_data_address"):
                inputs.check_address(getattr(request, field), field)
            if request.stage_count and request.stage_index >= request.stage_count:
                raise StageError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"stage_index {request.stage_index} >= stage_count {request.stage_count}",
                )
            if len(request.owner) > 128:
                raise StageError(ErrorKind.INVALID_ARGUMENT, "owner must be at most 128 characters")
            why = devices.check_stage_device(request.device, self.config.serving, self.config.host)
            if why:
                raise StageError(ErrorKind.FAILED_PRECONDITION, why)
            self._check_not_in_use(request.plan_id, request.owner)
            model_path, cached = await self._stage_source(request)
            spec = StageSpec(
                plan_id=request.plan_id,
                model_path=model_path,
                start=request.start,
                end=request.end,
                stage_index=request.stage_index,
                stage_count=max(1, request.stage_count),
                next_address=request.next_address,
                cached=cached,
            )
            self._check_not_in_use(request.plan_id, request.owner)  # again, after awaiting
            old = self.stages.pop(request.plan_id, None)
            if old is not None:
                await self._drop(old)
            stage = await self.run_compute(ModelStage, spec)
        except StageError as e:
            await context.abort(status_code(e.kind), str(e))
        loaded = LoadedStage(stage, request.owner)
        if request.next_data_address:
            loaded.downstream = TcpDownstream(request.next_data_address, loaded.hop_failed)
        elif spec.next_address:
            loaded.downstream = GrpcDownstream(
                spec.next_address, CHANNEL_OPTIONS, loaded.hop_failed
            )
        if spec.last and request.ring_data_address:
            loaded.ring = (
                LOCAL_RING
                if spec.first
                else TcpDownstream(request.ring_data_address, loaded.hop_failed)
            )
        self.stages[spec.plan_id] = loaded
        return pb.LoadStageReply(stage=loaded.status(), load_seconds=stage.load_seconds)

    async def _drop(self, loaded: LoadedStage) -> None:
        await loaded.close_links()
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
        put = _from_any_thread(queue.put_nowait)
        if request.errors_only:
            # Filtered on the compute thread: a token costs this stream nothing, not even a
            # wake-up of the event loop.
            def push(event: pb.StageEvent) -> None:
                if event.code != 0:
                    put(event)

            unsubscribe = loaded.subscribe(push)
        else:
            unsubscribe = loaded.subscribe(put)
        try:
            if request.ack:
                # Registered above: every event from here on reaches this subscriber.
                yield pb.StageEvent(
                    token=-1, message="subscribed", stage_index=loaded.stage.spec.stage_index
                )
            while True:
                yield await queue.get()
        finally:
            unsubscribe()

    async def Forward(
        self,
        request_iterator: AsyncIterator[pb.ForwardRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ForwardReply]:
        replies: asyncio.Queue[pb.ForwardReply | None] = asyncio.Queue()
        sink = _from_any_thread(replies.put_nowait)

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    self._dispatch(msg, sink)
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
        reply: ReplySink,
    ) -> None:
        log.info("rejected %s step %d: %s %s", msg.request_id, msg.step, code.name, message)
        reply(
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

    def _dispatch(self, msg: pb.ForwardRequest, reply: ReplySink) -> None:
        """Check a message and queue its step on the compute thread. Callable from any
        thread (the event loop, a data connection's thread, the compute thread itself)."""
        trace.mark("in", msg.request_id, msg.step)
        loaded = self.stages.get(msg.plan_id)
        if loaded is None:
            self._reject(
                msg,
                None,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"plan {msg.plan_id!r} is not loaded on this node",
                reply,
            )
            return
        if not msg.request_id or len(msg.request_id) > 128:
            self._reject(
                msg,
                loaded,
                grpc.StatusCode.INVALID_ARGUMENT,
                "request_id must be 1-128 characters",
                reply,
            )
            return
        if msg.phase == pb.PHASE_RELEASE:
            self._enqueue(functools.partial(loaded.stage.release, msg.request_id))
            if loaded.downstream is not None:
                loaded.downstream.send(msg)
            return
        if msg.phase not in (pb.PHASE_PREFILL, pb.PHASE_DECODE):
            self._reject(
                msg, loaded, grpc.StatusCode.INVALID_ARGUMENT, f"unknown phase {msg.phase}", reply
            )
            return
        if not loaded.stage.spec.first and not msg.HasField("hidden"):
            self._reject(
                msg,
                loaded,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"stage {loaded.stage.spec.stage_index} expects hidden states, the message "
                "has none",
                reply,
            )
            return
        self._enqueue((msg, loaded, reply))

    # ----- the compute thread's queue ----------------------------------------------------------

    def _enqueue(self, work: Work) -> None:
        """Queue work for the compute thread (from any thread), in order."""
        with self._work_lock:
            self._work.append(work)
            if self._draining:
                return
            self._draining = True
        with contextlib.suppress(RuntimeError):  # shutting down
            self._compute.submit(self._drain)

    def _drain(self) -> None:
        """On the compute thread: run everything queued, in order, except that the decode
        steps of one stage waiting together run as one batch (one forward pass), at the place
        of the first of them."""
        while True:
            with self._work_lock:
                if not self._work:
                    self._draining = False
                    return
                items = list(self._work)
                self._work.clear()
            while items:
                work = items.pop(0)
                items = self._run_work(work, items)

    def _run_work(self, work: Work, items: list[Work]) -> list[Work]:
        """Run `work`, with the decode steps of its stage among `items` when it is one;
        returns the items still to run. Nothing raised here stops the queue."""
        try:
            if callable(work):
                work()
                return items
            msg, loaded, reply = work
            if not self._batchable(msg, loaded):
                self._run_step(msg, loaded, reply)
                return items
        except Exception:
            log.exception("compute task failed")
            return items
        batch, rest = [work], []
        for other in items:
            if (
                len(batch) < MAX_BATCH
                and not callable(other)
                and other[1] is loaded
                and self._batchable(other[0], loaded)
            ):
                batch.append(other)
            else:
                rest.append(other)
        try:
            if len(batch) == 1:
                self._run_step(msg, loaded, reply)
            else:
                self._run_batch(loaded, batch)
        except Exception:
            log.exception("compute task failed")
        return rest

    @staticmethod
    def _batchable(msg: pb.ForwardRequest, loaded: LoadedStage) -> bool:
        stage = loaded.stage
        if msg.phase != pb.PHASE_DECODE or loaded.ring == LOCAL_RING or not stage.can_batch:
            return False
        if stage.spec.first:
            return len(msg.tokens) == 1
        return not stage.spec.last or msg.sample

    def _run_batch(self, loaded: LoadedStage, batch: list[StepWork]) -> None:
        """Decode steps of several requests on one stage, in one forward pass."""
        stage = loaded.stage
        runs: list[tuple[pb.ForwardRequest, ReplySink, DecodeItem]] = []
        for msg, _, reply in batch:
            trace.mark("compute", msg.request_id, msg.step)
            try:
                hidden = None if stage.spec.first else self._hidden_of(msg, stage)
            except codec.CodecError as e:
                self._reject(msg, loaded, grpc.StatusCode.INVALID_ARGUMENT, str(e), reply)
                continue
            item = DecodeItem(
                request_id=msg.request_id,
                position=msg.position,
                sampling=_sampling_of(msg),
                token=msg.tokens[0] if stage.spec.first else None,
                hidden=hidden,
                want_logits=msg.want_logits,
            )
            runs.append((msg, reply, item))
        try:
            results = stage.step_batch([item for _, _, item in runs])
        except Exception as e:
            log.exception("batched step failed")
            for msg, reply, _ in runs:
                self._reject(msg, loaded, grpc.StatusCode.INTERNAL,
                             f"stage failed: {type(e).__name__}: {e}", reply)  # fmt: skip
            return
        done: list[tuple[pb.ForwardRequest, StepResult]] = []
        for (msg, reply, _), result in zip(runs, results, strict=True):
            if isinstance(result, StageError):
                self._reject(msg, loaded, status_code(result.kind), str(result), reply)
            else:
                done.append((msg, result))
        if len(done) > 1:
            loaded.batched_steps += len(done)
        for msg, result in done:
            loaded.decode_steps += 1
            loaded.decode_seconds += result.compute_seconds
            self._finish(msg, loaded, result)

    @staticmethod
    def _hidden_of(msg: pb.ForwardRequest, stage: ModelStage) -> mx.array:
        # Any float dtype: ModelStage checks it (activations keep the dtype they were made in).
        return codec.from_proto(msg.hidden, ndim=3, last_dim=stage.hidden_size)

    def _run_step(self, msg: pb.ForwardRequest, loaded: LoadedStage, reply: ReplySink) -> None:
        """On the compute thread: run one step and send its result on from here (no hand-back
        to the event loop: the next stage gets it at once)."""
        result = self._compute_step(msg, loaded, reply)
        if result is not None:
            self._finish(msg, loaded, result)

    def _compute_step(
        self, msg: pb.ForwardRequest, loaded: LoadedStage, reply: ReplySink
    ) -> StepResult | None:
        """Decode the input and run the step; None when it was rejected (and reported)."""
        stage = loaded.stage
        trace.mark("compute", msg.request_id, msg.step)
        try:
            hidden = None if stage.spec.first else self._hidden_of(msg, stage)
            result = stage.step(
                msg.request_id,
                msg.position,
                msg.phase == pb.PHASE_PREFILL,
                _sampling_of(msg),
                list(msg.tokens) if stage.spec.first else None,
                hidden,
                msg.sample,
                msg.want_logits,
                # The whole pipeline on this node, ring mode, more tokens to come: look ahead.
                loaded.ring == LOCAL_RING
                and msg.sample
                and msg.max_tokens > 0
                and msg.step + 1 < msg.max_tokens,
            )
        except codec.CodecError as e:
            self._reject(msg, loaded, grpc.StatusCode.INVALID_ARGUMENT, str(e), reply)
            return None
        except StageError as e:
            self._reject(msg, loaded, status_code(e.kind), str(e), reply)
            return None
        except Exception as e:
            log.exception("stage step failed")
            self._reject(
                msg,
                loaded,
                grpc.StatusCode.INTERNAL,
                f"stage failed: {type(e).__name__}: {e}",
                reply,
            )
            return None
        if msg.phase == pb.PHASE_DECODE:
            loaded.decode_steps += 1
            loaded.decode_seconds += result.compute_seconds
        return result

    def _finish(self, msg: pb.ForwardRequest, loaded: LoadedStage, result: StepResult) -> None:
        """Send a step's result on: hidden states to the next stage, or (last stage) the
        token to stage 0 (ring) and to the subscribers. Runs on the compute thread."""
        trace.mark("done", msg.request_id, msg.step)
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
                max_tokens=msg.max_tokens,
                stop_tokens=msg.stop_tokens,
            )
            loaded.downstream.send(out)
            trace.mark("sent", msg.request_id, msg.step)
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
            # Ring: the next step leaves for stage 0 before the coordinator hears of this one.
            self._continue_ring(msg, loaded, result.token)
            trace.mark("ring", msg.request_id, msg.step)
            loaded.publish(event)

    def _continue_ring(self, msg: pb.ForwardRequest, loaded: LoadedStage, token: int) -> None:
        """Feed a sampled token back to stage 0 as the next decode step (ring mode)."""
        if msg.max_tokens == 0 or loaded.ring is None:
            return
        if token in msg.stop_tokens or msg.step + 1 >= msg.max_tokens:
            return
        n_new = len(msg.tokens) if msg.tokens else int(msg.hidden.shape[1])
        nxt = pb.ForwardRequest(
            request_id=msg.request_id,
            plan_id=msg.plan_id,
            phase=pb.PHASE_DECODE,
            tokens=[token],
            sample=True,
            sampling=msg.sampling,
            want_logits=msg.want_logits,
            position=msg.position + n_new,
            step=msg.step + 1,
            max_tokens=msg.max_tokens,
            stop_tokens=msg.stop_tokens,
        )
        if isinstance(loaded.ring, str):
            self._dispatch(nxt, self._log_reply)
        else:
            loaded.ring.send(nxt)

    # ----- the data path (node/datapath.py) -------------------------------------------------

    @staticmethod
    def _log_reply(reply: pb.ForwardReply) -> None:
        """Rejections of data-path messages reach the coordinator as StageEvents; log here."""
        log.debug("data path rejected %s: %s", reply.request_id, reply.message)

    def on_data_forward(self, msg: pb.ForwardRequest) -> None:
        """On the data connection's thread: checked here, computed on the compute thread."""
        self._dispatch(msg, self._log_reply)

    def on_data_subscribe(
        self, request: pb.SubscribeRequest, push: Callable[[pb.StageEvent], None]
    ) -> Callable[[], None]:
        loaded = self.stages.get(request.plan_id)
        if loaded is None:
            push(
                pb.StageEvent(
                    token=-1,
                    code=code_number(grpc.StatusCode.FAILED_PRECONDITION),
                    message=f"plan {request.plan_id!r} is not loaded on this node",
                )
            )
            return lambda: None
        push(
            pb.StageEvent(token=-1, message="subscribed", stage_index=loaded.stage.spec.stage_index)
        )
        return loaded.subscribe(push)

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
        serving = self.config.serving
        try:
            reply: pb.MeasureDevicesReply = await self.run_compute(
                devicebench.measure_devices, request, serving.count > 1
            )
        except devicebench.BenchError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if serving.count > 1:
            devices.keep_own_measurement(reply, serving)
            for w in serving.workers:  # one after the other: they share the host
                try:
                    theirs: pb.MeasureDevicesReply = await self._worker_stub(w).MeasureDevices(
                        request, timeout=devicebench.WORKER_TIMEOUT_S
                    )
                except grpc.aio.AioRpcError as e:
                    await context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"device {w.device}'s worker did not measure: {e.code().name} "
                        f"{e.details()}",
                    )
                reply.devices.extend(theirs.devices[:1])
        log.info("measured devices in %.2fs", time.perf_counter() - t0)
        return reply

    # ----- weight shipping (node/shipping.py, docs/weights.md) --------------------------------

    async def PrepareWeights(
        self, request: pb.PrepareWeightsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PrepareWeightsReply:
        try:
            reply = await self.weights.prepare(
                request, self.resolve_model_path, self._pinned_tensors()
            )
        except CacheError as e:
            await context.abort(e.code, str(e))
        return reply

    async def PushTensors(
        self,
        request_iterator: AsyncIterator[Chunk],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.TensorAck]:
        # Pieces arrive as chunkwire.RawChunk (zero-copy) when node.main registered
        # shipping.add_push_handler, else as pb.TensorChunk.
        async for ack in self.weights.push(request_iterator):
            yield ack

    def _pinned_tensors(self) -> frozenset[str]:
        """Tensors of loaded stages: never evicted from the cache."""
        out: set[str] = set()
        for loaded in self.stages.values():
            if loaded.stage.spec.cached is not None:
                out |= loaded.stage.spec.cached.sha256s
        return frozenset(out)

    async def _stage_source(self, request: pb.LoadStageRequest) -> tuple[Path, CachedStage | None]:
        """Where a stage's weights come from: the node's weight cache when the coordinator
        shipped them (weights_id), else the model folder (inside --model-dir)."""
        if not request.weights_id:
            return self.resolve_model_path(request.model_path), None
        try:
            cached = await self.weights.stage(request.weights_id)
        except CacheError as e:
            raise stage_error(e) from None
        return cached.stage_dir, cached
