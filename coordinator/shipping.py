"""Ship each node exactly the tensors of its stages (docs/weights.md).

1. The model's manifest: every tensor of `model*.safetensors` with its byte range and the
   sha256 of its data (node/tensorfiles.py; hashes cached by file size + mtime, so a restart
   hashes nothing).
2. Per stage, the tensors it needs: layers [start, end), the embedding on the first stage,
   the final norm and lm_head on the last (the embedding too when tied). Anything that is
   neither a layer nor the head goes with the embedding, as in the cost model.
3. Per node, in parallel: PrepareWeights says what the node lacks (nothing when its own copy
   of the folder has the same hashes, or its cache has them); PushTensors streams exactly
   those, in pieces, flow-controlled by HTTP/2; the node acks each tensor once it verified
   its sha256. A dropped connection (node restarted, network gone) is resumed: prepare again
   and send what is still missing, from where each cut-short tensor stopped; completed
   tensors are never sent again. A tensor that arrives corrupted is sent again, a few times.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc

from coordinator.nodeclient import NodeClient
from coordinator.plan import Plan, Stage
from node import chunkwire, identity
from node._proto.layerlink.v1 import node_pb2 as pb
from node.tensorfiles import (
    HashCache,
    HashedTensor,
    TensorFileError,
    folder_tensors,
    hash_tensors,
    pending_bytes,
)

log = logging.getLogger(__name__)

CHUNK_BYTES = 4 << 20
# Concurrent PushTensors streams per node: one stream leaves the link idle while a message
# is handed over; two keep it busy.
PUSH_STREAMS = 1
PREPARE_TIMEOUT_S = 600.0  # a node may hash its own copy of the stage first
# Pushes get a deadline sized for a slow link (>= 5 MB/s) plus slack.
PUSH_MIN_RATE = 5e6
PUSH_SLACK_S = 120.0
RESUME_TIMEOUT_S = 60.0  # give up when a node makes no progress for this long
MAX_CORRUPT_RESENDS = 3
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
    }
)
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_NORM_RE = re.compile(r"(?:^|\.)norm\.")


class ShipError(RuntimeError):
    """Shipping failed for good; the message names the node and why."""


class _Again(Exception):
    """The node asked us to prepare again (a refused piece); not a failure by itself."""


@dataclass(frozen=True)
class ModelManifest:
    path: Path
    name: str
    num_layers: int
    tied: bool  # lm_head is the embedding matrix (or there is no lm_head tensor)
    config_json: bytes
    tensors: tuple[HashedTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)


@dataclass(frozen=True)
class StageShipment:
    """What shipping one stage did."""

    stage_index: int
    node_name: str
    address: str
    weights_id: str  # the stage in the node's cache; "" when the node loads its own copy
    local: bool
    stage_bytes: int  # data bytes of the stage's distinct tensors
    sent_bytes: int  # tensor bytes written to the node by this session
    received_bytes: int  # tensor bytes the node acknowledged receiving
    tensors_sent: tuple[str, ...]  # sha256 of tensors completed by this session, in order
    pushes: tuple[PushRecord, ...]  # one per connection that sent tensors (resumes add more)
    resumes: int
    seconds: float

    @property
    def gbs(self) -> float:
        return self.sent_bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class ShipProgress(Protocol):
    """Where shipping reports progress: `key` names one stage's shipment."""

    def start(self, key: str, label: str, total: int) -> None: ...

    def advance(self, key: str, nbytes: int) -> None: ...

    def finish(self, key: str, shipment: StageShipment) -> None: ...


def progress_label(stage_index: int, node_name: str) -> str:
    """How a stage's shipment is named on the terminal and the dashboard."""
    return f"stage {stage_index} → {node_name}"


class ProgressTee:
    """Progress reported to several places (the terminal and the dashboard)."""

    def __init__(self, *sinks: ShipProgress) -> None:
        self.sinks = sinks

    def start(self, key: str, label: str, total: int) -> None:
        for s in self.sinks:
            s.start(key, label, total)

    def advance(self, key: str, nbytes: int) -> None:
        for s in self.sinks:
            s.advance(key, nbytes)

    def finish(self, key: str, shipment: StageShipment) -> None:
        for s in self.sinks:
            s.finish(key, shipment)


def tensor_role(name: str) -> tuple[str, int]:
    """("layer", i), ("head", -1) or ("embed", -1): which stage needs a tensor."""
    m = _LAYER_RE.search(name)
    if m:
        return "layer", int(m.group(1))
    if "lm_head" in name or _NORM_RE.search(name):
        return "head", -1
    return "embed", -1


def model_manifest(
    path: Path,
    name: str,
    num_layers: int,
    config: dict[str, Any],
    on_hashed: Callable[[int], None] | None = None,
) -> ModelManifest:
    """The model's tensors and their hashes (cached under the coordinator's cache dir)."""
    try:
        entries = folder_tensors(path)
        hashed = hash_tensors(entries, HashCache(identity.cache_dir() / "hashes"), on_hashed)
        config_json = (path / "config.json").read_bytes()
    except (TensorFileError, OSError) as e:
        raise ShipError(f"cannot read the model {path}: {e}") from None
    cfg = config.get("text_config", config)
    has_head = any("lm_head" in t.entry.name for t in hashed)
    tied = bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    for t in hashed:
        role, i = tensor_role(t.entry.name)
        if role == "layer" and i >= num_layers:
            raise ShipError(f"{path}: tensor {t.entry.name} beyond the model's {num_layers} layers")
    return ModelManifest(
        path=path,
        name=name,
        num_layers=num_layers,
        tied=tied or not has_head,
        config_json=config_json,
        tensors=tuple(hashed),
    )


def stage_tensors(manifest: ModelManifest, start: int, end: int) -> list[HashedTensor]:
    """The tensors a stage holding layers [start, end) loads."""
    first, last = start == 0, end == manifest.num_layers
    out = []
    for t in manifest.tensors:
        role, i = tensor_role(t.entry.name)
        if (
            (role == "layer" and start <= i < end)
            or (role == "embed" and (first or (last and manifest.tied)))
            or (role == "head" and last)
        ):
            out.append(t)
    return out


def prepare_request(
    manifest: ModelManifest, start: int, end: int, verify: bool = False
) -> pb.PrepareWeightsRequest:
    """PrepareWeights for the stage holding layers [start, end)."""
    return pb.PrepareWeightsRequest(
        model=manifest.name,
        model_path=str(manifest.path),
        config_json=manifest.config_json,
        tensors=[
            pb.TensorRef(
                name=t.entry.name,
                sha256=t.sha256,
                dtype=t.entry.dtype,
                shape=list(t.entry.shape),
                nbytes=t.entry.nbytes,
            )
            for t in stage_tensors(manifest, start, end)
        ],
        verify=verify,
        label=stage_label(start, end, manifest.num_layers),
    )


def stage_label(start: int, end: int, num_layers: int) -> str:
    extra = [" + embedding" if start == 0 else "", " + head" if end == num_layers else ""]
    return f"layers [{start}, {end}){''.join(extra)}"


def distinct_bytes(tensors: Sequence[HashedTensor]) -> int:
    return sum({t.sha256: t.entry.nbytes for t in tensors}.values())


def _serialized(message: bytes) -> bytes:
    return message


def _read(path: Path, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, n, offset)
    finally:
        os.close(fd)
    if len(data) != n:
        raise ShipError(f"{path} ended early (changed while shipping?)")
    return data


@dataclass(frozen=True)
class PushRecord:
    """One push: the tensors it began sending (sha256, from which offset) and the tensors
    the node acknowledged on it."""

    started: tuple[tuple[str, int], ...]
    completed: tuple[str, ...]


@dataclass
class _Push:
    started: list[tuple[str, int]] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)


@dataclass
class _StageRun:
    """Mutable bookkeeping of one stage's shipment."""

    stage: Stage
    index: int
    tensors: list[HashedTensor]
    sent: int = 0
    received: int = 0
    completed: list[str] = field(default_factory=list)
    corrupt: dict[str, int] = field(default_factory=dict)
    pushes: list[_Push] = field(default_factory=list)
    resumes: int = 0
    last_progress: float = field(default_factory=time.monotonic)


class Shipper:
    """Ships the stages of one plan; see the module docstring."""

    def __init__(
        self,
        manifest: ModelManifest,
        progress: ShipProgress | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        verify: bool = False,
        resume_timeout_s: float = RESUME_TIMEOUT_S,
        client_factory: Callable[[str], NodeClient] = NodeClient,
        streams: int = PUSH_STREAMS,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.manifest = manifest
        self.progress = progress
        self.chunk_bytes = chunk_bytes
        self.verify = verify
        self.resume_timeout_s = resume_timeout_s
        self.client_factory = client_factory
        self.streams = streams

    async def ship(self, plan: Plan) -> tuple[StageShipment, ...]:
        """Every stage of the plan; stages on one node one after the other, nodes in
        parallel."""
        by_node: dict[str, list[int]] = {}
        for i, s in enumerate(plan.stages):
            by_node.setdefault(s.address, []).append(i)
        results: dict[int, StageShipment] = {}

        async def node(indices: list[int]) -> None:
            for i in indices:
                results[i] = await self.ship_stage(plan.stages[i], i)

        await asyncio.gather(*(node(ix) for ix in by_node.values()))
        return tuple(results[i] for i in range(len(plan.stages)))

    async def ship_stage(self, stage: Stage, index: int) -> StageShipment:
        m = self.manifest
        run = _StageRun(stage, index, stage_tensors(m, stage.start, stage.end))
        request = prepare_request(m, stage.start, stage.end, self.verify)
        key = f"{index}"
        t0 = time.perf_counter()
        started = False
        while True:
            try:
                async with self.client_factory(stage.address) as client:
                    # Wait for the node (it may be restarting) no longer than the resume
                    # window; then give it time to hash its own copy of the stage.
                    left = self.resume_timeout_s - (time.monotonic() - run.last_progress)
                    try:
                        await asyncio.wait_for(client.channel.channel_ready(), max(0.1, left))
                    except TimeoutError:
                        self._resume_or_fail(run, "the node does not answer")
                        continue
                    reply: pb.PrepareWeightsReply = await client.stub.PrepareWeights(
                        request, timeout=PREPARE_TIMEOUT_S
                    )
                    if not started and self.progress is not None:
                        total = 0 if reply.local else reply.missing_bytes
                        self.progress.start(key, progress_label(index, stage.node_name), total)
                        started = True
                    if reply.local or not reply.missing:
                        done = self._result(run, reply, time.perf_counter() - t0)
                        if self.progress is not None:
                            self.progress.finish(key, done)
                        return done
                    await self._push(client, run, reply)
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    # A node older than weight shipping: it loads model_path itself.
                    log.warning(
                        "node %s (%s) cannot receive weights: it must have %s itself",
                        stage.node_name,
                        stage.address,
                        m.path,
                    )
                    done = self._result(
                        run, pb.PrepareWeightsReply(local=True), time.perf_counter() - t0
                    )
                    if self.progress is not None:
                        self.progress.finish(key, done)
                    return done
                if code not in RETRYABLE:
                    raise ShipError(
                        f"node {stage.node_name} ({stage.address}) refused stage {index}'s "
                        f"weights: {code.name}: {e.details()}"
                    ) from None
                self._resume_or_fail(run, f"{code.name}: {e.details()}")
                await asyncio.sleep(min(2.0, 0.25 * run.resumes))
            except _Again as e:
                self._resume_or_fail(run, str(e))
                await asyncio.sleep(min(2.0, 0.25 * run.resumes))

    def _resume_or_fail(self, run: _StageRun, why: str) -> None:
        s = run.stage
        if time.monotonic() - run.last_progress > self.resume_timeout_s:
            raise ShipError(
                f"shipping stage {run.index} to {s.node_name} ({s.address}) made no progress "
                f"for {self.resume_timeout_s:.0f}s: {why}"
            )
        run.resumes += 1
        log.warning(
            "shipping to %s (%s) interrupted (%s); resuming (attempt %d)",
            s.node_name,
            s.address,
            why,
            run.resumes,
        )

    def _result(
        self, run: _StageRun, reply: pb.PrepareWeightsReply, seconds: float
    ) -> StageShipment:
        s = run.stage
        return StageShipment(
            stage_index=run.index,
            node_name=s.node_name,
            address=s.address,
            weights_id="" if reply.local else reply.weights_id,
            local=reply.local,
            stage_bytes=distinct_bytes(run.tensors),
            sent_bytes=run.sent,
            received_bytes=run.received,
            tensors_sent=tuple(run.completed),
            pushes=tuple(PushRecord(tuple(p.started), tuple(p.completed)) for p in run.pushes),
            resumes=run.resumes,
            seconds=seconds,
        )

    async def _push(
        self, client: NodeClient, run: _StageRun, reply: pb.PrepareWeightsReply
    ) -> None:
        by_sha = {t.sha256: t for t in run.tensors}
        offsets = {p.sha256: p.have_bytes for p in reply.partial}
        todo = [by_sha[s] for s in reply.missing if s in by_sha]
        if len(todo) != len(reply.missing):
            raise ShipError(f"node {run.stage.node_name} asked for tensors the stage does not have")
        deadline = PUSH_SLACK_S + reply.missing_bytes / PUSH_MIN_RATE
        run.pushes.append(_Push())
        # Tensors dealt to the streams largest first, each to the least loaded one.
        lanes: list[list[HashedTensor]] = [[] for _ in range(max(1, min(self.streams, len(todo))))]
        loads = [0] * len(lanes)
        for t in sorted(todo, key=lambda t: -t.entry.nbytes):
            k = loads.index(min(loads))
            lanes[k].append(t)
            loads[k] += t.entry.nbytes - offsets.get(t.sha256, 0)
        refused: list[str] = []
        await asyncio.gather(
            *(self._push_stream(client, run, lane, offsets, deadline, refused) for lane in lanes)
        )
        if refused:
            raise _Again(f"the node refused a piece: {refused[0]}")

    async def _push_stream(
        self,
        client: NodeClient,
        run: _StageRun,
        todo: list[HashedTensor],
        offsets: dict[str, int],
        deadline: float,
        refused: list[str],
    ) -> None:
        # Pieces go out pre-serialized (node/chunkwire.py: one copy instead of protobuf's two).
        push = client.channel.stream_stream(
            chunkwire.METHOD,
            request_serializer=_serialized,
            response_deserializer=pb.TensorAck.FromString,
        )
        call = push(timeout=deadline)
        stream_received = 0

        async def read_acks() -> None:
            nonlocal stream_received
            async for ack in call:
                stream_received = max(stream_received, ack.bytes_received)
                if ack.code == 0:
                    run.completed.append(ack.sha256)
                    run.pushes[-1].completed.append(ack.sha256)
                    run.last_progress = time.monotonic()
                elif ack.code == grpc.StatusCode.DATA_LOSS.value[0]:
                    n = run.corrupt.get(ack.sha256, 0) + 1
                    run.corrupt[ack.sha256] = n
                    log.warning(
                        "%s: %s (%d/%d)", run.stage.node_name, ack.message, n, MAX_CORRUPT_RESENDS
                    )
                    if n >= MAX_CORRUPT_RESENDS:
                        raise ShipError(
                            f"tensor {ack.sha256[:12]} reached {run.stage.node_name} corrupted "
                            f"{n} times: {ack.message}"
                        )
                else:
                    refused.append(ack.message)

        reader = asyncio.create_task(read_acks())
        try:
            try:
                await self._write_all(call, run, todo, offsets, reader)
                await call.done_writing()
            except asyncio.InvalidStateError:
                # The call ended under us (node gone): its status comes from the reader.
                await reader
                raise _Again("the push stream ended early") from None
            await reader
        finally:
            if not reader.done():
                reader.cancel()
            run.received += stream_received

    async def _write_all(
        self,
        call: Any,
        run: _StageRun,
        todo: list[HashedTensor],
        offsets: dict[str, int],
        reader: asyncio.Task[None],
    ) -> None:
        key = f"{run.index}"
        # At least one piece per tensor: an empty one for a 0-byte tensor, or for one that
        # arrived whole before the connection dropped (the node then verifies and files it).
        pieces = [
            (t, off, min(self.chunk_bytes, t.entry.nbytes - off))
            for t in todo
            for off in range(
                offsets.get(t.sha256, 0),
                max(t.entry.nbytes, offsets.get(t.sha256, 0) + 1),
                self.chunk_bytes,
            )
        ]
        if not pieces:
            return

        def read(i: int) -> bytes:
            """The serialized piece: read and framed on a worker thread (both copies release
            the GIL), while the event loop sends the previous one."""
            t, off, n = pieces[i]
            return chunkwire.encode_chunk(
                t.sha256, off, _read(t.entry.file, t.entry.offset + off, n)
            )

        ahead = asyncio.ensure_future(asyncio.to_thread(read, 0))
        for i, (t, off, n) in enumerate(pieces):
            message = await ahead
            if i + 1 < len(pieces):
                ahead = asyncio.ensure_future(asyncio.to_thread(read, i + 1))
            if reader.done():  # the ack reader failed (corrupted too often) or ended early
                break
            if off == offsets.get(t.sha256, 0):
                run.pushes[-1].started.append((t.sha256, off))
            await call.write(message)
            run.sent += n
            if self.progress is not None:
                self.progress.advance(key, n)
        if not ahead.done():
            ahead.cancel()


class RichShipProgress:
    """A progress bar per stage (node) on the terminal's stderr."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from coordinator.console import err_console

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> RichShipProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def start(self, key: str, label: str, total: int) -> None:
        if total:  # stages with nothing to send get no bar (the summary table lists them)
            self.tasks[key] = self.bar.add_task(label, total=total)

    def advance(self, key: str, nbytes: int) -> None:
        if key in self.tasks:
            self.bar.advance(self.tasks[key], nbytes)

    def finish(self, key: str, shipment: StageShipment) -> None:
        pass  # the summary table follows


async def _manifest_with_progress(
    path: Path, name: str, num_layers: int, config: dict[str, Any], show_progress: bool
) -> ModelManifest:
    """model_manifest, with a progress bar when it has to hash (the first use of a model)."""
    cache = HashCache(identity.cache_dir() / "hashes")
    try:
        pending = await asyncio.to_thread(pending_bytes, folder_tensors(path), cache)
    except (TensorFileError, OSError) as e:
        raise ShipError(f"cannot read the model {path}: {e}") from None
    if not show_progress or not pending:
        return await asyncio.to_thread(model_manifest, path, name, num_layers, config)
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from coordinator.console import err_console

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(f"hashing {name} (once: cached by file size and mtime)", total=pending)
        return await asyncio.to_thread(
            model_manifest, path, name, num_layers, config, lambda n: bar.advance(task, n)
        )


async def ship_plan(
    plan: Plan,
    path: Path,
    name: str,
    num_layers: int,
    config: dict[str, Any],
    show_progress: bool = True,
    verify: bool = False,
    board: ShipProgress | None = None,
) -> tuple[StageShipment, ...]:
    """Hash the model (once; cached) and ship every stage's missing tensors; progress on the
    terminal (`show_progress`) and to `board` (the dashboard's)."""
    manifest = await _manifest_with_progress(path, name, num_layers, config, show_progress)
    if not show_progress:
        return await Shipper(manifest, board, verify=verify).ship(plan)
    with RichShipProgress() as bars:
        progress: ShipProgress = bars if board is None else ProgressTee(bars, board)
        shipped = await Shipper(manifest, progress, verify=verify).ship(plan)
    from coordinator import console

    console.table(
        "weights",
        ["stage", "node", "source", "stage size", "sent", "GB/s"],
        [
            [
                s.stage_index,
                s.node_name,
                "own copy" if s.local else "cache",
                f"{s.stage_bytes / 1e6:.1f} MB",
                f"{s.sent_bytes / 1e6:.1f} MB",
                f"{s.gbs:.2f}" if s.sent_bytes else "-",
            ]
            for s in shipped
        ],
    )
    return shipped
