"""What this machine is: OS, CPU, memory, MLX backend and NVIDIA GPUs (via NVML).

Probing happens when a node starts, never at import."""

from __future__ import annotations

import logging
import os
import platform
import socket
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    kind: str  # "metal" | "cuda" | "cpu"
    mem_total_bytes: int
    mem_free_bytes: int
    pcie_gen: int = 0
    pcie_width: int = 0
    pcie_max_gen: int = 0
    pcie_max_width: int = 0


@dataclass(frozen=True)
class Hardware:
    os: str
    cpu: str
    hostname: str
    mem_total_bytes: int
    mem_available_bytes: int
    backend: str
    devices: tuple[Device, ...]
    nvml_status: str


def _meminfo() -> tuple[int, int]:
    try:
        fields: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                fields[k] = int(v.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"])
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


def memory() -> tuple[int, int]:
    """(total, available) host memory in bytes."""
    return _meminfo()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mlx_backend() -> str:
    import mlx.core as mx

    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return "cpu"


def probe() -> Hardware:
    total, avail = memory()
    backend = mlx_backend()
    devices: list[Device] = []
    nvml_status = ""
    try:
        from node import nvml

        gpus, nvml_status = nvml.read_gpus()
    except ImportError:
        gpus, nvml_status = [], "NVML support not installed"
    if backend == "cuda" and gpus:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        chosen = gpus
        if visible:
            wanted = {v.strip() for v in visible.split(",")}
            chosen = [g for g in gpus if str(g.index) in wanted or g.uuid in wanted] or gpus
        for i, g in enumerate(chosen):
            devices.append(
                Device(
                    i,
                    g.name,
                    "cuda",
                    g.mem_total_bytes,
                    g.mem_free_bytes,
                    g.pcie_gen,
                    g.pcie_width,
                    g.pcie_max_gen,
                    g.pcie_max_width,
                )
            )
    elif backend == "metal":
        devices.append(Device(0, f"Apple {_cpu_name()}", "metal", total, avail))
    else:
        devices.append(Device(0, _cpu_name(), "cpu", total, avail))
    return Hardware(
        os=f"{platform.system()} {platform.release()}",
        cpu=_cpu_name(),
        hostname=socket.gethostname(),
        mem_total_bytes=total,
        mem_available_bytes=avail,
        backend=backend,
        devices=tuple(devices),
        nvml_status=nvml_status,
    )
