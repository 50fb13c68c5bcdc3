"""Measure the link from this node to another node: a ping-pong sweep over the target's data
path (node/datapath.py: raw TCP, length-prefixed protobuf frames, the authenticated
handshake; the transport that carries activations between stages), then a fit of one-way
latency and bandwidth (node/linkfit.py explains the model).

The target's data address is its gRPC host with the port its GetInfo names (`data_port`).
The sweep: ECHO frames of 64 B .. 16 MiB payload, each answered on the target's data
connection thread by an ECHO_REPLY of 8 bytes, so the figures are those of the direction
source -> target. It runs on a thread of its own with a blocking socket, as a node's data
connection does, and each round trip is timed there, around the send and the read. A target
that has no data path, cannot be reached on it, refuses the token or predates ECHO frames
(it closes the connection, or answers REFUSED) fails the measurement with a message saying
so; nothing falls back to gRPC. A few messages warm the connection up first and one
message per size is a warm-up; neither is timed. Each size's figure is the median round
trip of its repeats. A time budget (LINK_BUDGET_S by default) bounds the whole sweep: the
largest sizes get fewer repeats, or are skipped, when the link is too slow to afford them;
the reply lists the sizes that were actually measured.

Same host: the target is on this machine when its address is one of this machine's own
addresses (loopback included; tested by binding a socket to it) or when it is this node.
Host names are not compared: network namespaces on one machine share a host name but not a
network path, and the question here is whether bytes cross a NIC.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from node import auth, datapath, linkfit
from node._proto.layerlink.v1 import node_pb2 as pb
from node._proto.layerlink.v1 import node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# 64 B .. 16 MiB, denser at the top where the bandwidth is decided.
DEFAULT_SIZES: tuple[int, ...] = (64, 512, 4096, 32768, 262144, 1 << 20, 4 << 20, 16 << 20)
DEFAULT_REPEATS = 7
# Latency-dominated sizes are cheap and decide the latency, which jitters by tens of us on
# a busy host: they get more repeats. Transfer-dominated sizes vary little: fewer repeats.
SMALL_RTT_US = 2_000.0
SMALL_REPEATS = 25
LARGE_RTT_US = 10_000.0
LARGE_REPEATS = 3
DEFAULT_WARMUP = 1
# Untimed messages at the start of the connection (TCP windows, allocators).
STREAM_WARMUP = 3
REPLY_BYTES = 8
LINK_BUDGET_S = 2.5
GET_INFO_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 5.0
# A reply that takes longer than this ends the sweep (the target hangs).
IO_TIMEOUT_S = 30.0

# Below the data path's frame limit (64 MiB) with room for the framing.
MAX_PAYLOAD_BYTES = 32 << 20
MAX_SIZES = 32
MAX_REPEATS = 1000


class LinkProbeError(Exception):
    """A measurement that cannot be made; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class SweepPlan:
    sizes: tuple[int, ...]
    repeats: int
    warmup: int
    budget_s: float
    repeats_given: bool = False


def plan_sweep(request: pb.MeasureLinkRequest, budget_s: float = LINK_BUDGET_S) -> SweepPlan:
    """Validate the request and fill in defaults."""
    sizes = tuple(sorted(set(request.payload_bytes))) or DEFAULT_SIZES
    if len(sizes) < 2:
        raise LinkProbeError(
            grpc.StatusCode.INVALID_ARGUMENT, "payload_bytes needs at least two distinct sizes"
        )
    if len(sizes) > MAX_SIZES:
        raise LinkProbeError(
            grpc.StatusCode.INVALID_ARGUMENT, f"at most {MAX_SIZES} payload sizes per sweep"
        )
    if sizes[0] < 1 or sizes[-1] > MAX_PAYLOAD_BYTES:
        raise LinkProbeError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"payload sizes must lie in 1 .. {MAX_PAYLOAD_BYTES} bytes",
        )
    if request.repeats > MAX_REPEATS or request.warmup > MAX_REPEATS:
        raise LinkProbeError(
            grpc.StatusCode.INVALID_ARGUMENT, f"repeats and warmup must be <= {MAX_REPEATS}"
        )
    return SweepPlan(
        sizes=sizes,
        repeats=request.repeats or DEFAULT_REPEATS,
        warmup=request.warmup or DEFAULT_WARMUP,
        budget_s=budget_s,
        repeats_given=request.repeats > 0,
    )


def split_address(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise LinkProbeError(
            grpc.StatusCode.INVALID_ARGUMENT, f"target_address {address!r} is not host:port"
        )
    return host.strip("[]"), int(port_text)


def _bindable(family: int, ip: str) -> bool:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


async def is_local_host(host: str) -> bool:
    """True when `host` resolves to an address of this machine (in this network namespace)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        ip = str(sockaddr[0])
        try:
            addr = ipaddress.ip_address(ip.split("%")[0])
        except ValueError:
            continue
        if addr.is_loopback or addr.is_unspecified or _bindable(family, ip):
            return True
    return False


@functools.lru_cache(maxsize=1)
def _random_block() -> bytes:
    # Incompressible payload, made once per process.
    return os.urandom(MAX_PAYLOAD_BYTES)


def _requests(sizes: Sequence[int]) -> dict[int, pb.EchoRequest]:
    block = _random_block()
    return {n: pb.EchoRequest(payload=block[:n], reply_bytes=REPLY_BYTES) for n in sizes}


def _predict_rtt_us(samples: Sequence[linkfit.Sample], n: int) -> float:
    """Conservative guess of the next size's round trip from the sizes measured so far."""
    last = samples[-1]
    if len(samples) < 2:
        return last.rtt_us
    prev = samples[-2]
    slope = (last.rtt_us - prev.rtt_us) / (last.payload_bytes - prev.payload_bytes)
    return last.rtt_us + max(slope, 0.0) * (n - last.payload_bytes)


class Pinger(Protocol):
    """Sends one request and waits for its reply; returns the round trip in us."""

    def ping(self, request: pb.EchoRequest) -> float: ...


class DataPathPinger:
    """ECHO frames on one data-path connection (blocking, from the sweep's thread)."""

    def __init__(self, link: datapath.BlockingLink) -> None:
        self._link = link
        self.replies = 0

    def ping(self, request: pb.EchoRequest) -> float:
        address = self._link.address
        t0 = time.perf_counter_ns()
        try:
            self._link.send(datapath.ECHO, request)
            kind, reply = self._link.read()
        except datapath.FrameRefused as e:
            raise LinkProbeError(
                grpc.StatusCode.FAILED_PRECONDITION, f"{e} (an ECHO frame of the link probe)"
            ) from None
        except (ConnectionError, datapath.FrameError) as e:
            if self.replies == 0:
                raise LinkProbeError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the node at {address} closed its data connection at the first ECHO "
                    f"frame ({e}): a LayerLink node older than the data-path link probe; "
                    "update it",
                ) from None
            raise LinkProbeError(
                grpc.StatusCode.UNAVAILABLE, f"data connection to {address} lost: {e}"
            ) from None
        except TimeoutError:
            raise LinkProbeError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no echo from the node at {address} within {IO_TIMEOUT_S:.0f}s",
            ) from None
        t1 = time.perf_counter_ns()
        if kind != datapath.ECHO_REPLY or not isinstance(reply, pb.EchoReply):
            raise LinkProbeError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the node at {address} answered an ECHO frame with a frame of kind {kind}",
            )
        self.replies += 1
        if len(reply.payload) != REPLY_BYTES:
            raise LinkProbeError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the target echoed {len(reply.payload)} bytes where {REPLY_BYTES} were asked "
                "(reply_bytes unsupported?)",
            )
        return (t1 - t0) / 1e3


def sweep(pinger: Pinger, plan: SweepPlan) -> list[linkfit.Sample]:
    """Run the sweep within plan.budget_s; return one median sample per measured size."""
    requests = _requests(plan.sizes)
    start = time.monotonic()
    deadline = start + plan.budget_s
    for _ in range(STREAM_WARMUP):
        pinger.ping(requests[plan.sizes[0]])
    samples: list[linkfit.Sample] = []
    for n in plan.sizes:
        remaining_us = (deadline - time.monotonic()) * 1e6
        repeats, warmup = plan.repeats, plan.warmup
        pred = _predict_rtt_us(samples, n) if samples else 0.0
        if not plan.repeats_given:
            if pred < SMALL_RTT_US:
                repeats = SMALL_REPEATS
            elif pred > LARGE_RTT_US:
                repeats = LARGE_REPEATS
        if samples:
            affordable = int(remaining_us // max(pred, 1.0))
            if affordable < 2:
                log.debug("sweep stops before %d B: %.0f us predicted per message", n, pred)
                break
            # The warm-up is what a large message can go without first: the stream is warm.
            warmup = min(warmup, affordable - 1)
            repeats = max(1, min(repeats, affordable - warmup))
        for _ in range(warmup):
            pinger.ping(requests[n])
        rtts: list[float] = []
        for _ in range(repeats):
            rtts.append(pinger.ping(requests[n]))
            if time.monotonic() > deadline:
                break
        samples.append(linkfit.Sample(payload_bytes=n, rtt_us=statistics.median(rtts)))
        if time.monotonic() > deadline:
            break
    return samples


def sweep_data_path(
    address: str, plan: SweepPlan, key: auth.ClusterKey | None
) -> tuple[list[linkfit.Sample], int]:
    """Connect to the data path at `address`, pass its handshake with `key` and run the
    sweep (blocking: call it on a thread of its own). Returns the samples and the number
    of echoes answered."""
    link = datapath.BlockingLink(address)
    try:
        link.connect(CONNECT_TIMEOUT_S, key, io_timeout=IO_TIMEOUT_S)
    except datapath.DataAuthError as e:
        raise LinkProbeError(grpc.StatusCode.UNAUTHENTICATED, str(e)) from None
    except OSError as e:  # refused, unreachable, timed out, closed during the handshake
        raise LinkProbeError(
            grpc.StatusCode.UNAVAILABLE, f"cannot open the data path at {address}: {e}"
        ) from None
    with link:
        pinger = DataPathPinger(link)
        try:
            samples = sweep(pinger, plan)
        except OSError as e:  # a send that failed
            raise LinkProbeError(
                grpc.StatusCode.UNAVAILABLE, f"data connection to {address} lost: {e}"
            ) from None
    return samples, pinger.replies


async def measure_link(
    request: pb.MeasureLinkRequest,
    self_node_id: str,
    *,
    budget_s: float = LINK_BUDGET_S,
    metadata: Sequence[tuple[str, str]] = (),
) -> pb.MeasureLinkReply:
    """Sweep the data path to the node at request.target_address (its gRPC address) and
    fit it. Raises LinkProbeError."""
    plan = plan_sweep(request, budget_s)
    host, _port = split_address(request.target_address)
    async with auth.secure_channel(request.target_address) as channel:
        try:
            info: pb.NodeInfo = await pb_grpc.NodeStub(channel).GetInfo(
                pb.GetInfoRequest(), timeout=GET_INFO_TIMEOUT_S, metadata=tuple(metadata)
            )
        except grpc.aio.AioRpcError as e:
            raise LinkProbeError(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot reach target {request.target_address}: {e.code().name} {e.details()}",
            ) from e
    if not info.data_port:
        raise LinkProbeError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"target {request.target_address} ({info.name}) has no data path (data_port 0): "
            "there is no activation transport to measure",
        )
    address = datapath.data_address(request.target_address, info.data_port)
    same_host = info.node_id == self_node_id or await is_local_host(host)
    t0 = time.monotonic()
    # The process's key is read here: the sweep's thread sees the same one.
    samples, echoes = await asyncio.to_thread(sweep_data_path, address, plan, auth.current_key())
    try:
        fit = linkfit.fit_link(samples)
    except ValueError as e:
        raise LinkProbeError(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"the link to {request.target_address} is too slow to sweep two payload sizes "
            f"in {plan.budget_s:.1f}s",
        ) from e
    log.info(
        "link -> %s (%s, data path %s): %.1f us, %.3f GB/s, residual %.3f, %d sizes, "
        "%d echoes in %.2fs%s",
        request.target_address,
        info.name,
        address,
        fit.latency_us,
        fit.bandwidth_gbs,
        fit.residual,
        len(samples),
        echoes,
        time.monotonic() - t0,
        ", same host" if same_host else "",
    )
    return pb.MeasureLinkReply(
        target_node_id=info.node_id,
        samples=[
            pb.LinkSample(payload_bytes=s.payload_bytes, median_rtt_us=s.rtt_us) for s in samples
        ],
        latency_us=fit.latency_us,
        bandwidth_gbs=fit.bandwidth_gbs,
        fit_residual=fit.residual,
        same_host=same_host,
    )
