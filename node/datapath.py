"""The activation data path: length-prefixed protobuf frames over plain TCP.

Control stays on gRPC (load, info, measurement, errors to subscribers). Activations, token
ids and sampled tokens travel here, because a Python gRPC stream message costs 0.5-1.7 ms per
round trip where a socket costs about 0.1 ms (design.md). Frame:

    4 bytes  big-endian length N of what follows (1 + payload), N <= MAX_FRAME_BYTES
    1 byte   kind (FORWARD, SUBSCRIBE, EVENT, ECHO, ECHO_REPLY; HELLO, AUTH, WELCOME,
             REFUSED at the start, REFUSED also before a node closes on a frame it refuses)
    N-1      the serialized protobuf message of that kind (ASCII text for the handshake)

Handshake: the node speaks first, a HELLO carrying a fresh random challenge (empty when the
node runs open). The client answers AUTH: a proof of the cluster token over that challenge
(node/auth.py `make_proof` of `data_payload(challenge)`), and the node replies WELCOME, or
REFUSED with the reason and closes. Nothing else is read before that, so a connection that
cannot prove the token never reaches a stage. Each challenge is used once: a recorded
handshake cannot be replayed on another connection.

ECHO frames measure this transport itself (node/linkprobe.py): the node answers each on the
connection's thread with an ECHO_REPLY of `reply_bytes` bytes (the payload when 0). A frame
the node does not know or does not take from a client is answered with REFUSED and the
reason, then the connection closes; nodes that predate ECHO close without a REFUSED.

Trust boundary: frames are parsed by protobuf only (no pickle); every field is validated by
the stage exactly as on the Forward RPC. A malformed frame closes that connection only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from node import auth
from node._proto.layerlink.v1 import node_pb2 as pb

log = logging.getLogger(__name__)

FORWARD = 1  # ForwardRequest, client -> stage
SUBSCRIBE = 2  # SubscribeRequest, client -> stage: this connection now receives StageEvents
EVENT = 3  # StageEvent, stage -> subscriber
# The handshake (text payloads), before any other frame.
HELLO = 4  # stage -> client: the challenge ("" when the node runs open)
AUTH = 5  # client -> stage: the proof
WELCOME = 6  # stage -> client: accepted
REFUSED = 7  # stage -> client: the reason, then the stage closes (also after the handshake)
ECHO = 8  # EchoRequest, client -> node: answer with an ECHO_REPLY (the link probe)
ECHO_REPLY = 9  # EchoReply, node -> client
Message = pb.ForwardRequest | pb.SubscribeRequest | pb.StageEvent | pb.EchoRequest | pb.EchoReply
KINDS: dict[int, type[Message]] = {
    FORWARD: pb.ForwardRequest,
    SUBSCRIBE: pb.SubscribeRequest,
    EVENT: pb.StageEvent,
    ECHO: pb.EchoRequest,
    ECHO_REPLY: pb.EchoReply,
}
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


class FrameRefused(ConnectionError):
    """The node answered a frame with REFUSED (e.g. a kind it does not know) and closed."""


def data_address(grpc_address: str, data_port: int) -> str:
    """The data path's host:port of the node whose gRPC address is `grpc_address` (same
    host, the port its NodeInfo.data_port gives)."""
    return f"{grpc_address.rpartition(':')[0]}:{data_port}"


def encode(kind: int, msg: Message) -> bytes:
    body = msg.SerializeToString()
    return _HEADER.pack(len(body) + 1, kind) + body


def _unpack_header(header: bytes) -> tuple[int, int]:
    length, kind = _HEADER.unpack(header)
    if not 1 <= length <= MAX_FRAME_BYTES:
        raise FrameError(f"frame length {length} outside [1, {MAX_FRAME_BYTES}]")
    return length, kind


def _parse(kind: int, body: bytes) -> tuple[int, object]:
    cls = KINDS.get(kind)
    if cls is None:
        raise FrameError(f"unknown frame kind {kind}")
    msg = cls()
    try:
        msg.ParseFromString(body)
    except Exception as e:  # protobuf raises DecodeError (and others) on garbage
        raise FrameError(f"frame of kind {kind} is not a valid message: {e}") from None
    return kind, msg


async def _read_header(reader: asyncio.StreamReader) -> tuple[int, int] | None:
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise FrameError("connection closed inside a frame header") from None
        return None
    return _unpack_header(header)


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
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}")
    return _parse(kind, await _read_body(reader, length))


def read_raw_from(stream: io.BufferedIOBase) -> tuple[int, bytes] | None:
    """The next frame's (kind, body) from a blocking socket file, any kind; None at a clean
    end of stream. The body is read whole even for a kind the caller will refuse, so the
    connection can still carry the answer."""
    header = stream.read(_HEADER.size)
    if not header:
        return None
    if len(header) < _HEADER.size:
        raise FrameError("connection closed inside a frame header")
    length, kind = _unpack_header(header)
    body = stream.read(length - 1)
    if len(body) < length - 1:
        raise FrameError("connection closed inside a frame")
    return kind, body


def read_frame_from(stream: io.BufferedIOBase) -> tuple[int, object] | None:
    """`read_frame` for a blocking socket file (a node's data connection thread)."""
    raw = read_raw_from(stream)
    return None if raw is None else _parse(*raw)


def _read_text_from(stream: io.BufferedIOBase, expected: tuple[int, ...]) -> tuple[int, str]:
    """`read_text` for a blocking socket file with a timeout."""
    try:
        header = stream.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise FrameError("connection closed during the handshake")
        length, kind = _unpack_header(header)
        if kind not in expected:
            raise FrameError(f"expected a handshake frame {expected}, got kind {kind}")
        if length - 1 > MAX_HANDSHAKE_BYTES:
            raise FrameError(f"handshake frame of {length - 1} bytes")
        body = stream.read(length - 1)
    except TimeoutError:
        raise FrameError(f"no handshake within {HANDSHAKE_TIMEOUT_S:.0f} s") from None
    if len(body) < length - 1:
        raise FrameError("connection closed during the handshake")
    try:
        return kind, body.decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("handshake frame is not ASCII text") from None


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
    except TimeoutError:
        raise FrameError(f"no handshake within {HANDSHAKE_TIMEOUT_S:.0f} s") from None


def accept_handshake(
    stream: io.BufferedIOBase, writer: SocketWriter, key: auth.ClusterKey | None
) -> None:
    """The node's side: challenge the client and check its proof (raises AuthError or
    FrameError; the caller closes the connection)."""
    if key is None:
        writer.write(encode_text(HELLO, ""))
        return
    challenge = auth.new_challenge()
    writer.write(encode_text(HELLO, challenge))
    _, proof = _read_text_from(stream, (AUTH,))
    try:
        auth.check_answer(key, challenge, proof, payload=auth.data_payload)
    except auth.AuthError as e:
        writer.write(encode_text(REFUSED, str(e)))
        raise
    writer.write(encode_text(WELCOME, ""))


def _proof_for(challenge: str, key: auth.ClusterKey | None, address: str) -> str:
    """The AUTH text answering the node's HELLO `challenge` ("" for an open node)."""
    if not challenge:
        return ""
    if key is None:
        raise DataAuthError(
            f"the node at {address} requires the cluster token on its data path; "
            "this process has none (--token / --token-file / $LAYERLINK_TOKEN)"
        )
    return auth.make_proof(key, auth.data_payload(challenge)).encode()


def _check_verdict(kind: int, reason: str, address: str) -> None:
    if kind == REFUSED:
        raise DataAuthError(f"the node at {address} refused this cluster token: {reason}")


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
    proof = _proof_for(challenge, key, address)
    if not proof:
        return  # an open node
    writer.write(encode_text(AUTH, proof))
    try:
        kind, reason = await read_text(reader, (WELCOME, REFUSED))
    except FrameError as e:
        raise ConnectionError(f"data link to {address}: {e}") from None
    _check_verdict(kind, reason, address)


def offer_handshake_on(
    sock: socket.socket, stream: io.BufferedIOBase, key: auth.ClusterKey | None, address: str
) -> None:
    """`offer_handshake` on a blocking socket (with a timeout set) and its read file."""
    try:
        _, challenge = _read_text_from(stream, (HELLO,))
        proof = _proof_for(challenge, key, address)
        if not proof:
            return
        sock.sendall(encode_text(AUTH, proof))
        kind, reason = _read_text_from(stream, (WELCOME, REFUSED))
    except FrameError as e:
        raise ConnectionError(f"data link to {address}: {e}") from None
    _check_verdict(kind, reason, address)


class SocketWriter:
    """Sends whole frames on a connection from any thread, never blocking the caller and
    never going through the event loop.

    A node sends each result the moment it is ready, from the thread that computed it: an
    asyncio write from there would cost a round trip through the loop (~0.1-0.2 ms per hop
    measured here). A frame is sent at once when nothing is waiting before it and the socket
    takes it whole (the common case: a decode step's activations are a few KiB); the rest,
    and every frame behind it, waits in order for a sender thread started on first need. So
    a thread that also reads (the node's data connections) can never deadlock on a peer that
    is itself blocked sending to us. The writer owns a dup of the connection's descriptor, so
    a connection closed elsewhere can never make it write into a reused descriptor number.
    Raises ConnectionError once the connection is lost or the writer closed.
    """

    def __init__(self, sock: socket.socket | Any) -> None:
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        self._lock = threading.Condition()
        self._backlog: collections.deque[memoryview] = collections.deque()
        self._sender: threading.Thread | None = None
        self.closed = False
        self.error = ""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        with self._lock:
            if self.closed:
                raise ConnectionError(self.error or "connection closed")
            if not self._backlog:
                try:
                    while view:
                        view = view[self._sock.send(view, socket.MSG_DONTWAIT) :]
                except BlockingIOError:
                    pass
                except OSError as e:
                    self._fail(f"connection lost: {e}")
                    raise ConnectionError(self.error) from None
                if not view:
                    return
            self._backlog.append(view)
            if self._sender is None:
                self._sender = threading.Thread(target=self._drain, name="data-send", daemon=True)
                self._sender.start()
            self._lock.notify()

    def _drain(self) -> None:
        """The sender thread: writes the backlog in order, waiting while the socket is full.
        Only it sends while the backlog is not empty, so it may send outside the lock."""
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLOUT)
        while True:
            with self._lock:
                while not self._backlog and not self.closed:
                    self._lock.wait()
                if self.closed:
                    break
                view = self._backlog[0]
            try:
                sent = self._sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                poller.poll(1000)
                continue
            except OSError as e:
                with self._lock:
                    self._fail(f"connection lost: {e}")
                break
            with self._lock:
                if sent == len(view):
                    self._backlog.popleft()
                else:
                    self._backlog[0] = view[sent:]
        with contextlib.suppress(OSError):
            self._sock.close()

    def _fail(self, reason: str) -> None:
        self.closed = True
        self.error = reason
        self._backlog.clear()
        self._lock.notify()

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self._fail("connection closed")
            sender = self._sender
        if sender is None:  # else the sender closes the descriptor as it leaves
            with contextlib.suppress(OSError):
                self._sock.close()


async def writer_for(writer: asyncio.StreamWriter) -> SocketWriter:
    """A SocketWriter for this connection, once asyncio has sent what it had queued (the
    handshake): from then on only the SocketWriter writes to it."""
    for _ in range(1000):
        if writer.transport.get_write_buffer_size() == 0:
            break
        await asyncio.sleep(0.001)
    sock = writer.get_extra_info("socket")
    if sock is None or writer.is_closing():
        raise ConnectionError("connection closed")
    return SocketWriter(sock)


class Link:
    """One outgoing data connection (to a stage's data server). `send` never blocks the
    caller: frames are written at once and the socket buffer absorbs bursts."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._writer: asyncio.StreamWriter | None = None
        self.reader: asyncio.StreamReader | None = None
        self._draining: asyncio.Task[None] | None = None
        self.direct: SocketWriter | None = None
        self.closed = False

    async def connect(
        self, timeout: float = 10.0, key: auth.ClusterKey | None = None, direct: bool = False
    ) -> Link:
        """Connect and pass the node's handshake with `key` (default: this process's
        cluster key, node.auth.use_key). `direct`: frames are sent by a SocketWriter (from
        any thread, `send` may wait while the socket is full), not by the event loop."""
        host, _, port = self.address.rpartition(":")
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        try:
            await offer_handshake(reader, writer, key or auth.current_key(), self.address)
            if direct:
                self.direct = await writer_for(writer)
        except BaseException:
            writer.close()
            raise
        self.reader, self._writer = reader, writer
        return self

    def send(self, kind: int, msg: pb.ForwardRequest | pb.SubscribeRequest) -> None:
        if self.direct is not None:
            self.direct.write(encode(kind, msg))
            return
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
        if self.direct is not None:
            self.direct.close()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
            self._writer = None


class BlockingLink:
    """An outgoing data connection driven by blocking calls from one thread: each `send`
    goes straight to the socket and `read` waits for the node's next frame. The link probe
    uses it to time this transport with nothing but the socket between the two clocks."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._stream: io.BufferedIOBase | None = None

    def connect(
        self, timeout: float = 10.0, key: auth.ClusterKey | None = None, io_timeout: float = 60.0
    ) -> BlockingLink:
        """Connect and pass the node's handshake with `key` (default: this process's key).
        Later reads and writes give up after `io_timeout` seconds (TimeoutError)."""
        host, _, port = self.address.rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(HANDSHAKE_TIMEOUT_S)
            stream = sock.makefile("rb")
            offer_handshake_on(sock, stream, key or auth.current_key(), self.address)
            sock.settimeout(io_timeout)
        except BaseException:
            sock.close()
            raise
        self._sock, self._stream = sock, stream
        return self

    def send(self, kind: int, msg: Message) -> None:
        if self._sock is None:
            raise ConnectionError(f"data link to {self.address} is closed")
        self._sock.sendall(encode(kind, msg))

    def read(self) -> tuple[int, object]:
        """The node's next frame as (kind, message). Raises FrameRefused when the node
        refused what it was sent, ConnectionError when it closed."""
        if self._stream is None:
            raise ConnectionError(f"data link to {self.address} is closed")
        raw = read_raw_from(self._stream)
        if raw is None:
            raise ConnectionError(f"the node at {self.address} closed the data connection")
        kind, body = raw
        if kind == REFUSED:
            reason = body[:MAX_HANDSHAKE_BYTES].decode("ascii", "replace")
            raise FrameRefused(f"the node at {self.address} refused: {reason}")
        return _parse(kind, body)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._stream = None

    def __enter__(self) -> BlockingLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


ForwardHandler = Callable[[pb.ForwardRequest], None]
SubscribeHandler = Callable[
    [pb.SubscribeRequest, Callable[[pb.StageEvent], None]], Callable[[], None]
]


class DataServer:
    """Accepts data connections and serves each on its own thread: a blocking read of the
    next frame, then `on_forward` / `on_subscribe` called on that thread. The node computes
    a step right there and sends its result on (SocketWriter), so a hop costs one thread
    wake-up on each side and no event loop (docs/performance.md has the measured gaps).
    ECHO frames are answered on that thread too (`answer_echo`; `echoes` counts them).
    Handlers must be thread-safe."""

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
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = False
        self.port = 0
        self.echoes = 0  # ECHO frames answered, all connections together

    def answer_echo(self, request: pb.EchoRequest) -> pb.EchoReply:
        """The reply to one ECHO frame: `reply_bytes` zero bytes, or the payload back."""
        if request.reply_bytes:
            return pb.EchoReply(payload=bytes(min(request.reply_bytes, MAX_FRAME_BYTES // 2)))
        return pb.EchoReply(payload=request.payload)

    async def start(self, host: str, port: int = 0) -> int:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, name="data-accept", daemon=True).start()
        return self.port

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._closing:
            try:
                conn, addr = self._listener.accept()
            except OSError as e:
                if self._closing:
                    return
                log.warning("data server: accept failed: %s", e)
                time.sleep(0.05)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                self._conns.add(conn)
            name = f"data-conn-{addr[1]}"
            threading.Thread(target=self._serve, args=(conn, addr), name=name, daemon=True).start()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        peer = f"{addr[0]}:{addr[1]}"
        writer = SocketWriter(conn)
        unsubscribe: list[Callable[[], None]] = []
        # Requests this client started here: freed (RELEASE down the pipeline) if the client
        # goes away without finishing them, e.g. a coordinator that crashed.
        started: dict[str, str] = {}

        def push(event: pb.StageEvent) -> None:
            with contextlib.suppress(ConnectionError):  # the read below sees the end
                writer.write(encode(EVENT, event))

        stream = conn.makefile("rb")
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                accept_handshake(stream, writer, self.key)
            except (auth.AuthError, FrameError) as e:
                self.rejects.record(peer, "data connection", str(e))
                return
            conn.settimeout(None)
            while True:
                frame = read_frame_from(stream)
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
                elif kind == ECHO:
                    assert isinstance(msg, pb.EchoRequest)
                    with self._lock:
                        self.echoes += 1
                    writer.write(encode(ECHO_REPLY, self.answer_echo(msg)))
                else:
                    raise FrameError(f"a client may not send frames of kind {kind}")
        except FrameError as e:
            log.warning("closing data connection from %s: %s", peer, e)
            with contextlib.suppress(ConnectionError):  # tell the client why, then close
                writer.write(encode_text(REFUSED, str(e)))
        except OSError as e:
            if not self._closing:
                log.info("data connection from %s ended: %s", peer, e)
        except Exception:
            log.exception("data connection from %s failed", peer)
        finally:
            for undo in unsubscribe:
                undo()
            if not self._closing:
                for rid, plan_id in started.items():
                    log.info("client %s went away: releasing request %s", peer, rid)
                    self.on_forward(
                        pb.ForwardRequest(request_id=rid, plan_id=plan_id, phase=pb.PHASE_RELEASE)
                    )
            writer.close()
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            stream.close()  # the socket's descriptor closes with its last user
            conn.close()

    async def close(self) -> None:
        self._closing = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # wakes each connection's blocked read
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)


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
