"""The CUDA and Metal branches of the hardware probe, the device bench and GetInfo, with fakes
of the driver calls (pynvml, MLX's device queries, macOS's vm_stat/sysctl): this machine has
neither GPU, so these are the only checks of those branches here. What is faked is the
driver's answer; everything LayerLink does with it (matching MLX's GPUs to NVML's, per-GPU
memory, the order of timing, copies and NVML reads, the Metal working-set cap, the memory
placement) is the real code. Real GPUs: `make device-check` (docs/hardware-runs.md)."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from coordinator import session
from coordinator.dashboard.state import NodeTarget, node_view
from node import devicebench, hardware, nvml
from node._proto.layerlink.v1 import node_pb2 as pb
from node.service import NodeConfig, NodeService
from tests.test_nvml import fake_pynvml, gpu

GIB = 1 << 30

VM_STAT = """Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               60000.
Pages active:                            700000.
Pages inactive:                          340000.
Pages speculative:                         5000.
Pages throttled:                              0.
Pages wired down:                        250000.
Pages purgeable:                           2000.
"Translation faults":                 123456789.
Pages copy-on-write:                    1234567.
"""
VM_STAT_AVAILABLE = (60000 + 340000) * 16384  # free + inactive pages


def mem(total: int, free: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(total=total, free=free, used=total - free)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """NVML sees two GPUs with different memory, the second in an x4 slot."""
    fake = fake_pynvml([
        gpu("NVIDIA GeForce RTX 3090", "GPU-aaaa", mem=mem(24 * GIB, 20 * GIB), gen=4, width=16,
            max_gen=4, max_width=16),
        gpu("NVIDIA GeForce RTX 2060 SUPER", "GPU-bbbb", mem=mem(8 * GIB, 7 * GIB), gen=1,
            width=4, max_gen=3, max_width=16),
    ])  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def fake_mlx_cuda(monkeypatch: pytest.MonkeyPatch, infos: list[dict[str, Any]]) -> None:
    """MLX's CUDA backend as its device queries answer (uuid without NVML's "GPU-" prefix)."""
    monkeypatch.setattr(hardware, "mlx_backend", lambda: "cuda")
    monkeypatch.setattr(mx, "device_count", lambda kind: len(infos))
    # MLX's Device has no index attribute in Python: a stand-in that has one.
    monkeypatch.setattr(mx, "Device", lambda kind, i=0: types.SimpleNamespace(type=kind, index=i))
    monkeypatch.setattr(mx, "device_info", lambda device=None: infos[device.index if device else 0])


CUDA_INFOS = [
    {"device_name": "NVIDIA GeForce RTX 3090", "uuid": "aaaa", "total_memory": 24 * GIB,
     "free_memory": 23 * GIB},
    {"device_name": "NVIDIA GeForce RTX 2060 SUPER", "uuid": "GPU-BBBB", "total_memory": 8 * GIB,
     "free_memory": 6 * GIB},
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# The MLX backend and host memory


def test_mlx_backend_follows_what_mlx_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = types.SimpleNamespace(is_available=lambda: False)
    monkeypatch.setattr(mx, "cuda", cuda, raising=False)
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert hardware.mlx_backend() == "metal"
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    assert hardware.mlx_backend() == "cpu"
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    assert hardware.mlx_backend() == "cuda"


def test_vm_stat_available_is_free_plus_inactive() -> None:
    assert hardware.parse_vm_stat(VM_STAT) == VM_STAT_AVAILABLE
    assert hardware.parse_vm_stat("garbage") is None
    assert hardware.parse_vm_stat("Mach ... (page size of 4096 bytes)\nPages active: 3.\n") is None


@pytest.fixture
def macos(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A Mac with 64 GiB: sysctl and vm_stat answer; there is no /proc/meminfo."""
    answers = {"sysctl": f"{64 * GIB}\n", "vm_stat": VM_STAT}
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(hardware, "_run", lambda argv: answers[argv[0]])
    monkeypatch.setattr(hardware, "_meminfo", lambda: pytest.fail("read /proc/meminfo on a Mac"))
    monkeypatch.setattr(hardware, "_darwin_total_bytes", 0)  # read once per process
    yield


@pytest.mark.usefixtures("macos")
def test_macos_reports_available_memory_not_all_of_it() -> None:
    total, avail = hardware.memory()
    assert total == 64 * GIB
    assert avail == VM_STAT_AVAILABLE < total


def test_macos_without_vm_stat_falls_back_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(hardware, "_run", lambda argv: "")
    monkeypatch.setattr(hardware, "_warned_fallback", False)
    monkeypatch.setattr(hardware, "_darwin_total_bytes", 0)
    total, avail = hardware.memory()
    assert total == avail > 0
    assert "reporting all of it as free" in caplog.text


# --------------------------------------------------------------------------------------------
# Hardware probe and GetInfo


def test_cuda_probe_takes_each_gpus_memory_from_nvml(
    monkeypatch: pytest.MonkeyPatch, two_gpus: types.ModuleType
) -> None:
    third = {"device_name": "GPU NVML cannot see", "uuid": "cccc", "total_memory": 16 * GIB,
             "free_memory": 15 * GIB}  # fmt: skip
    fake_mlx_cuda(monkeypatch, [*CUDA_INFOS, third])
    hw = hardware.probe()
    assert hw.backend == "cuda"
    a, b, c = hw.devices
    assert (a.name, a.mem_total_bytes, a.mem_free_bytes, a.mem_source) == (
        "NVIDIA GeForce RTX 3090", 24 * GIB, 20 * GIB, hardware.MEM_NVML,
    )  # fmt: skip
    assert (b.mem_total_bytes, b.mem_free_bytes, b.uuid) == (8 * GIB, 7 * GIB, "GPU-bbbb")
    assert (b.pcie_gen, b.pcie_width, b.pcie_max_gen, b.pcie_max_width) == (1, 4, 3, 16)
    assert (c.mem_free_bytes, c.mem_source) == (15 * GIB, hardware.MEM_MLX)
    assert [d.runs_stages for d in hw.devices] == [True, False, False]
    assert [d.index for d in hw.devices] == [0, 1, 2]


def test_cuda_probe_matches_by_pci_bus_id_when_uuids_differ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = fake_pynvml([gpu("A", "GPU-1111", mem=mem(12 * GIB, 11 * GIB))])
    fake.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=b"00000000:65:00.0")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    fake_mlx_cuda(monkeypatch, [{"device_name": "A", "uuid": "other-format", "pci_bus_id":
                                 "0000:65:00.0", "total_memory": 12 * GIB, "free_memory": 1}])  # fmt: skip
    (d,) = hardware.probe().devices
    assert (d.mem_free_bytes, d.mem_source) == (11 * GIB, hardware.MEM_NVML)


def test_cuda_backend_without_nvml_still_lists_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    fake_mlx_cuda(monkeypatch, CUDA_INFOS)
    devices = hardware.probe().devices
    assert [d.kind for d in devices] == ["cuda", "cuda"]  # not a "cpu" device on a GPU node
    assert [d.mem_free_bytes for d in devices] == [23 * GIB, 6 * GIB]
    assert {d.mem_source for d in devices} == {hardware.MEM_MLX}


@pytest.mark.usefixtures("macos")
def test_metal_probe_caps_memory_at_the_working_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "mlx_backend", lambda: "metal")
    info = {"architecture": "applegpu_g15s", "memory_size": 64 * GIB,
            "max_recommended_working_set_size": 48 * GIB}  # fmt: skip
    monkeypatch.setattr(mx, "device_info", lambda device=None: info)
    monkeypatch.setattr(mx, "get_active_memory", lambda: 45 * GIB)
    (d,) = hardware.probe().devices
    assert d.kind == "metal" and d.runs_stages and d.mem_source == hardware.MEM_METAL
    assert d.mem_total_bytes == 48 * GIB
    assert d.mem_free_bytes == 3 * GIB  # the working set's rest, below the OS's 6.1 GiB
    monkeypatch.setattr(mx, "get_active_memory", lambda: 1 * GIB)
    (d,) = hardware.live_devices([d])
    assert d.mem_free_bytes == VM_STAT_AVAILABLE  # now the OS's available memory is the cap


def _get_info(tmp_path: Path, hw: hardware.Hardware) -> pb.NodeInfo:
    svc = NodeService(NodeConfig("id", "n", "127.0.0.1", 0, "c", cache_dir=tmp_path), hw)

    async def call() -> pb.NodeInfo:
        try:
            return await svc.GetInfo(pb.GetInfoRequest(), None)  # type: ignore[arg-type]
        finally:
            await svc.close()

    return asyncio.run(call())


def test_get_info_reads_each_gpus_memory_again(
    monkeypatch: pytest.MonkeyPatch, two_gpus: types.ModuleType, tmp_path: Path
) -> None:
    fake_mlx_cuda(monkeypatch, CUDA_INFOS)
    hw = hardware.probe()
    two_gpus.nvmlDeviceGetMemoryInfo = lambda h: [mem(24 * GIB, 4 * GIB), mem(8 * GIB, 8 * GIB)][h]  # type: ignore[attr-defined]
    info = _get_info(tmp_path, hw)
    a, b = info.devices
    assert (a.mem_total_bytes, a.mem_free_bytes, a.mem_source, a.runs_stages) == (
        24 * GIB, 4 * GIB, "nvml", True,
    )  # fmt: skip
    assert (b.mem_total_bytes, b.mem_free_bytes, b.runs_stages) == (8 * GIB, 8 * GIB, False)
    assert (b.pcie.gen, b.pcie.width) == (1, 4)
    # The dashboard shows the same per-device figures.
    view = node_view(NodeTarget("n", "127.0.0.1:1"), info, 0.001)
    assert [d.to_json() for d in view.devices][0] == {
        "index": 0, "name": "NVIDIA GeForce RTX 3090", "kind": "cuda",
        "mem_total_bytes": 24 * GIB, "mem_free_bytes": 4 * GIB, "mem_used_bytes": 20 * GIB,
        "mem_source": "nvml", "runs_stages": True,
    }  # fmt: skip


def test_get_info_on_this_machine_names_its_stage_device(tmp_path: Path) -> None:
    info = _get_info(tmp_path, hardware.probe())
    assert info.backend == hardware.mlx_backend()
    assert sum(d.runs_stages for d in info.devices) == 1
    assert info.devices[0].runs_stages
    assert all(0 < d.mem_free_bytes <= d.mem_total_bytes for d in info.devices)
    assert all(d.mem_source for d in info.devices)


# --------------------------------------------------------------------------------------------
# Device bench


@contextlib.contextmanager
def _no_stream(device: Any) -> Iterator[None]:
    yield


def test_cuda_bench_reads_nvml_for_each_gpu_right_after_its_copies(
    monkeypatch: pytest.MonkeyPatch, two_gpus: types.ModuleType
) -> None:
    fake_mlx_cuda(monkeypatch, CUDA_INFOS)
    calls: list[str] = []

    def timed(dtypes: list[str], buffer_bytes: int, msg: pb.DeviceMeasurement) -> list[str]:
        calls.append(f"time {msg.index}")
        msg.stream_gbs, msg.matmul_tflops = 900.0, 70.0
        return []

    def copies(device: mx.Device, sizes: Any = None) -> devicebench.CopyRates:
        calls.append(f"copy {device.index}")
        return devicebench.CopyRates(25.0 - device.index, 26.0, 10.0, 12.0)

    real_read_gpu = nvml.read_gpu

    def read_gpu(uuid: str, bus: str = "") -> tuple[nvml.GpuInfo | None, str]:
        calls.append(f"nvml {uuid}")
        return real_read_gpu(uuid, bus)

    monkeypatch.setattr(devicebench, "_on", _no_stream)
    monkeypatch.setattr(devicebench, "_timed_device", timed)
    monkeypatch.setattr(devicebench, "copy_rates", copies)
    monkeypatch.setattr(nvml, "read_gpu", read_gpu)
    reply = devicebench.measure_devices(pb.MeasureDevicesRequest(dtypes=["float16"]))
    assert calls == ["time 0", "copy 0", "nvml aaaa", "time 1", "copy 1", "nvml GPU-BBBB"]
    a, b = reply.devices
    assert (a.mem_total_bytes, a.mem_free_bytes, a.mem_source) == (24 * GIB, 20 * GIB, "nvml")
    assert (b.mem_total_bytes, b.mem_free_bytes) == (8 * GIB, 7 * GIB)
    assert (a.pcie.h2d_gbs, b.pcie.h2d_gbs) == (25.0, 24.0)
    assert (b.pcie.link.gen, b.pcie.link.width, b.pcie.link.max_gen) == (1, 4, 3)
    assert "below its maximum" in b.note and "below its maximum" not in a.note
    assert reply.nvml_status == "2 NVIDIA GPU(s) read by NVML, 2 visible to MLX"


def test_cuda_bench_without_nvml_keeps_mlx_figures_and_copies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    fake_mlx_cuda(monkeypatch, CUDA_INFOS[:1])
    monkeypatch.setattr(devicebench, "_on", _no_stream)
    monkeypatch.setattr(devicebench, "_timed_device", lambda d, n, msg: [])
    monkeypatch.setattr(devicebench, "copy_rates",
                        lambda device: devicebench.CopyRates(20.0, 21.0, 9.0, 9.5))  # fmt: skip
    (d,) = devicebench.measure_devices(pb.MeasureDevicesRequest(dtypes=["float16"])).devices
    assert (d.mem_free_bytes, d.mem_source) == (23 * GIB, "mlx")
    assert d.pcie.h2d_gbs == 20.0 and d.pcie.link.gen == 0
    assert "not matched to an NVML GPU" in d.note and "nvidia-ml-py" in d.note


@pytest.mark.usefixtures("macos")
def test_metal_bench_reports_the_working_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "mlx_backend", lambda: "metal")
    info = {"architecture": "applegpu_g13s", "memory_size": 32 * GIB,
            "max_recommended_working_set_size": 22 * GIB}  # fmt: skip
    monkeypatch.setattr(mx, "device_info", lambda device=None: info)
    monkeypatch.setattr(mx, "get_active_memory", lambda: 0)
    monkeypatch.setattr(devicebench, "_on", _no_stream)
    seen: dict[str, int] = {}

    def timed(dtypes: list[str], buffer_bytes: int, msg: pb.DeviceMeasurement) -> list[str]:
        seen["buffer"] = buffer_bytes
        msg.stream_gbs, msg.matmul_tflops = 100.0, 4.0
        return []

    monkeypatch.setattr(devicebench, "_timed_device", timed)
    monkeypatch.setattr(devicebench, "host_copy_gbs", lambda n: 50.0)
    reply = devicebench.measure_devices(pb.MeasureDevicesRequest(dtypes=["float16"]))
    (d,) = reply.devices
    assert d.kind == "metal" and d.unified_memory and d.name == "Apple applegpu_g13s"
    assert d.mem_total_bytes == 22 * GIB
    assert d.mem_free_bytes == VM_STAT_AVAILABLE  # the OS has less than the working set
    assert d.mem_source == "metal-working-set"
    assert seen["buffer"] == devicebench.DEFAULT_BUFFER_BYTES
    assert reply.nvml_status == "no NVIDIA GPU (Apple Silicon)"


# --------------------------------------------------------------------------------------------
# Memory placement


def _node_info(*devices: tuple[int, bool]) -> pb.NodeInfo:
    return pb.NodeInfo(devices=[
        pb.DeviceInfo(index=i, kind="cuda", mem_total_bytes=free, mem_free_bytes=free,
                      runs_stages=runs)
        for i, (free, runs) in enumerate(devices)
    ])  # fmt: skip


def test_stage_devices_are_the_devices_that_run_stages_each_with_its_memory() -> None:
    from node.mdns import NodeRecord

    rec = NodeRecord("a" * 32, "pc", "10.0.0.5", 50151, 1, "cuda", 3, 1, "c")

    def targets(info: pb.NodeInfo) -> list[tuple[str, str, int]]:
        return [(t.device, t.address, t.mem_free_bytes) for t in session.stage_devices(rec, info)]

    # One GPU runs stages, another is only listed: one target with that GPU's memory.
    assert targets(_node_info((8 * GIB, True), (24 * GIB, False))) == [
        ("0", "10.0.0.5:50151", 8 * GIB)
    ]
    # A node from before runs_stages: its first device.
    assert targets(_node_info((6 * GIB, False), (24 * GIB, False))) == [
        ("0", "10.0.0.5:50151", 6 * GIB)
    ]
    assert targets(pb.NodeInfo()) == []
    # --devices 2: device 1 is served by a worker on its own port of the same host.
    two = _node_info((8 * GIB, True), (6 * GIB, True))
    two.devices[1].grpc_port = 50153
    assert targets(two) == [("0", "10.0.0.5:50151", 8 * GIB), ("1", "10.0.0.5:50153", 6 * GIB)]


def test_memory_placement_splits_by_each_nodes_stage_device(
    monkeypatch: pytest.MonkeyPatch, tiny_llama: Path
) -> None:
    from node.mdns import NodeRecord

    recs = [NodeRecord(c * 32, name, "127.0.0.1", 1 + i, 1, "cuda", 2, 1, "c")
            for i, (c, name) in enumerate([("a", "pc-two-gpus"), ("b", "pc-one-gpu")])]  # fmt: skip
    infos = {recs[0].node_id: _node_info((8 * GIB, True), (24 * GIB, False)),
             recs[1].node_id: _node_info((8 * GIB, True))}  # fmt: skip

    async def fake_infos(records: list[NodeRecord]) -> dict[str, pb.NodeInfo]:
        return {r.node_id: infos[r.node_id] for r in records}

    monkeypatch.setattr(session, "node_infos", fake_infos)
    model = session.read_model(tiny_llama)
    plan = asyncio.run(session.memory_plan(model, recs))
    a, b = (s.end - s.start for s in plan.stages)
    assert abs(a - b) <= 1  # equal stage devices: an even split (the sum would give 4:1)
