"""The raw-TCP data path (node/datapath.py) on real sockets: the threaded server reads
frames however TCP splits them, answers ECHO frames, refuses bad frames (REFUSED with the
reason) by closing only that connection, frees a vanished client's requests; SocketWriter
keeps frames whole and in order, never blocks its caller on a peer that does not read, and
reports a lost connection."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from node import datapath
from node._proto.layerlink.v1 import node_pb2 as pb


class Recorder:
    """DataServer handlers that remember what reached them (on which thread)."""

    def __init__(self) -> None:
        self.forwards: list[pb.ForwardRequest] = []
        self.threads: set[str] = set()
        self.arrived = threading.Event()

    def on_forward(self, msg: pb.ForwardRequest) -> None:
        self.forwards.append(msg)
        self.threads.add(threading.current_thread().name)
        self.arrived.set()

    def on_subscribe(self, req: pb.SubscribeRequest, push: Any) -> Any:
        push(pb.StageEvent(token=7, message=f"subscribed to {req.plan_id}"))
        return lambda: None


@pytest.fixture()
def server() -> Iterator[tuple[datapath.DataServer, Recorder]]:
    rec = Recorder()
    srv = datapath.DataServer(rec.on_forward, rec.on_subscribe)
    asyncio.run(srv.start("127.0.0.1"))
    try:
        yield srv, rec
    finally:
        asyncio.run(srv.close())


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    hello = s.recv(5 + 64)
    assert hello[4] == datapath.HELLO and len(hello) == 5  # an open node: empty challenge
    return s


def wait_for(cond: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def forward(rid: str, **kw: Any) -> pb.ForwardRequest:
    return pb.ForwardRequest(request_id=rid, plan_id="p", **kw)


def test_frames_split_anyhow_arrive_whole_and_in_order(
    server: tuple[datapath.DataServer, Recorder],
) -> None:
    srv, rec = server
    frames = b"".join(
        datapath.encode(datapath.FORWARD, forward(f"r{i}", tokens=list(range(i)), step=i))
        for i in range(50)
    )
    s = connect(srv.port)
    for i in range(0, len(frames), 7):  # 7-byte pieces: headers and bodies cut anywhere
        s.sendall(frames[i : i + 7])
    wait_for(lambda: len(rec.forwards) == 50)
    assert [m.request_id for m in rec.forwards] == [f"r{i}" for i in range(50)]
    assert list(rec.forwards[9].tokens) == list(range(9))
    assert len(rec.threads) == 1 and next(iter(rec.threads)).startswith("data-conn")
    s.close()


def read_to_end(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (b"\x00\x00\x00\x05\x63abcd", "unknown frame kind 99"),
        (b"\x00\x00\x00\x00\x01", "frame length 0"),
        (b"\x7f\xff\xff\xff\x01", "frame length 2147483647"),
        (b"\x00\x00\x00\x04\x01\xff\xff\xff", "not a valid message"),
        (b"\x00\x00\x00\x01\x03", "may not send frames of kind 3"),  # an empty StageEvent
        (b"\x00\x00\x00\x01\x09", "may not send frames of kind 9"),
    ],
    ids=["kind", "empty", "huge", "garbage", "event", "echo-reply"],
)
def test_a_bad_frame_is_refused_and_closes_only_its_connection(
    server: tuple[datapath.DataServer, Recorder], bad: bytes, reason: str
) -> None:
    srv, rec = server
    good = connect(srv.port)
    s = connect(srv.port)
    s.sendall(bad)
    answer = read_to_end(s)  # REFUSED with the reason, then closed by the node
    assert answer[4] == datapath.REFUSED and reason in answer[5:].decode()
    assert len(answer) == 4 + int.from_bytes(answer[:4], "big")  # one frame, nothing after
    good.sendall(datapath.encode(datapath.FORWARD, forward("still")))
    wait_for(lambda: [m.request_id for m in rec.forwards] == ["still"])
    good.close()
    s.close()


def test_echo_frames_are_answered_on_the_connection(
    server: tuple[datapath.DataServer, Recorder],
) -> None:
    srv, rec = server
    with datapath.BlockingLink(f"127.0.0.1:{srv.port}").connect() as link:
        link.send(datapath.ECHO, pb.EchoRequest(payload=b"x" * 100_000, reply_bytes=8))
        assert link.read() == (datapath.ECHO_REPLY, pb.EchoReply(payload=bytes(8)))
        link.send(datapath.ECHO, pb.EchoRequest(payload=b"back"))  # reply_bytes 0: echoed
        assert link.read() == (datapath.ECHO_REPLY, pb.EchoReply(payload=b"back"))
        # A kind the node refuses comes back as FrameRefused with its reason.
        link.send(datapath.EVENT, pb.StageEvent())
        with pytest.raises(datapath.FrameRefused, match="may not send frames of kind 3"):
            link.read()
    assert srv.echoes == 2 and rec.forwards == []


def test_a_vanished_client_has_its_requests_released(
    server: tuple[datapath.DataServer, Recorder],
) -> None:
    srv, rec = server
    s = connect(srv.port)
    start = forward("a", phase=pb.PHASE_PREFILL, position=0, tokens=[1])
    done = forward("b", phase=pb.PHASE_PREFILL, position=0, tokens=[1])
    s.sendall(
        datapath.encode(datapath.FORWARD, start)
        + datapath.encode(datapath.FORWARD, done)
        + datapath.encode(datapath.FORWARD, forward("b", phase=pb.PHASE_RELEASE))
    )
    wait_for(lambda: len(rec.forwards) == 3)
    s.close()
    wait_for(lambda: len(rec.forwards) == 4)
    last = rec.forwards[-1]
    assert (last.request_id, last.phase) == ("a", pb.PHASE_RELEASE)  # only the unfinished one


def test_subscribers_get_events_on_the_same_connection(
    server: tuple[datapath.DataServer, Recorder],
) -> None:
    srv, _ = server
    s = connect(srv.port)
    s.sendall(datapath.encode(datapath.SUBSCRIBE, pb.SubscribeRequest(plan_id="p1")))
    header = s.recv(5, socket.MSG_WAITALL)
    body = s.recv(int.from_bytes(header[:4], "big") - 1, socket.MSG_WAITALL)
    assert header[4] == datapath.EVENT
    assert pb.StageEvent.FromString(body).message == "subscribed to p1"
    s.close()


def test_socket_writer_never_blocks_and_keeps_frames_in_order() -> None:
    a, b = socket.socketpair()
    writer = datapath.SocketWriter(a)
    frames = [bytes([i % 251]) * (256 * 1024 + i) for i in range(64)]  # ~16 MiB, > buffers
    wrote = threading.Event()

    def write_all() -> None:
        for f in frames:
            writer.write(f)
        wrote.set()

    t = threading.Thread(target=write_all, daemon=True)
    t.start()
    # Nobody reads yet: the writes must still return (the rest waits for the sender thread).
    assert wrote.wait(10), "SocketWriter.write blocked on a peer that does not read"
    got = bytearray()
    total = sum(len(f) for f in frames)
    while len(got) < total:
        got += b.recv(1 << 20)
    assert bytes(got) == b"".join(frames)
    writer.close()
    a.close()
    b.close()


def test_socket_writer_reports_a_lost_connection() -> None:
    a, b = socket.socketpair()
    writer = datapath.SocketWriter(a)
    writer.write(b"x")
    b.close()
    with pytest.raises(ConnectionError):
        for _ in range(1000):  # the first write after the peer closed may still succeed
            writer.write(b"y" * 65536)
            time.sleep(0.001)
    writer.close()
    with pytest.raises(ConnectionError):
        writer.write(b"z")
    a.close()
