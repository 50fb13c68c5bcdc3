"""The cluster probe: scheduling that keeps measurements apart, the result's JSON contract,
and `coordinator probe --json` against real nodes on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import jsonschema
import pytest

from coordinator.probe import LinkFigures, ProbeResult, link_batches, probe_cluster
from node import hardware
from node._proto.layerlink.v1 import node_pb2 as pb
from node.mdns import NodeRecord

SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "coordinator/schemas/probe.schema.json").read_text()
)


def record(i: int) -> NodeRecord:
    return NodeRecord(node_id=f"id{i}", name=f"n{i}", host=f"10.0.0.{i}", port=50151,
                      protocol_version=1, backend="cpu", device_count=1, mem_bytes=1 << 30,
                      cluster="t")  # fmt: skip


def test_batches_cover_every_pair_once_and_never_share_a_machine() -> None:
    nodes = [record(i) for i in range(5)]
    hosts = {"id0": "a", "id1": "b", "id2": "c", "id3": "c", "id4": "d"}  # id2, id3 share one
    batches = link_batches(nodes, hosts)
    pairs = [frozenset((a.node_id, b.node_id)) for batch in batches for a, b in batch]
    assert sorted(map(sorted, pairs)) == sorted(
        sorted((a.node_id, b.node_id)) for a, b in itertools.combinations(nodes, 2)
    )
    for batch in batches:
        used = [hosts[n.node_id] for pair in batch for n in pair]
        assert len(used) - len(set(used)) == sum(
            1 for a, b in batch if hosts[a.node_id] == hosts[b.node_id]
        )  # a machine appears in one pair of a batch only (twice if both ends are on it)


def test_four_machines_take_three_batches() -> None:
    nodes = [record(i) for i in range(4)]
    assert len(link_batches(nodes, {n.node_id: n.node_id for n in nodes})) == 3
    assert len(link_batches(nodes, {n.node_id: "one host" for n in nodes})) == 6


class FakeCluster:
    """Nodes whose link bandwidth is the slower of the two ends' rates; records overlap."""

    def __init__(self, rates: dict[str, float], hosts: dict[str, str], down: str = "") -> None:
        self.rates = rates
        self.hosts = hosts
        self.down = down
        self.active: list[set[str]] = []
        self.overlaps: list[tuple[set[str], set[str]]] = []
        self.device_calls: list[str] = []
        self.by_address = {f"10.0.0.{k[2:]}:50151": k for k in rates}

    def client(self, address: str) -> FakeClient:
        return FakeClient(self, self.by_address[address])


class FakeClient:
    def __init__(self, cluster: FakeCluster, node_id: str) -> None:
        self.c = cluster
        self.node_id = node_id

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:  # fmt: skip
        return None

    async def get_info(self, timeout: float = 0) -> pb.NodeInfo:
        return pb.NodeInfo(node_id=self.node_id, hostname=self.c.hosts[self.node_id],
                           backend="cpu", devices=[pb.DeviceInfo(name="cpu", kind="cpu")])  # fmt: skip

    async def measure_link(self, target_address: str, payload_bytes: Any = None,
                           repeats: int = 0, warmup: int = 0, timeout: float = 0
                           ) -> pb.MeasureLinkReply:  # fmt: skip
        dst = self.c.by_address[target_address]
        if self.c.down in (self.node_id, dst):
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                       grpc.aio.Metadata(), "node down")  # fmt: skip
        machines = {self.c.hosts[self.node_id], self.c.hosts[dst]}
        for other in self.c.active:
            if other & machines:
                self.c.overlaps.append((other, machines))
        self.c.active.append(machines)
        await asyncio.sleep(0.01)
        self.c.active.remove(machines)
        gbs = min(self.c.rates[self.node_id], self.c.rates[dst])
        lat = 5.0 if self.c.hosts[self.node_id] == self.c.hosts[dst] else 150.0
        samples = [pb.LinkSample(payload_bytes=n, median_rtt_us=2 * lat + n / (gbs * 1e3))
                   for n in (64, 4096, 1 << 20)]  # fmt: skip
        return pb.MeasureLinkReply(target_node_id=dst, samples=samples, latency_us=lat,
                                   bandwidth_gbs=gbs, fit_residual=0.01,
                                   same_host=self.c.hosts[self.node_id] == self.c.hosts[dst])  # fmt: skip

    async def measure_devices(self, dtypes: Any = None, buffer_bytes: int = 0,
                              timeout: float = 0) -> pb.MeasureDevicesReply:  # fmt: skip
        self.c.device_calls.append(self.node_id)
        dev = pb.DeviceMeasurement(index=0, name="cpu", kind="cpu", mem_total_bytes=8 << 30,
                                   mem_free_bytes=4 << 30, stream_gbs=4.0, matmul_tflops=0.01,
                                   stream_by_dtype=[pb.StreamRate(dtype="float16", gbs=4.0)])  # fmt: skip
        return pb.MeasureDevicesReply(
            devices=[dev], host_copy_gbs=10.0, nvml_status="no NVIDIA GPU"
        )


def run_fake(cluster: FakeCluster, n: int) -> ProbeResult:
    nodes = [record(i) for i in range(n)]
    return asyncio.run(probe_cluster(nodes, client_factory=cluster.client))


def test_probe_measures_every_ordered_pair_without_overlap_and_finds_the_slowest() -> None:
    rates = {"id0": 0.0125, "id1": 1.0, "id2": 1.0, "id3": 1.0}
    hosts = {"id0": "a", "id1": "b", "id2": "c", "id3": "c"}
    cluster = FakeCluster(rates, hosts)
    result = run_fake(cluster, 4)
    assert cluster.overlaps == []
    assert {(x.src, x.dst) for x in result.links} == {
        (a, b) for a in rates for b in rates if a != b
    }
    slow = {(x.src, x.dst) for x in result.slowest_links()}
    assert slow == {(a, b) for a in rates for b in rates if a != b and "id0" in (a, b)}
    worst = result.slowest_link()
    assert worst is not None and "id0" in (worst.src, worst.dst)
    assert result.link("id2", "id3").same_host  # type: ignore[union-attr]
    assert not result.link("id1", "id2").same_host  # type: ignore[union-attr]
    assert sorted(cluster.device_calls) == ["id0", "id1", "id2", "id3"]
    doc = result.to_json()
    jsonschema.validate(doc, SCHEMA)
    assert sum(lk["slowest"] for lk in doc["links"]) == 6
    assert doc["errors"] == []


def test_probe_keeps_going_when_a_node_fails() -> None:
    cluster = FakeCluster({"id0": 1.0, "id1": 1.0, "id2": 1.0}, {"id0": "a", "id1": "b", "id2": "c"},
                          down="id2")  # fmt: skip
    result = run_fake(cluster, 3)
    assert {(x.src, x.dst) for x in result.links} == {("id0", "id1"), ("id1", "id0")}
    assert len(result.errors) == 4 and all("UNAVAILABLE" in e for e in result.errors)
    jsonschema.validate(result.to_json(), SCHEMA)


def test_schema_rejects_what_the_planner_could_not_use() -> None:
    link = LinkFigures("a", "b", "a", "b", 100.0, 0.1, False, 0.01, ((64, 200.0), (4096, 240.0)))
    good = ProbeResult(nodes=(), links=(link,), seconds=1.0).to_json()
    jsonschema.validate(good, SCHEMA)
    for path, value in [(("links", 0, "bandwidth_gbs"), 0.0), (("links", 0, "latency_us"), -1.0),
                        (("links", 0, "same_host"), "no"), (("seconds",), "1")]:  # fmt: skip
        bad = json.loads(json.dumps(good))
        target: Any = bad
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, SCHEMA)
    bad = json.loads(json.dumps(good))
    del bad["links"][0]["same_host"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


def test_probe_json_on_loopback_nodes(local_cluster: Any) -> None:
    nodes = [a for n in local_cluster.nodes for a in ("--node", n.address)]
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.main", "probe", "--json", *nodes,
         "--dtype", "float32", "--buffer-mib", "64"],  # fmt: skip
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    jsonschema.validate(doc, SCHEMA)
    n = len(local_cluster.nodes)
    assert len(doc["nodes"]) == n and len(doc["links"]) == n * (n - 1)
    assert all(lk["same_host"] for lk in doc["links"])  # all on 127.0.0.1
    backend = hardware.mlx_backend()  # the nodes run this machine's MLX
    for node in doc["nodes"]:
        device = node["devices"][0]  # the stage device (NVML-only GPUs may follow it)
        assert device["kind"] == backend and device["stream_gbs"] > 0
        assert list(device["stream_by_dtype"]) == ["float32"]
        assert device["mem_source"] and 0 < device["mem_free_bytes"] <= device["mem_total_bytes"]
    assert doc["seconds"] < 30
    # Each link was measured on its target's data port (the source node logs where it sent
    # its ECHO frames), not over gRPC.
    data_ports = asyncio.run(_data_ports([n.address for n in local_cluster.nodes]))
    assert local_cluster.log_dir is not None
    for src in local_cluster.nodes:
        log = (local_cluster.log_dir / f"{src.name}.log").read_text()
        for dst in local_cluster.nodes:
            if dst is not src:
                grpc_port = int(dst.address.rpartition(":")[2])
                assert data_ports[dst.address] not in (0, grpc_port)
                assert f"data path 127.0.0.1:{data_ports[dst.address]})" in log


async def _data_ports(addresses: list[str]) -> dict[str, int]:
    from coordinator.nodeclient import NodeClient

    out = {}
    for address in addresses:
        async with NodeClient(address) as c:
            out[address] = (await c.get_info()).data_port
    return out
