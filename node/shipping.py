"""The node's side of weight shipping: PrepareWeights and PushTensors (docs/weights.md).

PrepareWeights answers which tensors of a stage the node lacks: none when its own copy of the
model folder holds the same tensors (same hashes), otherwise those not in its weight cache,
with the bytes already received of any tensor a dropped connection cut short. PushTensors
receives exactly those tensors, piece by piece, into the cache; each tensor is verified
against its sha256 before it is filed and acknowledged.

Disk work (writing, verifying, the cache index) runs on one "weights" thread, with each
received piece hashed on a second thread meanwhile; never on the event loop, never on the
compute thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from node import chunkwire
from node._proto.layerlink.v1 import node_pb2 as pb
from node.stage import ErrorKind, StageError
from node.tensorfiles import HashCache, TensorFileError, folder_tensors, hash_tensors
from node.weightcache import (
    CachedStage,
    CacheError,
    StageTensor,
    TensorMeta,
    TensorWriter,
    WeightCache,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
# Pieces received ahead of the one being written: the network keeps flowing while the
# weights thread writes and hashes.
READ_AHEAD_CHUNKS = 4


_KINDS = {
    grpc.StatusCode.INVALID_ARGUMENT: ErrorKind.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: ErrorKind.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: ErrorKind.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ErrorKind.RESOURCE_EXHAUSTED,
}


def _code(code: grpc.StatusCode) -> int:
    value: tuple[int, str] = code.value
    return value[0]


class Chunk(Protocol):
    """A piece of a tensor: a pb.TensorChunk, or a chunkwire.RawChunk (zero-copy)."""

    @property
    def sha256(self) -> str: ...

    @property
    def offset(self) -> int: ...

    @property
    def data(self) -> bytes | memoryview: ...


def add_push_handler(server: grpc.aio.Server, servicer: Any) -> None:
    """Serve PushTensors with node/chunkwire.py's decoder: the servicer gets views of the
    tensor bytes inside the received message instead of protobuf's two copies. Same wire
    format; call after the generated add_NodeServicer_to_server (this registration wins)."""
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.PushTensors,
        request_deserializer=chunkwire.decode_chunk,
        response_serializer=pb.TensorAck.SerializeToString,
    )
    server.add_registered_method_handlers(chunkwire.SERVICE, {"PushTensors": handler})


def stage_error(e: CacheError) -> StageError:
    """A cache refusal as the stage error LoadStage answers with."""
    return StageError(_KINDS.get(e.code, ErrorKind.INTERNAL), str(e))


class WeightService:
    """Weight cache operations for the servicer; the cache opens on first use."""

    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.cache = WeightCache(root, max_bytes)
        self.hashes = HashCache(root / "hashes")
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights")
        # Tensors announced by PrepareWeights, which PushTensors may receive.
        self._expected: dict[str, TensorMeta] = {}

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    def close(self) -> None:
        self._io.submit(self.cache.close)
        self._io.shutdown(wait=False)

    async def prepare(
        self,
        request: pb.PrepareWeightsRequest,
        resolve: Callable[[str], Path],
        pinned: frozenset[str],
    ) -> pb.PrepareWeightsReply:
        """Raises CacheError (with the gRPC status) on a request it cannot serve."""
        tensors = [
            StageTensor(
                t.name,
                TensorMeta(t.sha256.lower(), t.dtype, tuple(int(d) for d in t.shape), t.nbytes),
            )
            for t in request.tensors
        ]
        if request.model_path and await self._local_copy_matches(request, tensors, resolve):
            log.info("stage of %s: this node's own copy has every tensor", request.model)
            return pb.PrepareWeightsReply(
                local=True, cached_bytes=sum(t.meta.nbytes for t in tensors)
            )
        prepared = await self._run(
            self.cache.prepare,
            request.model,
            request.label,
            bytes(request.config_json),
            tensors,
            request.verify,
            pinned,
        )
        for meta in prepared.missing:
            self._expected[meta.sha256] = meta
        log.info(
            "stage %s of %s (%s): %d tensors missing (%.1f MB), %.1f MB cached",
            prepared.weights_id[:12],
            request.model,
            request.label,
            len(prepared.missing),
            prepared.missing_bytes / 1e6,
            prepared.cached_bytes / 1e6,
        )
        return pb.PrepareWeightsReply(
            weights_id=prepared.weights_id,
            missing=[m.sha256 for m in prepared.missing],
            partial=[pb.PartialTensor(sha256=s, have_bytes=n) for s, n in prepared.partial],
            missing_bytes=prepared.missing_bytes,
            cached_bytes=prepared.cached_bytes,
        )

    async def _local_copy_matches(
        self,
        request: pb.PrepareWeightsRequest,
        tensors: list[StageTensor],
        resolve: Callable[[str], Path],
    ) -> bool:
        try:
            folder = resolve(request.model_path)
        except StageError as e:  # the servicer's refusal (outside --model-dir, bad path)
            log.debug("no local copy of %s: %s", request.model_path, e)
            return False
        if not (folder / "config.json").is_file():
            return False
        try:
            if json.loads((folder / "config.json").read_bytes()) != json.loads(request.config_json):
                log.info("%s has a different config.json: shipping", folder)
                return False
        except (OSError, ValueError):
            return False
        wanted = {t.name: t.meta.sha256 for t in tensors}

        def check() -> bool:
            entries = [e for e in folder_tensors(folder) if e.name in wanted]
            if len(entries) != len(wanted):
                return False
            hashed = hash_tensors(entries, self.hashes)
            return all(h.sha256 == wanted[h.entry.name] for h in hashed)

        try:
            same = await self._run(check)
        except (TensorFileError, OSError) as e:
            log.warning("cannot read this node's copy of %s: %s", folder, e)
            return False
        if not same:
            log.info("%s differs from the coordinator's model: shipping", folder)
        return same

    async def _release(self, writer: TensorWriter) -> None:
        await self._finish(writer.close)

    async def _finish(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn on the weights thread to its end even if the awaiting stream is cancelled
        meanwhile: an open, close or commit cut short would leave a writer holding its
        tensor's lock with no stream to finish it (a CI run: every later stream of the tensor
        refused for 60 s); a writer left open is taken over by the tensor's next stream."""
        return await asyncio.shield(self._run(fn, *args))

    async def stage(self, weights_id: str) -> CachedStage:
        return await self._run(self.cache.stage, weights_id)

    async def push(self, chunks: AsyncIterator[Chunk]) -> AsyncIterator[pb.TensorAck]:
        """Receive pieces of prepared tensors; ack each tensor once (0 = verified and filed).

        A tensor received whole is committed once its last pieces are hashed, while the next
        tensor's pieces are already being written (its ack rides on a later piece or the end
        of the stream): waiting for the hash at each tensor's end and committing took 0.36-0.45
        s of a 0.8 s loopback shipment of 8 MiB tensors."""
        received = 0
        writer: TensorWriter | None = None
        failed: str | None = None  # a tensor already answered with an error
        # Tensors received whole, in order, each with the future of its last hash job.
        sealed: deque[tuple[TensorWriter, asyncio.Future[None]]] = deque()

        async def commit(done: TensorWriter) -> pb.TensorAck:
            sha = done.meta.sha256
            try:
                if await self._finish(done.commit):
                    self._expected.pop(sha, None)
                    return pb.TensorAck(sha256=sha, bytes_received=received)
                return pb.TensorAck(
                    sha256=sha,
                    code=_code(grpc.StatusCode.DATA_LOSS),
                    message=f"tensor {sha[:12]} did not match its sha256; dropped",
                    bytes_received=received,
                )
            except CacheError as e:
                await self._finish(done.close)
                return pb.TensorAck(
                    sha256=sha, code=_code(e.code), message=str(e), bytes_received=received
                )

        try:
            async for chunk in _read_ahead(chunks, READ_AHEAD_CHUNKS):
                while sealed and sealed[0][1].done():
                    yield await commit(sealed.popleft()[0])
                data = chunk.data  # (a protobuf bytes field is copied on every access)
                received += len(data)
                sha = chunk.sha256
                if sha == failed:
                    continue
                failed = None
                try:
                    if writer is not None and writer.meta.sha256 != sha:
                        await self._release(writer)  # cut short: its partial file stays
                        writer = None
                    if writer is None:
                        meta = self._expected.get(sha)
                        if meta is None:
                            raise CacheError(
                                grpc.StatusCode.FAILED_PRECONDITION,
                                f"tensor {sha[:12]} was not prepared on this node",
                            )
                        # (A writer an earlier stream of this tensor left open yields.)
                        writer = await self._finish(self.cache.open_writer, meta, chunk.offset)
                    await self._run(writer.write, data, chunk.offset)
                    if not writer.complete:
                        continue
                    done, writer = writer, None
                    sealed.append((done, asyncio.wrap_future(done.when_hashed())))
                except CacheError as e:
                    if writer is not None:
                        await self._release(writer)
                        writer = None
                    failed = sha
                    yield pb.TensorAck(
                        sha256=sha, code=_code(e.code), message=str(e), bytes_received=received
                    )
            while sealed:
                yield await commit(sealed.popleft()[0])
        finally:
            if writer is not None:
                await self._release(writer)
            # The stream ended early: tensors received whole are still verified and filed.
            for done, _ in sealed:
                await commit(done)


async def _read_ahead(chunks: AsyncIterator[T], depth: int) -> AsyncIterator[T]:
    """Iterate `chunks` with up to `depth` items pulled ahead by a background task; an error
    of the source is raised here, in order."""
    queue: asyncio.Queue[tuple[T | None, Exception | None]] = asyncio.Queue(depth)

    async def pump() -> None:
        try:
            async for item in chunks:
                await queue.put((item, None))
        except Exception as e:  # handed over to the consumer, which raises it
            await queue.put((None, e))
            return
        await queue.put((None, None))

    task = asyncio.create_task(pump())
    try:
        while True:
            item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                return
            yield item
    finally:
        task.cancel()
