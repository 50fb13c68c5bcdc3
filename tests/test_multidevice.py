"""One node, several devices, several stages (`cluster-node up --devices N`): node A serves
two CPU devices (its own process and one device worker), node B one. A 3-stage plan over
A/0, A/1 and B/0 equals mlx_lm; the probe measures the hop between A's two devices and the
cost model plans with it; killing A drops both of its stages and the supervisor re-plans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest

from coordinator.costmodel import GIB, Cluster, ModelSpec, Workload
from coordinator.lab.localcluster import LocalCluster
from coordinator.nodeclient import NodeClient
from coordinator.pipeline import GenerationParams
from coordinator.planner import plan
from coordinator.probe import probe_cluster
from coordinator.session import even_plan, open_pipeline, read_model
from coordinator.supervisor import Supervisor
from node._proto.layerlink.v1 import node_pb2 as pb
from tests.helpers import reference_generate, wait_until

PROMPT = [5, 9, 33, 71, 2]


@pytest.fixture(scope="module")
def two_nodes(session_dir: Path) -> Iterator[LocalCluster]:
    """Node "mdA" with two devices, node "mdB" with one (A pinned to one core, B to the
    other, as a demo spreads its nodes)."""
    with LocalCluster(0, "multidevice", log_dir=session_dir, name_prefix="md") as cluster:
        cluster.start_node("mdA", extra_args=["--devices", "2"])
        cluster.start_node("mdB")
        yield cluster


def info(address: str) -> Any:
    async def get() -> Any:
        async with NodeClient(address) as c:
            return await c.get_info()

    return asyncio.run(get())


def worker_address(cluster: LocalCluster) -> str:
    a = cluster.nodes[0]
    (dev1,) = [d for d in info(a.address).devices if d.index == 1]
    return f"{a.address.rsplit(':', 1)[0]}:{dev1.grpc_port}"


def test_a_node_lists_each_device_with_its_own_server_and_memory(two_nodes: LocalCluster) -> None:
    a = two_nodes.nodes[0]
    node = info(a.address)
    assert [(d.index, d.runs_stages) for d in node.devices] == [(0, True), (1, True)]
    own, other = node.devices
    assert own.grpc_port == 0 and other.grpc_port not in (0, node.grpc_port)
    assert other.data_port not in (0, node.data_port)
    # Two CPU devices share the host's memory: each is given half of it.
    assert own.mem_total_bytes == other.mem_total_bytes == node.mem_total_bytes // 2
    assert 0 < own.mem_free_bytes <= node.mem_available_bytes // 2 + (64 << 20)
    # The worker is a server of the same node: its id and name, its one device.
    worker = info(worker_address(two_nodes))
    assert (worker.node_id, worker.name) == (node.node_id, node.name)
    assert [(d.index, d.runs_stages) for d in worker.devices] == [(1, True)]
    assert worker.data_port == other.data_port
    assert len(info(two_nodes.nodes[1].address).devices) == 1


def test_a_stage_sent_to_the_wrong_device_server_is_refused(
    two_nodes: LocalCluster, tiny_llama: Path
) -> None:
    a = two_nodes.nodes[0]

    async def load(address: str, device: str) -> grpc.aio.AioRpcError:
        request = pb.LoadStageRequest(plan_id="wrong-device", model_path=str(tiny_llama),
                                      start=0, end=8, stage_count=1, device=device)  # fmt: skip
        async with NodeClient(address) as c:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await c.load_stage(request)
        return e.value

    e = asyncio.run(load(a.address, "1"))
    port = worker_address(two_nodes).rsplit(":", 1)[1]
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"device 1 is served by its own process at 127.0.0.1:{port}" in (e.details() or "")
    e = asyncio.run(load(worker_address(two_nodes), "0"))
    assert "no device 0" in (e.details() or "")
    e = asyncio.run(load(a.address, "x"))
    assert "not a device label" in (e.details() or "")


def test_three_stages_on_two_nodes_equal_mlx_lm(two_nodes: LocalCluster, tiny_llama: Path) -> None:
    """A/0 -> A/1 -> B/0: the weights shipped to each device's own cache, the activations
    from A/0 straight to A/1's data port (inside the node), the tokens mlx_lm's."""
    model = read_model(tiny_llama)
    n = 24
    ref, _ = reference_generate(tiny_llama, PROMPT, n)
    a, b = two_nodes.nodes

    async def run() -> tuple[Any, list[int], list[str], Any]:
        p = await even_plan(model, list(two_nodes.nodes))
        pipeline = await open_pipeline(p, model, show_progress=False)
        try:
            result = await pipeline.generate(PROMPT, GenerationParams(max_tokens=n))
            async with NodeClient(a.address) as c:
                held = await c.get_info()  # the node lists its worker's stage too
            return p, list(result.tokens), list(pipeline.data_addresses), held
        finally:
            await pipeline.close()

    p, tokens, data_addresses, held = asyncio.run(run())
    mine = sorted((s.device, s.start, s.end) for s in held.stages if s.plan_id == p.plan_id)
    assert mine == [
        ("0", p.stages[0].start, p.stages[0].end),
        ("1", p.stages[1].start, p.stages[1].end),
    ]
    assert [(s.node_name, s.device) for s in p.stages] == [("mdA", "0"), ("mdA", "1"), ("mdB", "0")]
    assert p.stages[0].address == a.address and p.stages[2].address == b.address
    assert p.stages[1].address == worker_address(two_nodes)
    a_info = info(a.address)
    assert data_addresses[1] == f"127.0.0.1:{a_info.devices[1].data_port}"
    assert tokens == ref


def test_the_probe_measures_the_hop_inside_a_node_and_the_plan_uses_it(
    two_nodes: LocalCluster,
) -> None:
    result = asyncio.run(probe_cluster(list(two_nodes.nodes), dtypes=["float32"]))
    assert not result.errors, result.errors
    a = next(n for n in result.nodes if n.name == "mdA")
    assert [(d.index, d.usable) for d in a.devices] == [(0, True), (1, True)]
    assert a.devices[0].address == "" and a.devices[1].address == worker_address(two_nodes)
    hops = {(x.src, x.dst): x for x in result.device_links}
    assert set(hops) == {("0", "1"), ("1", "0")}
    assert all(x.node_name == "mdA" and x.latency_us > 0 for x in hops.values())
    schema = Path(__file__).resolve().parent.parent / "coordinator/schemas/probe.schema.json"
    jsonschema.validate(result.to_json(), json.loads(schema.read_text()))
    cluster = Cluster.from_probe_json(result.to_json())
    inside = cluster.link("mdA/0", "mdA/1")
    assert inside.kind == "host"
    assert inside.latency_s == pytest.approx(hops[("0", "1")].latency_us * 1e-6)


def test_coordinator_plan_json_shows_the_measured_intra_node_hop(
    two_nodes: LocalCluster, tiny_llama: Path, tmp_path: Path
) -> None:
    nodes = [a for n in two_nodes.nodes for a in ("--node", n.address)]
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.main", "plan", "--model", str(tiny_llama), "--json",
         "--cluster", "multidevice", *nodes],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    inside = {(x["src"], x["dst"]): x for x in out["intra_node_links"]}
    assert set(inside) == {("mdA/0", "mdA/1"), ("mdA/1", "mdA/0")}
    # Measured over a loopback socket: tens to hundreds of microseconds, not the 5 us assumed
    # for devices that share a process.
    assert all(x["kind"] == "host" and x["latency_ms"] > 0.005 for x in inside.values())


def test_the_planner_keeps_a_nodes_devices_together_when_its_hop_is_cheaper() -> None:
    """Two nodes of two devices, each device holding under a third of the model (5 of its 16 layers): four
    stages, in a ring (the last stage sends the token to the first). Measured inside the
    nodes a cheap hop, between them an expensive one: each node's devices are neighbours
    (two network hops around the ring). Measured inside the nodes a hop dearer than the
    network: the stages alternate between the nodes (four network hops, none inside)."""
    layers = 16
    model = ModelSpec(name="m", layers=layers, hidden=2048, heads=16, kv_heads=16, head_dim=128,
                      vocab=32000, intermediate=8192, layer_bytes=(100_000_000,) * layers,
                      embed_bytes=50_000_000, head_bytes=50_000_000)  # fmt: skip

    def probe(inside_us: float) -> dict[str, Any]:
        dev = {"kind": "cpu", "name": "cpu", "mem_free_bytes": int(0.6 * GIB), "stream_gbs": 20.0,
               "matmul_tflops": 0.5}  # fmt: skip
        net = {"latency_us": 2000.0, "bandwidth_gbs": 0.1}
        inside = {"latency_us": inside_us, "bandwidth_gbs": 5.0}
        return {
            "nodes": [
                {"id": n, "name": n.upper(), "devices": [{**dev, "index": 0}, {**dev, "index": 1}]}
                for n in ("a", "b")
            ],
            "links": [{"src": "a", "dst": "b", **net}, {"src": "b", "dst": "a", **net}],
            "device_links": [
                {"node": n, "src": s, "dst": d, **inside}
                for n in ("a", "b")
                for s, d in (("0", "1"), ("1", "0"))
            ],
        }

    def network_hops(inside_us: float) -> int:
        choice = plan(model, Cluster.from_probe_json(probe(inside_us)), Workload(context=512))
        assert choice.fits and len(choice.placements) == 4, choice.explanation
        nodes = [p.device.split("/")[0] for p in choice.placements]
        return sum(nodes[i] != nodes[i - 1] for i in range(len(nodes)))  # around the ring

    assert network_hops(30.0) == 2
    assert network_hops(20_000.0) == 4


def test_the_experiments_one_pc_rows_run_on_one_nodes_devices(
    two_nodes: LocalCluster, tiny_llama: Path, tmp_path: Path
) -> None:
    """`experiment split-penalty --pc-node A`: the 'one PC' rows put their stages on A's two
    devices (the hop between them inside the node), beside the other rows."""
    from coordinator.lab import bench, experiment

    a = two_nodes.nodes[0]
    refs = asyncio.run(experiment.resolve_nodes([a.address], devices=True))
    assert [(r.name, r.device, r.address) for r in refs] == [
        ("mdA", "0", a.address), ("mdA", "1", worker_address(two_nodes))
    ]  # fmt: skip
    settings = experiment.ExperimentSettings(
        model_dir=tiny_llama, out_dir=tmp_path, stages=2, repeats=1, gen_tokens=4,
        prompt_tokens=8, netns=False, pc_nodes=refs,
    )  # fmt: skip
    result = experiment.split_penalty(settings, (bench.SYSTEM_LAYERLINK,))
    pc = [r for r in result.rows if r.spec.deployment == experiment.DEPLOY_ONE_PC]
    assert [r.spec.stages for r in pc] == [1, 2] and all(r.ok for r in pc)
    assert pc[1].per_hop_ms is not None
    with pytest.raises(ValueError, match="--pc-node: 2 device"):
        experiment.split_penalty(replace(settings, stages=3), (bench.SYSTEM_LAYERLINK,))


def test_killing_a_node_drops_both_its_stages_and_the_supervisor_replans(
    two_nodes: LocalCluster, tiny_llama: Path
) -> None:
    """Runs last in this module: it kills node A. Its worker goes with it (the kernel's
    parent-death signal), the stream re-plans onto B and completes with mlx_lm's tokens."""
    model = read_model(tiny_llama)
    n = 64
    ref, _ = reference_generate(tiny_llama, PROMPT, n)
    a = two_nodes.nodes[0]
    worker = worker_address(two_nodes)

    async def planner(records: list[Any]) -> Any:
        return await even_plan(model, records)

    async def opener(p: Any) -> Any:
        return await open_pipeline(p, model, show_progress=False)

    async def run() -> tuple[list[int], Supervisor, int]:
        sup = Supervisor(list(two_nodes.nodes), planner, opener)
        await sup.start()
        stages_before = len(sup.pipeline.plan.stages)  # type: ignore[union-attr]
        tokens: list[int] = []
        try:
            params = GenerationParams(max_tokens=n, step_timeout_s=30)
            async for ev in sup.stream(PROMPT, params):
                tokens.append(ev.token)
                if len(tokens) == 10:
                    os.kill(two_nodes.procs[a.name].pid, signal.SIGKILL)
            return tokens, sup, stages_before
        finally:
            await sup.close()

    tokens, sup, stages_before = asyncio.run(run())
    assert stages_before == 3
    assert tokens == ref, "the resumed stream differs from an uninterrupted run"
    assert len(sup.recoveries) == 1 and sup.recoveries[0]["stages"] == 1

    def worker_gone() -> bool:
        host, port = worker.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except OSError:
            return True
        return False

    asyncio.run(wait_until(worker_gone, 30, "device 1's worker outlived its node"))


# ----- pure parts: the device count and what each process reports -------------------------------


def _gpu(index: int, free_gib: int) -> Any:
    from node.hardware import MEM_NVML, Device

    return Device(index, "RTX 2060 SUPER", "cuda", 8 * GIB, free_gib * GIB, mem_source=MEM_NVML,
                  uuid=f"GPU-{index}", runs_stages=index == 0)  # fmt: skip


def test_the_device_count_follows_what_mlx_drives() -> None:
    from node.devices import DeviceError, check_count
    from node.hardware import Device

    gpus = [_gpu(i, 7) for i in range(3)]
    cpu = [Device(0, "x86", "cpu", 16 * GIB, 8 * GIB, runs_stages=True)]
    assert check_count(0, gpus, "cuda") == 3  # default: every GPU
    assert check_count(2, gpus, "cuda") == 2
    assert check_count(0, cpu, "cpu") == 1 and check_count(3, cpu, "cpu") == 3
    with pytest.raises(DeviceError, match="MLX drives 3 CUDA GPU"):
        check_count(4, gpus, "cuda")
    with pytest.raises(DeviceError, match="one node per Mac"):
        check_count(2, [Device(0, "M4", "metal", 16 * GIB, 8 * GIB)], "metal")
    with pytest.raises(DeviceError, match=">= 1"):
        check_count(-1, cpu, "cpu")


def test_each_process_reports_the_devices_it_serves() -> None:
    from node.devices import DeviceServer, Serving, served_devices
    from node.hardware import Device

    gpus = (_gpu(0, 7), _gpu(1, 6), _gpu(2, 5))
    # The node's process on a 3-GPU PC with workers for GPUs 1 and 2: every GPU runs stages,
    # each with its own NVML memory.
    node = Serving(count=3, workers=(DeviceServer(1, 50153, 50154), DeviceServer(2, 50155, 50156)))
    assert [(d.index, d.runs_stages, d.mem_free_bytes) for d in served_devices(gpus, node)] == [
        (0, True, 7 * GIB), (1, True, 6 * GIB), (2, True, 5 * GIB)
    ]  # fmt: skip
    # --devices 1 on the same PC: GPUs 1 and 2 are listed, no stage runs on them.
    assert [d.runs_stages for d in served_devices(gpus, Serving())] == [True, False, False]
    # A worker sees its GPU alone (as MLX's device 0) and reports it under the node's label.
    (mine,) = served_devices((_gpu(0, 6),), Serving(own=2, count=3))
    assert (mine.index, mine.runs_stages, mine.uuid) == (2, True, "GPU-0")
    # CPU devices share the host's memory evenly.
    cpu = (Device(0, "x86", "cpu", 16 * GIB, 9 * GIB, runs_stages=True),)
    shared = served_devices(cpu, Serving(count=3))
    assert [(d.index, d.mem_total_bytes, d.mem_free_bytes) for d in shared] == [
        (i, 16 * GIB // 3, 3 * GIB) for i in range(3)
    ]


def test_a_node_refuses_a_device_count_it_cannot_serve() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "node.main", "up", "--host", "127.0.0.1", "--port", "0",
         "--no-advertise", "--devices", "-2"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--devices -2: expected a count >= 1" in done.stderr
