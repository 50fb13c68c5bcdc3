"""The node-side link sweep on loopback, against a test node of two real parts: a gRPC
server that answers GetInfo only (its Echo RPC is left unimplemented, so nothing can be
measured over gRPC) and a real DataServer (node/datapath.py) on the port GetInfo names."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from node import auth, datapath, linkprobe
from node._proto.layerlink.v1 import node_pb2 as pb
from node._proto.layerlink.v1 import node_pb2_grpc as pb_grpc

KEY = auth.ClusterKey.from_token(auth.generate_token())
OTHER_KEY = auth.ClusterKey.from_token(auth.generate_token())


class InfoNode(pb_grpc.NodeServicer):
    """GetInfo only: node id and the data port (Echo and the rest: UNIMPLEMENTED)."""

    def __init__(self, node_id: str, data_port: int) -> None:
        self.node_id = node_id
        self.data_port = data_port

    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.NodeInfo:
        return pb.NodeInfo(node_id=self.node_id, name="echo", hostname="echo-host",
                           data_port=self.data_port)  # fmt: skip


class ShapedDataServer(datapath.DataServer):
    """A real DataServer whose echoes are slowed down per byte or by a fixed delay, or that
    ignores reply_bytes (echoes the payload back)."""

    def __init__(self, us_per_kib: float = 0.0, delay_s: float = 0.0,
                 honour_reply_bytes: bool = True, key: auth.ClusterKey | None = None) -> None:  # fmt: skip
        super().__init__(lambda msg: None, lambda req, push: lambda: None, key)
        self.us_per_kib = us_per_kib
        self.delay_s = delay_s
        self.honour_reply_bytes = honour_reply_bytes

    def answer_echo(self, request: pb.EchoRequest) -> pb.EchoReply:
        if self.us_per_kib or self.delay_s:
            time.sleep(self.delay_s + len(request.payload) / 1024 * self.us_per_kib * 1e-6)
        if not self.honour_reply_bytes:
            return pb.EchoReply(payload=request.payload)
        return super().answer_echo(request)


@contextlib.asynccontextmanager
async def probe_target(
    node_id: str = "t", data: datapath.DataServer | None = None, data_port: int | None = None
) -> AsyncIterator[tuple[str, datapath.DataServer]]:
    """(gRPC address, data server) of a test node; `data_port` overrides what GetInfo says."""
    data = data or ShapedDataServer()
    port = await data.start("127.0.0.1")
    server = grpc.aio.server()
    pb_grpc.add_NodeServicer_to_server(
        InfoNode(node_id, port if data_port is None else data_port), server
    )
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{grpc_port}", data
    finally:
        await server.stop(None)
        await data.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_sweep_goes_over_the_data_path_and_is_fitted() -> None:
    async def main() -> tuple[pb.MeasureLinkReply, int]:
        async with probe_target("target-id") as (address, data):
            reply = await linkprobe.measure_link(
                pb.MeasureLinkRequest(target_address=address), "self-id"
            )
            return reply, data.echoes

    reply, echoes = run(main())
    assert reply.target_node_id == "target-id"
    assert reply.same_host
    sizes = [s.payload_bytes for s in reply.samples]
    assert sizes[0] == 64 and sizes[-1] >= 4 << 20  # loopback affords the big sizes
    assert sizes == sorted(sizes)
    assert all(s.median_rtt_us > 0 for s in reply.samples)
    assert reply.bandwidth_gbs > 0.05
    assert 1.0 < reply.latency_us < 20_000.0
    # Every timed round trip was an ECHO frame the data server answered: the warm-up, and
    # per size at least one warm-up and one repeat.
    assert echoes >= linkprobe.STREAM_WARMUP + 2 * len(sizes)


def test_slow_link_is_cut_to_the_budget_and_fitted() -> None:
    # 100 us per KiB: 10 MB/s; 16 MiB would take 1.7 s per message.
    async def main() -> pb.MeasureLinkReply:
        async with probe_target("slow", ShapedDataServer(us_per_kib=100.0)) as (address, _):
            return await linkprobe.measure_link(
                pb.MeasureLinkRequest(target_address=address), "self", budget_s=1.0
            )

    reply = run(main())
    assert reply.samples[-1].payload_bytes < 16 << 20  # the largest sizes were skipped
    assert reply.bandwidth_gbs == pytest.approx(1024 / 100.0 * 1e-3, rel=0.25)


def test_added_round_trip_delay_shows_as_half_in_the_latency() -> None:
    async def latency(delay_s: float) -> float:
        async with probe_target("t", ShapedDataServer(delay_s=delay_s)) as (address, _):
            req = pb.MeasureLinkRequest(target_address=address, payload_bytes=[64, 4096, 1 << 20])
            reply = await linkprobe.measure_link(req, "self")
            return reply.latency_us

    base = run(latency(0.0))
    delayed = run(latency(0.004))  # 4 ms more per round trip: 2 ms more one-way
    assert delayed - base == pytest.approx(2000.0, rel=0.25)


def test_explicit_sizes_and_repeats_are_honoured() -> None:
    async def main() -> tuple[pb.MeasureLinkReply, int]:
        async with probe_target() as (address, data):
            req = pb.MeasureLinkRequest(
                target_address=address, payload_bytes=[100, 1000, 100000], repeats=2, warmup=1
            )
            return await linkprobe.measure_link(req, "self"), data.echoes

    reply, echoes = run(main())
    assert [s.payload_bytes for s in reply.samples] == [100, 1000, 100000]
    assert echoes == linkprobe.STREAM_WARMUP + 3 * (1 + 2)  # warm-ups + 1 + 2 per size


def test_target_that_echoes_everything_is_refused() -> None:
    async def main() -> None:
        async with probe_target("t", ShapedDataServer(honour_reply_bytes=False)) as (address, _):
            await linkprobe.measure_link(pb.MeasureLinkRequest(target_address=address), "self")

    with pytest.raises(linkprobe.LinkProbeError, match="reply_bytes") as e:
        run(main())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_unreachable_target_is_unavailable() -> None:
    async def main() -> None:
        async with probe_target() as (address, _):
            pass  # nothing listens there any more
        await linkprobe.measure_link(pb.MeasureLinkRequest(target_address=address), "self")

    with pytest.raises(linkprobe.LinkProbeError, match="cannot reach target") as e:
        run(main())
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_node_whose_data_server_is_down_cannot_be_measured() -> None:
    """gRPC answers, the data port does not: the probe fails and names the data path
    (it does not fall back to gRPC's Echo)."""

    async def main() -> None:
        async with probe_target() as (address, data):
            await data.close()
            await linkprobe.measure_link(pb.MeasureLinkRequest(target_address=address), "self")

    with pytest.raises(linkprobe.LinkProbeError, match="cannot open the data path at") as e:
        run(main())
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_a_node_without_a_data_path_is_a_failed_precondition() -> None:
    async def main() -> None:
        async with probe_target(data_port=0) as (address, _):
            await linkprobe.measure_link(pb.MeasureLinkRequest(target_address=address), "self")

    with pytest.raises(linkprobe.LinkProbeError, match="no data path") as e:
        run(main())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_the_data_handshake_holds_on_the_probe_connection() -> None:
    """A node with a cluster key: the probe passes its handshake with the same key, and
    fails with UNAUTHENTICATED (before any echo) with another key or none."""

    async def main(key: auth.ClusterKey | None) -> tuple[pb.MeasureLinkReply | str, int]:
        saved = auth.current_key()
        auth.use_key(key)
        try:
            async with probe_target("t", ShapedDataServer(key=KEY)) as (address, data):
                req = pb.MeasureLinkRequest(target_address=address, payload_bytes=[64, 4096])
                try:
                    return await linkprobe.measure_link(req, "self"), data.echoes
                except linkprobe.LinkProbeError as e:
                    assert e.code == grpc.StatusCode.UNAUTHENTICATED
                    return str(e), data.echoes
        finally:
            auth.use_key(saved)

    reply, echoes = run(main(KEY))
    assert isinstance(reply, pb.MeasureLinkReply) and echoes > 0
    other, echoes = run(main(OTHER_KEY))
    assert "refused this cluster token" in str(other) and echoes == 0
    none, echoes = run(main(None))
    assert "requires the cluster token" in str(none) and echoes == 0


def old_data_server() -> tuple[socket.socket, threading.Thread]:
    """A data port as nodes before ECHO frames served it: an open handshake, then an
    unknown frame kind closes the connection without a word."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(datapath.encode_text(datapath.HELLO, ""))
            header = conn.recv(5)
            assert header[4] == datapath.ECHO  # unknown to it: closed at once

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return listener, t


def test_a_node_that_predates_echo_frames_is_named_as_such() -> None:
    listener, thread = old_data_server()

    async def main() -> None:
        async with probe_target(data_port=listener.getsockname()[1]) as (address, _):
            await linkprobe.measure_link(pb.MeasureLinkRequest(target_address=address), "self")

    try:
        with pytest.raises(linkprobe.LinkProbeError, match="older than the data-path") as e:
            run(main())
    finally:
        thread.join(10)
        listener.close()
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (pb.MeasureLinkRequest(target_address="no-port"), "host:port"),
        (pb.MeasureLinkRequest(target_address="h:1", payload_bytes=[64]), "two distinct"),
        (pb.MeasureLinkRequest(target_address="h:1", payload_bytes=[0, 64]), "1 .."),
        (pb.MeasureLinkRequest(target_address="h:1", payload_bytes=[64, 1 << 30]), "1 .."),
        (pb.MeasureLinkRequest(target_address="h:1", repeats=10**6), "repeats"),
    ],
)
def test_bad_requests_are_invalid_arguments(request_: pb.MeasureLinkRequest, match: str) -> None:
    with pytest.raises(linkprobe.LinkProbeError, match=match) as e:
        run(linkprobe.measure_link(request_, "self"))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_local_host_detection() -> None:
    assert run(linkprobe.is_local_host("127.0.0.1"))
    assert run(linkprobe.is_local_host("localhost"))
    # TEST-NET-1 (RFC 5737) is never an address of this machine; binding sends nothing.
    assert not run(linkprobe.is_local_host("192.0.2.1"))
