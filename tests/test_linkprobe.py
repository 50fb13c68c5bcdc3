"""The node-side link sweep against a small Echo server of the test's own on loopback."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from node import linkprobe
from node._proto.layerlink.v1 import node_pb2 as pb
from node._proto.layerlink.v1 import node_pb2_grpc as pb_grpc


class EchoNode(pb_grpc.NodeServicer):
    """GetInfo + Echo, optionally slowed down per byte or ignoring reply_bytes."""

    def __init__(self, node_id: str, us_per_kib: float = 0.0, honour_reply_bytes: bool = True,
                 delay_s: float = 0.0) -> None:  # fmt: skip
        self.node_id = node_id
        self.us_per_kib = us_per_kib
        self.delay_s = delay_s
        self.honour_reply_bytes = honour_reply_bytes

    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.NodeInfo:
        return pb.NodeInfo(node_id=self.node_id, name="echo", hostname="echo-host")

    async def Echo(self, request_iterator: AsyncIterator[pb.EchoRequest], context: Any
                   ) -> AsyncIterator[pb.EchoReply]:  # fmt: skip
        async for req in request_iterator:
            if self.us_per_kib or self.delay_s:
                await asyncio.sleep(self.delay_s + len(req.payload) / 1024 * self.us_per_kib * 1e-6)
            if req.reply_bytes and self.honour_reply_bytes:
                yield pb.EchoReply(payload=bytes(req.reply_bytes))
            else:
                yield pb.EchoReply(payload=req.payload)


async def serve(servicer: EchoNode) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_NodeServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_sweep_on_loopback_is_fitted_and_same_host() -> None:
    async def main() -> tuple[pb.MeasureLinkReply, float]:
        server, address = await serve(EchoNode("target-id"))
        try:
            t0 = time.monotonic()
            reply = await linkprobe.measure_link(
                pb.MeasureLinkRequest(target_address=address), "self-id"
            )
            return reply, time.monotonic() - t0
        finally:
            await server.stop(None)

    reply, seconds = run(main())
    assert reply.target_node_id == "target-id"
    assert reply.same_host
    sizes = [s.payload_bytes for s in reply.samples]
    assert sizes[0] == 64 and sizes[-1] >= 4 << 20  # loopback affords the big sizes
    assert sizes == sorted(sizes)
    assert all(s.median_rtt_us > 0 for s in reply.samples)
    assert reply.bandwidth_gbs > 0.05
    assert 5.0 < reply.latency_us < 20_000.0
    assert seconds < linkprobe.LINK_BUDGET_S + 2.0


def test_slow_link_is_cut_to_the_budget_and_fitted() -> None:
    # 100 us per KiB: 10 MB/s; 16 MiB would take 1.7 s per message.
    async def main() -> tuple[pb.MeasureLinkReply, float]:
        server, address = await serve(EchoNode("slow", us_per_kib=100.0))
        try:
            t0 = time.monotonic()
            reply = await linkprobe.measure_link(
                pb.MeasureLinkRequest(target_address=address), "self", budget_s=1.0
            )
            return reply, time.monotonic() - t0
        finally:
            await server.stop(None)

    reply, seconds = run(main())
    assert seconds < 1.0 + 0.5
    assert reply.samples[-1].payload_bytes < 16 << 20  # the largest sizes were skipped
    assert reply.bandwidth_gbs == pytest.approx(1024 / 100.0 * 1e-3, rel=0.25)


def test_added_round_trip_delay_shows_as_half_in_the_latency() -> None:
    async def latency(delay_s: float) -> float:
        server, address = await serve(EchoNode("t", delay_s=delay_s))
        try:
            req = pb.MeasureLinkRequest(target_address=address, payload_bytes=[64, 4096, 1 << 20])
            reply = await linkprobe.measure_link(req, "self")
            return reply.latency_us
        finally:
            await server.stop(None)

    base = run(latency(0.0))
    delayed = run(latency(0.004))  # 4 ms more per round trip: 2 ms more one-way
    assert delayed - base == pytest.approx(2000.0, rel=0.25)


def test_explicit_sizes_and_repeats_are_honoured() -> None:
    async def main() -> pb.MeasureLinkReply:
        server, address = await serve(EchoNode("t"))
        try:
            req = pb.MeasureLinkRequest(
                target_address=address, payload_bytes=[100, 1000, 100000], repeats=2, warmup=1
            )
            return await linkprobe.measure_link(req, "self")
        finally:
            await server.stop(None)

    assert [s.payload_bytes for s in run(main()).samples] == [100, 1000, 100000]


def test_target_that_echoes_everything_is_refused() -> None:
    async def main() -> None:
        server, address = await serve(EchoNode("t", honour_reply_bytes=False))
        try:
            await linkprobe.measure_link(pb.MeasureLinkRequest(target_address=address), "self")
        finally:
            await server.stop(None)

    with pytest.raises(linkprobe.LinkProbeError, match="reply_bytes") as e:
        run(main())
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_unreachable_target_is_unavailable() -> None:
    async def main() -> None:
        server, address = await serve(EchoNode("t"))
        await server.stop(None)  # nothing listens there any more
        await linkprobe.measure_link(pb.MeasureLinkRequest(target_address=address), "self")

    with pytest.raises(linkprobe.LinkProbeError) as e:
        run(main())
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


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
