"""The activation data path: length-prefixed protobuf frames over plain TCP.

Control stays on gRPC (load, info, measurement, errors to subscribers). Activations, token
ids and sampled tokens travel here, because a Python gRPC stream message costs 0.5-1.7 ms per
round trip where a socket costs about 0.1 ms (design.md). Frame:

    4 bytes  big-endian length N of what follows (1 + payload), N <= MAX_FRAME_BYTES
    1 byte   kind (FORWARD, SUBSCRIBE, EVENT; HELLO, AUTH, WELCOME, REFUSED at the start)
    N-1      the serialized protobuf message of that kind (ASCII text for the handshake)

Handshake: the node speaks first, a HELLO carrying a fresh random challenge (empty when the
node runs open). The client answers AUTH: a proof of the cluster token over that challenge
(node/auth.py `make_proof` of `data_payload(challenge)`), and the node replies WELCOME, or
REFUSED with the reason and closes. Nothing else is read before that, so a connection that
cannot prove the token never reaches a stage. Each challenge is used once: a recorded
handshake cannot be replayed on another connection.

Trust boundary: frames are parsed by protobuf only (no pickle); every field is validated by
the stage exactly as on the Forward RPC. A malformed frame closes that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable

from node import auth
from node._proto.layerlink.v1 import node_pb2 as pb

log = logging.getLogger(__name__)

FORWARD = 1  # ForwardRequest, client -> stage
SUBSCRIBE = 2  # SubscribeRequest, client -> stage: this connection now receives StageEvents
EVENT = 3  # StageEvent, stage -> subscriber
KINDS = {FORWARD: pb.ForwardRequest, SUBSCRIBE: pb.SubscribeRequest, EVENT: pb.StageEvent}
# The handshake (text payloads), before any of the above.
HELLO = 4  # stage -> client: the challenge ("" when the node runs open)
AUTH = 5  # client -> stage: the proof
WELCOME = 6  # stage -> client: accepted
REFUSED = 7  # stage -> client: the reason, then the stage closes
MAX_HANDSHAKE_BYTES = 512
HANDSHAKE_TIMEOUT_S = 5.0
MAX_FRAME_BYTES = 64 * 1024 * 1024
_HEADER = struct.Struct(">IB")
# Pause writing (await drain) only when this much is queued in the socket's buffer.
HIGH_WATER_BYTES = 4 * 1024 * 1024


class FrameError(ValueError):
    """A frame that cannot be a valid message (bad length, kind or payload)."""


class DataAuthError(ConnectionError):
    """The node refused this connection's proof of the cluster token (or there was none)."""


def encode(kind: int, msg: pb.ForwardRequest | pb.SubscribeRequest | pb.StageEvent) -> bytes:
    body = msg.SerializeToString()
    return _HEADER.pack(len(body) + 1, kind) + body


async def _read_header(reader: asyncio.StreamReader) -> tuple[int, int] | None:
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise FrameError("connection closed inside a frame header") from None
        return None
    length, kind = _HEADER.unpack(header)
    if not 1 <= length <= MAX_FRAME_BYTES:
        raise FrameError(f"frame length {length} outside [1, {MAX_FRAME_BYTES}]")
    return length, kind


async def _read_body(reader: asyncio.StreamReader, length: int) -> bytes:
    try:
        return await reader.readexactly(length - 1)
    except asyncio.IncompleteReadError:
        raise FrameError("connection closed inside a frame") from None


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, object] | None:
    """The next (kind, message), or None at a clean end of stream."""
    head = await _read_header(reader)
    if head is None:
        return None
    length, kind = head
    cls = KINDS.get(kind)
    if cls is None:
        raise FrameError(f"unknown frame kind {kind}")
    body = await _read_body(reader, length)
    msg = cls()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf raises DecodeError (and others) on garbage
        raise FrameError(f"frame of kind {kind} is not a valid message: {e}") from None
    return kind, msg


# ----- the handshake -------------------------------------------------------------------------


def encode_text(kind: int, text: str) -> bytes:
    body = text.encode("ascii", "replace")[:MAX_HANDSHAKE_BYTES]
    return _HEADER.pack(len(body) + 1, kind) + body


async def read_text(reader: asyncio.StreamReader, expected: tuple[int, ...]) -> tuple[int, str]:
    """One handshake frame of a kind in `expected` (its ASCII payload), within the timeout."""

    async def read() -> tuple[int, str]:
        head = await _read_header(reader)
        if head is None:
            raise FrameError("connection closed during the handshake")
        length, kind = head
        if kind not in expected:
            raise FrameError(f"expected a handshake frame {expected}, got kind {kind}")
        if length - 1 > MAX_HANDSHAKE_BYTES:
            raise FrameError(f"handshake frame of {length - 1} bytes")
        body = await _read_body(reader, length)
        try:
            return kind, body.decode("ascii")
        except UnicodeDecodeError:
            raise FrameError("handshake frame is not ASCII text") from None

    try:
        return await asyncio.wait_for(read(), HANDSHAKE_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise FrameError(f"no handshake within {HANDSHAKE_TIMEOUT_S:.0f} s") from None


async def accept_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: auth.ClusterKey | None
) -> None:
    """The node's side: challenge the client and check its proof (raises AuthError or
    FrameError; the caller closes the connection)."""
    if key is None:
        writer.write(encode_text(HELLO, ""))
        return
    challenge = auth.new_challenge()
    writer.write(encode_text(HELLO, challenge))
    _, proof = await read_text(reader, (AUTH,))
    try:
        auth.check_answer(key, challenge, proof, payload=auth.data_payload)
    except auth.AuthError as e:
        writer.write(encode_text(REFUSED, str(e)))
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        raise
    writer.write(encode_text(WELCOME, ""))


async def offer_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    key: auth.ClusterKey | None,
    address: str,
) -> None:
    """The client's side: prove `key` for the node's challenge. Raises DataAuthError when
    the node wants a proof this process cannot give or refuses the one it gave."""
    try:
        _, challenge = await read_text(reader, (HELLO,))
    except FrameError as e:
        raise ConnectionError(f"data link to {address}: {e}") from None
    if not challenge:
        return  # an open node
    if key is None:
        raise DataAuthError(
            f"the node at {address} requires the cluster token on its data path; "
            "this process has none (--token / --token-file / $LAYERLINK_TOKEN)"
        )
    proof = auth.make_proof(key, auth.data_payload(challenge))
    writer.write(encode_text(AUTH, proof.encode()))
    try:
        kind, reason = await read_text(reader, (WELCOME, REFUSED))
    except FrameError as e:
        raise ConnectionError(f"data link to {address}: {e}") from None
    if kind == REFUSED:
        raise DataAuthError(f"the node at {address} refused this cluster token: {reason}")


class Link:
    """One outgoing data connection (to a stage's data server). `send` never blocks the
    caller: frames are written at once and the socket buffer absorbs bursts."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self._draining: asyncio.Task[None] | None = None
        self.closed = False

    async def connect(self, timeout: float = 10.0, key: auth.ClusterKey | None = None) -> Link:
        """Connect and pass the node's handshake with `key` (default: this process's
        cluster key, node.auth.use_key)."""
        host, _, port = self.address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        try:
            await offer_handshake(reader, writer, key or auth.current_key(), self.address)
        except BaseException:
            writer.close()
            raise
        self.reader, self._writer = reader, writer
        return self

    def send(self, kind: int, msg: pb.ForwardRequest | pb.SubscribeRequest) -> None:
        if self._writer is None or self._writer.is_closing():
            raise ConnectionError(f"data link to {self.address} is closed")
        self._writer.write(encode(kind, msg))
        transport = self._writer.transport
        if transport.get_write_buffer_size() > HIGH_WATER_BYTES and self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            if self._writer is not None:
                await self._writer.drain()
        finally:
            self._draining = None

    async def close(self) -> None:
        self.closed = True
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = None


ForwardHandler = Callable[[pb.ForwardRequest], None]
SubscribeHandler = Callable[
    [pb.SubscribeRequest, Callable[[pb.StageEvent], None]], Callable[[], None]
]


class DataServer:
    """Accepts data connections; hands FORWARD frames and SUBSCRIBE requests to the node."""

    def __init__(
        self,
        on_forward: ForwardHandler,
        on_subscribe: SubscribeHandler,
        key: auth.ClusterKey | None = None,
    ) -> None:
        self.on_forward = on_forward
        self.on_subscribe = on_subscribe
        self.key = key  # None: an open node (no proof asked)
        self.rejects = auth.RejectLog()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, host: str, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        peer = writer.get_extra_info("peername")
        unsubscribe: list[Callable[[], None]] = []
        # Requests this client started here: freed (RELEASE down the pipeline) if the client
        # goes away without finishing them, e.g. a coordinator that crashed.
        started: dict[str, str] = {}

        def push(event: pb.StageEvent) -> None:
            if not writer.is_closing():
                writer.write(encode(EVENT, event))

        try:
            try:
                await accept_handshake(reader, writer, self.key)
            except (auth.AuthError, FrameError) as e:
                where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
                self.rejects.record(where, "data connection", str(e))
                return
            while True:
                frame = await read_frame(reader)
                if frame is None:
                    return
                kind, msg = frame
                if kind == FORWARD:
                    assert isinstance(msg, pb.ForwardRequest)
                    if msg.phase == pb.PHASE_PREFILL and msg.position == 0:
                        started[msg.request_id] = msg.plan_id
                    elif msg.phase == pb.PHASE_RELEASE:
                        started.pop(msg.request_id, None)
                    self.on_forward(msg)
                elif kind == SUBSCRIBE:
                    assert isinstance(msg, pb.SubscribeRequest)
                    unsubscribe.append(self.on_subscribe(msg, push))
                else:
                    raise FrameError(f"a client may not send frames of kind {kind}")
        except FrameError as e:
            log.warning("closing data connection from %s: %s", peer, e)
        except (ConnectionError, OSError) as e:
            log.info("data connection from %s ended: %s", peer, e)
        except asyncio.CancelledError:
            pass
        finally:
            for undo in unsubscribe:
                undo()
            for rid, plan_id in started.items():
                log.info("client %s went away: releasing request %s", peer, rid)
                self.on_forward(
                    pb.ForwardRequest(request_id=rid, plan_id=plan_id, phase=pb.PHASE_RELEASE)
                )
            writer.close()
            if task is not None:
                self._conns.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._server is not None:
            await self._server.wait_closed()


async def pump_events(
    link: Link, on_event: Callable[[pb.StageEvent], Awaitable[None] | None]
) -> None:
    """Read StageEvent frames from a subscribed link until it closes."""
    assert link.reader is not None
    while True:
        frame = await read_frame(link.reader)
        if frame is None:
            raise ConnectionError(f"data link to {link.address} closed")
        kind, msg = frame
        if kind != EVENT:
            raise FrameError(f"expected an event frame, got kind {kind}")
        assert isinstance(msg, pb.StageEvent)
        res = on_event(msg)
        if res is not None:
            await res
