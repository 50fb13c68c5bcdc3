"""Measure the cluster: every ordered pair's link (measured by the nodes themselves) and
every node's devices, into one immutable `ProbeResult` for the planner and the CLI.

Scheduling, so that measurements do not distort each other:
- Links: a node measuring two links at once would see each at about half its speed, and
  two nodes on one machine share its CPU and NIC. So the unordered pairs run in batches in
  which no machine (NodeInfo.hostname) appears twice; inside a batch the pairs run
  concurrently, and each pair measures a -> b, then b -> a. With n machines a batch holds
  about n/2 pairs: a 4-machine cluster takes 3 batches of 2 pairs.
- Devices: after the links (device benchmarks load CPU and memory, which would slow the
  echo sweeps), one node per machine at a time; different machines in parallel.

Failures of single measurements (a node gone, a link too slow for its budget) are kept as
error lines in the result; the rest of the probe goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Protocol

import grpc

from node import linkfit
from node._proto.layerlink.v1 import node_pb2 as pb
from node.mdns import NodeRecord

log = logging.getLogger(__name__)

# A link within this factor of the slowest bandwidth counts among the slowest.
SLOW_TOLERANCE = 1.25
LINK_TIMEOUT_S = 60.0
DEVICES_TIMEOUT_S = 300.0
NOT_SERVED_NOTE = "the node runs no stages on it (start it with `cluster-node up --devices N`)"


class ProbeClient(Protocol):
    """What the probe needs of a node client (coordinator.nodeclient.NodeClient has it)."""

    async def __aenter__(self) -> Any: ...

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def get_info(self, timeout: float = ...) -> pb.NodeInfo: ...

    async def measure_link(
        self,
        target_address: str,
        payload_bytes: list[int] | None = ...,
        repeats: int = ...,
        warmup: int = ...,
        timeout: float = ...,
    ) -> pb.MeasureLinkReply: ...

    async def measure_devices(
        self, dtypes: list[str] | None = ..., buffer_bytes: int = ..., timeout: float = ...
    ) -> pb.MeasureDevicesReply: ...


ClientFactory = Callable[[str], ProbeClient]


@dataclass(frozen=True)
class PcieFigures:
    gen: int
    width: int
    max_gen: int
    max_width: int
    theoretical_gbs: float
    h2d_gbs: float
    d2h_gbs: float
    h2d_latency_us: float
    d2h_latency_us: float

    def to_json(self) -> dict[str, Any]:
        return {
            "gen": self.gen,
            "width": self.width,
            "max_gen": self.max_gen,
            "max_width": self.max_width,
            "theoretical_gbs": self.theoretical_gbs,
            "h2d_gbs": self.h2d_gbs,
            "d2h_gbs": self.d2h_gbs,
            "h2d_latency_us": self.h2d_latency_us,
            "d2h_latency_us": self.d2h_latency_us,
        }


@dataclass(frozen=True)
class DeviceFigures:
    index: int
    name: str
    kind: str
    mem_total_bytes: int
    mem_free_bytes: int
    stream_gbs: float
    stream_by_dtype: tuple[tuple[str, float], ...]
    matmul_tflops: float
    pcie: PcieFigures | None
    unified_memory: bool
    note: str
    # How the node computes half-precision weights on it (GetInfo): "float32" or "native".
    compute_dtype: str = "native"
    # Where the memory figures come from (DeviceInfo.mem_source): "nvml", "mlx",
    # "metal-working-set" or "os"; "" from a node that does not say.
    mem_source: str = ""
    # The node serves stages on it (GetInfo's runs_stages), and where: host:port of the
    # device worker that serves it ("" : the node's own server).
    runs_stages: bool = True
    address: str = ""

    @property
    def usable(self) -> bool:
        """Stages can run on it: the node serves stages on it and it was timed (MLX
        drives it)."""
        return self.runs_stages and self.stream_gbs > 0.0 and self.matmul_tflops > 0.0

    @classmethod
    def from_proto(cls, m: pb.DeviceMeasurement) -> DeviceFigures:
        pcie = None
        if m.HasField("pcie"):
            p = m.pcie
            pcie = PcieFigures(
                gen=p.link.gen, width=p.link.width, max_gen=p.link.max_gen,
                max_width=p.link.max_width, theoretical_gbs=p.theoretical_gbs,
                h2d_gbs=p.h2d_gbs, d2h_gbs=p.d2h_gbs, h2d_latency_us=p.h2d_latency_us,
                d2h_latency_us=p.d2h_latency_us,
            )  # fmt: skip
        return cls(
            index=m.index, name=m.name, kind=m.kind, mem_total_bytes=m.mem_total_bytes,
            mem_free_bytes=m.mem_free_bytes, stream_gbs=m.stream_gbs,
            stream_by_dtype=tuple((s.dtype, s.gbs) for s in m.stream_by_dtype),
            matmul_tflops=m.matmul_tflops, pcie=pcie, unified_memory=m.unified_memory,
            note=m.note, mem_source=m.mem_source,
        )  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "mem_total_bytes": self.mem_total_bytes,
            "mem_free_bytes": self.mem_free_bytes,
            "stream_gbs": self.stream_gbs,
            "stream_by_dtype": dict(self.stream_by_dtype),
            "matmul_tflops": self.matmul_tflops,
            "unified_memory": self.unified_memory,
            "pcie": self.pcie.to_json() if self.pcie is not None else None,
            "note": self.note,
            "compute_dtype": self.compute_dtype,
            "mem_source": self.mem_source,
            "runs_stages": self.runs_stages,
            "address": self.address,
        }


@dataclass(frozen=True)
class NodeFigures:
    node_id: str
    name: str
    address: str
    backend: str
    hostname: str
    host_copy_gbs: float
    nvml_status: str
    devices: tuple[DeviceFigures, ...]
    # The CPU cores the node's processes run on (GetInfo); () from a node that does not say.
    cpu_cores: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "name": self.name,
            "address": self.address,
            "backend": self.backend,
            "hostname": self.hostname,
            "cpu_cores": list(self.cpu_cores),
            "host_copy_gbs": self.host_copy_gbs,
            "nvml_status": self.nvml_status,
            # Devices stages can run on; the others (an NVIDIA GPU that MLX cannot drive from
            # this install, devices not measured) are listed apart, with the reason in `note`.
            "devices": [d.to_json() for d in self.devices if d.usable],
            "unused_devices": [d.to_json() for d in self.devices if not d.usable],
        }


@dataclass(frozen=True)
class LinkFigures:
    """The link src -> dst as src measured it: one_way(n) = latency + n / bandwidth.

    When `bandwidth_resolved` is False the sweep could not tell the bandwidth (the link is
    faster than the sweep resolves) and bandwidth_gbs is a lower bound."""

    src: str
    dst: str
    src_name: str
    dst_name: str
    latency_us: float
    bandwidth_gbs: float
    same_host: bool
    residual: float
    samples: tuple[tuple[int, float], ...]  # (payload bytes, median round trip us)
    bandwidth_resolved: bool = True

    def to_json(self, slowest: bool = False) -> dict[str, Any]:
        return {
            "src": self.src,
            "dst": self.dst,
            "src_name": self.src_name,
            "dst_name": self.dst_name,
            "latency_us": self.latency_us,
            "bandwidth_gbs": self.bandwidth_gbs,
            "bandwidth_resolved": self.bandwidth_resolved,
            "same_host": self.same_host,
            "residual": self.residual,
            "slowest": slowest,
            "samples": [{"payload_bytes": n, "median_rtt_us": t} for n, t in self.samples],
        }


@dataclass(frozen=True)
class DeviceLinkFigures:
    """The hop between two devices of one node, device `src`'s process sending to device
    `dst`'s through host memory (a loopback socket), as `src` measured it: the intra-node
    hop the cost model plans with (the device <-> host copies are added from each device's
    PCIe figures)."""

    node_id: str
    node_name: str
    src: str  # device labels, as the node numbers its devices
    dst: str
    latency_us: float
    bandwidth_gbs: float
    bandwidth_resolved: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "node_name": self.node_name,
            "src": self.src,
            "dst": self.dst,
            "latency_us": self.latency_us,
            "bandwidth_gbs": self.bandwidth_gbs,
            "bandwidth_resolved": self.bandwidth_resolved,
        }


@dataclass(frozen=True)
class ProbeResult:
    nodes: tuple[NodeFigures, ...]
    links: tuple[LinkFigures, ...]
    seconds: float
    errors: tuple[str, ...] = ()
    device_links: tuple[DeviceLinkFigures, ...] = ()

    def link(self, src: str, dst: str) -> LinkFigures | None:
        return next((x for x in self.links if x.src == src and x.dst == dst), None)

    def slowest_link(self) -> LinkFigures | None:
        """The link of lowest measured bandwidth (ties: the higher latency)."""
        measured = [x for x in self.links if x.bandwidth_gbs > 0.0 and x.bandwidth_resolved]
        if not measured:
            return None
        return min(measured, key=lambda x: (x.bandwidth_gbs, -x.latency_us))

    def slowest_links(self, tolerance: float = SLOW_TOLERANCE) -> tuple[LinkFigures, ...]:
        """Every link within `tolerance` x the slowest one's bandwidth."""
        worst = self.slowest_link()
        if worst is None:
            return ()
        limit = worst.bandwidth_gbs * tolerance
        return tuple(
            x for x in self.links if x.bandwidth_resolved and 0.0 < x.bandwidth_gbs <= limit
        )

    def to_json(self) -> dict[str, Any]:
        slow = {(x.src, x.dst) for x in self.slowest_links()}
        worst = self.slowest_link()
        return {
            "nodes": [n.to_json() for n in self.nodes],
            "links": [x.to_json((x.src, x.dst) in slow) for x in self.links],
            "slowest": {"src": worst.src, "dst": worst.dst} if worst is not None else None,
            "device_links": [x.to_json() for x in self.device_links],
            "seconds": self.seconds,
            "errors": list(self.errors),
        }


def _samples_of(reply: pb.MeasureLinkReply) -> tuple[list[linkfit.Sample], bool]:
    """A link reply's samples, and whether their fit resolved the bandwidth."""
    samples = [linkfit.Sample(s.payload_bytes, s.median_rtt_us) for s in reply.samples]
    try:
        return samples, linkfit.fit_link(samples).resolved
    except ValueError:
        return samples, False


def link_from_reply(src: NodeRecord, dst: NodeRecord, reply: pb.MeasureLinkReply) -> LinkFigures:
    samples, resolved = _samples_of(reply)
    return LinkFigures(
        src=src.node_id, dst=dst.node_id, src_name=src.name, dst_name=dst.name,
        latency_us=reply.latency_us, bandwidth_gbs=reply.bandwidth_gbs,
        same_host=reply.same_host, residual=reply.fit_residual,
        samples=tuple((s.payload_bytes, s.rtt_us) for s in samples),
        bandwidth_resolved=resolved,
    )  # fmt: skip


def link_batches(
    nodes: Sequence[NodeRecord], host_of: dict[str, str]
) -> list[list[tuple[NodeRecord, NodeRecord]]]:
    """Unordered pairs grouped so that no machine appears twice in a batch."""
    pending = [(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1 :]]
    batches: list[list[tuple[NodeRecord, NodeRecord]]] = []
    while pending:
        used: set[str] = set()
        batch: list[tuple[NodeRecord, NodeRecord]] = []
        rest: list[tuple[NodeRecord, NodeRecord]] = []
        for a, b in pending:
            hosts = {host_of[a.node_id], host_of[b.node_id]}
            if hosts & used:
                rest.append((a, b))
            else:
                batch.append((a, b))
                used |= hosts
        batches.append(batch)
        pending = rest
    return batches


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return f"{type(e).__name__}: {e}"


def _default_factory(address: str) -> ProbeClient:
    from coordinator.nodeclient import NodeClient

    return NodeClient(address)


async def probe_cluster(
    nodes: Sequence[NodeRecord],
    *,
    dtypes: Sequence[str] = (),
    buffer_bytes: int = 0,
    devices: bool = True,
    client_factory: ClientFactory = _default_factory,
    on_progress: Callable[[str], None] | None = None,
) -> ProbeResult:
    """Measure every ordered pair's link and every node's devices (see module docstring)."""
    t0 = time.monotonic()
    errors: list[str] = []
    say = on_progress or (lambda _msg: None)
    clients = {n.node_id: client_factory(n.address) for n in nodes}
    for c in clients.values():
        await c.__aenter__()
    try:
        infos: dict[str, pb.NodeInfo] = {}
        for n in nodes:
            try:
                infos[n.node_id] = await clients[n.node_id].get_info()
            except (grpc.aio.AioRpcError, OSError) as e:
                errors.append(f"{n.name} ({n.address}) did not answer: {_describe(e)}")
        live = [n for n in nodes if n.node_id in infos]
        host_of = {n.node_id: infos[n.node_id].hostname or n.host for n in live}

        links: dict[tuple[str, str], LinkFigures] = {}

        async def measure(src: NodeRecord, dst: NodeRecord) -> None:
            try:
                reply = await clients[src.node_id].measure_link(dst.address, timeout=LINK_TIMEOUT_S)
            except (grpc.aio.AioRpcError, OSError) as e:
                errors.append(f"link {src.name} -> {dst.name}: {_describe(e)}")
                return
            links[(src.node_id, dst.node_id)] = link_from_reply(src, dst, reply)

        async def both_ways(a: NodeRecord, b: NodeRecord) -> None:
            await measure(a, b)
            await measure(b, a)

        for i, batch in enumerate(link_batches(live, host_of)):
            say(f"links: batch {i + 1}: " + ", ".join(f"{a.name}<->{b.name}" for a, b in batch))
            await asyncio.gather(*(both_ways(a, b) for a, b in batch))

        device_links: list[DeviceLinkFigures] = []
        for n in live:
            servers = stage_servers(n.address, infos[n.node_id])
            if len(servers) < 2:
                continue
            say(f"links: inside {n.name}: devices " + ", ".join(servers))
            for a, a_address in servers.items():
                for b, b_address in servers.items():
                    if a == b:
                        continue
                    try:
                        async with client_factory(a_address) as c:
                            reply = await c.measure_link(b_address, timeout=LINK_TIMEOUT_S)
                    except (grpc.aio.AioRpcError, OSError) as e:
                        errors.append(f"link {n.name} device {a} -> {b}: {_describe(e)}")
                        continue
                    device_links.append(device_link_from_reply(n, a, b, reply))

        reports: dict[str, pb.MeasureDevicesReply] = {}
        if devices:

            async def bench(n: NodeRecord) -> None:
                say(f"devices: {n.name}")
                try:
                    reports[n.node_id] = await clients[n.node_id].measure_devices(
                        list(dtypes), buffer_bytes, timeout=DEVICES_TIMEOUT_S
                    )
                except (grpc.aio.AioRpcError, OSError) as e:
                    errors.append(f"devices of {n.name}: {_describe(e)}")

            by_host: dict[str, list[NodeRecord]] = {}
            for n in live:
                by_host.setdefault(host_of[n.node_id], []).append(n)

            async def one_host(group: list[NodeRecord]) -> None:
                for n in group:
                    await bench(n)

            await asyncio.gather(*(one_host(g) for g in by_host.values()))
    finally:
        for c in clients.values():
            await c.__aexit__(None, None, None)

    node_figures = tuple(_node_figures(n, infos[n.node_id], reports.get(n.node_id)) for n in live)
    order = {n.node_id: i for i, n in enumerate(live)}
    ordered_links = tuple(links[k] for k in sorted(links, key=lambda k: (order[k[0]], order[k[1]])))
    return ProbeResult(
        nodes=node_figures, links=ordered_links, seconds=time.monotonic() - t0,
        errors=tuple(errors), device_links=tuple(device_links),
    )  # fmt: skip


def stage_servers(address: str, info: pb.NodeInfo) -> dict[str, str]:
    """Device label -> host:port of the server that runs that device's stages, for every
    device of the node at `address` that runs stages (a node from before device workers: its
    first)."""
    host = address.rsplit(":", 1)[0]
    out = {
        str(d.index): f"{host}:{d.grpc_port}" if d.grpc_port else address
        for d in info.devices
        if d.runs_stages
    }
    if not out and info.devices:
        out[str(info.devices[0].index)] = address
    return out


def device_link_from_reply(
    rec: NodeRecord, src: str, dst: str, reply: pb.MeasureLinkReply
) -> DeviceLinkFigures:
    _, resolved = _samples_of(reply)
    return DeviceLinkFigures(
        node_id=rec.node_id, node_name=rec.name, src=src, dst=dst, latency_us=reply.latency_us,
        bandwidth_gbs=reply.bandwidth_gbs, bandwidth_resolved=resolved,
    )  # fmt: skip


def _node_figures(
    rec: NodeRecord, info: pb.NodeInfo, report: pb.MeasureDevicesReply | None
) -> NodeFigures:
    if report is not None:
        devices = tuple(DeviceFigures.from_proto(d) for d in report.devices)
        host_copy, nvml_status = report.host_copy_gbs, report.nvml_status
    else:  # not measured: what the node says about itself
        devices = tuple(
            DeviceFigures(
                index=d.index,
                name=d.name,
                kind=d.kind,
                mem_total_bytes=d.mem_total_bytes,
                mem_free_bytes=d.mem_free_bytes,
                stream_gbs=0.0,
                stream_by_dtype=(),
                matmul_tflops=0.0,
                pcie=None,
                unified_memory=d.kind == "metal",
                note="not measured",
                mem_source=d.mem_source,
            )  # fmt: skip
            for d in info.devices
        )
        host_copy, nvml_status = 0.0, ""
    rules = {d.index: d.compute_dtype for d in info.devices if d.compute_dtype}
    servers = stage_servers(rec.address, info)
    devices = tuple(
        replace(
            d,
            compute_dtype=rules.get(d.index, d.compute_dtype),
            runs_stages=str(d.index) in servers,
            address="" if servers.get(str(d.index), rec.address) == rec.address
            else servers[str(d.index)],
            note=d.note if str(d.index) in servers
            else "; ".join(x for x in (d.note, NOT_SERVED_NOTE) if x),
        )
        for d in devices
    )  # fmt: skip
    return NodeFigures(
        node_id=rec.node_id, name=rec.name, address=rec.address, backend=info.backend or rec.backend,
        hostname=info.hostname, host_copy_gbs=host_copy, nvml_status=nvml_status, devices=devices,
        cpu_cores=tuple(int(c) for c in info.cpu_cores),
    )  # fmt: skip
