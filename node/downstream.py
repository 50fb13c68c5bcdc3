"""Where a stage's outputs go next: the next stage's node (hidden states) or, on the last
stage in ring mode, stage 0 (the next decode step). Two transports behind one interface:

- `TcpDownstream`: the raw data path (node/datapath.py), used whenever the coordinator gave
  a data address; reconnects with backoff and reports a hop it cannot restore.
- `GrpcDownstream`: the Forward RPC stream, the contract's fallback.

`send` may be called from any thread (the node's compute thread sends each result as soon
as it exists); messages sent while a connection is being (re)made wait in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import grpc

from node import auth, datapath
from node._proto.layerlink.v1 import node_pb2 as pb
from node._proto.layerlink.v1 import node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

RECONNECT_FOR_S = 10.0
MAX_PENDING = 10_000


def _closed_hop(reason: str) -> None:
    """A closed hop reports nothing."""


class Downstream(Protocol):
    address: str

    def send(self, msg: pb.ForwardRequest) -> None: ...

    async def close(self) -> None: ...


class TcpDownstream:
    """A data-path connection to another node; `on_failure(reason)` when it is lost for good."""

    def __init__(self, address: str, on_failure: Callable[[str], None]) -> None:
        self.address = address
        self.on_failure = on_failure
        self._link: datapath.Link | None = None
        self._pending: list[pb.ForwardRequest] = []
        # Guards _link and _pending: send runs on the compute thread, reconnects on the loop.
        self._lock = threading.Lock()
        self._closed = False
        self._task: asyncio.Task[None] = asyncio.create_task(self._keep_connected())

    def send(self, msg: pb.ForwardRequest) -> None:
        with self._lock:
            link = self._link
            if link is not None:
                try:
                    link.send(datapath.FORWARD, msg)  # written now, from this thread
                    return
                except ConnectionError:
                    self._link = None
            if len(self._pending) >= MAX_PENDING:
                log.error("dropping a message to %s: %d already waiting", self.address, MAX_PENDING)
                return
            self._pending.append(msg)

    async def _keep_connected(self) -> None:
        while not self._closed:
            link = await self._connect()
            if link is None:
                return
            # Stay until the peer closes the connection (it never sends us anything).
            assert link.reader is not None
            with contextlib.suppress(ConnectionError, OSError):
                await link.reader.read()
            with self._lock:
                self._link = None
            await link.close()
            if not self._closed:
                log.warning("data link to %s dropped; reconnecting", self.address)

    async def _connect(self) -> datapath.Link | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RECONNECT_FOR_S
        delay = 0.05
        while not self._closed:
            try:
                link = await datapath.Link(self.address).connect(timeout=5.0, direct=True)
            except datapath.DataAuthError as e:
                # A refused token does not become right by retrying.
                log.error("%s", e)
                self.on_failure(str(e))
                return None
            except (TimeoutError, OSError) as e:
                if loop.time() > deadline:
                    reason = f"next hop {self.address} unreachable: {e}"
                    log.error("%s", reason)
                    self.on_failure(reason)
                    return None
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            with self._lock:
                try:
                    for msg in self._pending:
                        link.send(datapath.FORWARD, msg)
                except ConnectionError:
                    await link.close()
                    continue
                self._pending = []
                self._link = link
            return link
        return None

    async def close(self) -> None:
        self._closed = True
        # The cancelled task keeps its frame (and so this object) in a reference cycle until
        # a GC pass; without the callback, that cycle no longer holds the stage's weights.
        self.on_failure = _closed_hop
        self._task.cancel()
        with self._lock:
            link, self._link = self._link, None
        if link is not None:
            await link.close()


class GrpcDownstream:
    """A persistent Forward RPC stream to the next stage's node, fed from a queue."""

    def __init__(
        self,
        address: str,
        channel_options: list[tuple[str, int]],
        on_failure: Callable[[str], None],
    ) -> None:
        self.address = address
        self.on_failure = on_failure
        self._queue: asyncio.Queue[pb.ForwardRequest | None] = asyncio.Queue()
        self._channel = auth.secure_channel(address, channel_options)
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run())

    def send(self, msg: pb.ForwardRequest) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, msg)

    async def _requests(self) -> AsyncIterator[pb.ForwardRequest]:
        while True:
            msg = await self._queue.get()
            if msg is None:
                return
            yield msg

    async def _run(self) -> None:
        stub = pb_grpc.NodeStub(self._channel)
        try:
            async for reply in stub.Forward(self._requests()):
                log.warning(
                    "next stage %s rejected %s step %d: %s",
                    self.address,
                    reply.request_id,
                    reply.step,
                    reply.message,
                )
        except grpc.aio.AioRpcError as e:
            reason = f"stream to next stage {self.address} ended: {e.code().name} {e.details()}"
            log.error("%s", reason)
            self.on_failure(reason)
        except asyncio.CancelledError:
            pass

    async def close(self) -> None:
        self._queue.put_nowait(None)
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 2.0)
        except (TimeoutError, asyncio.CancelledError):
            self._task.cancel()
        self.on_failure = _closed_hop
        await self._channel.close()
