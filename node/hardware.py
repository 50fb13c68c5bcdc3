"""What this machine is: OS, CPU, memory, MLX backend and NVIDIA GPUs (via NVML).

Memory is per device and comes from whoever knows it:
- CUDA GPUs: the driver, through NVML, per GPU (total and free on that GPU); MLX's own
  figure only where NVML cannot be read.
- Metal (Apple Silicon): the GPU shares the host's memory, but MLX keeps a Metal stage within
  the GPU's recommended working set (`max_recommended_working_set_size`). The device's total
  is that limit, its free memory the smaller of what the OS has available and what is left of
  the limit after MLX's live arrays.
- CPU: the host's memory as the OS reports it: /proc/meminfo's MemAvailable on Linux; on
  macOS `vm_stat`'s free + inactive pages (the figure psutil calls available; macOS fills
  idle RAM with cache, so "free" alone understates it) and `sysctl hw.memsize`.

A node's stages run on MLX's default device: the first device listed (`runs_stages`).

Probing happens when a node starts, never at import; `live_devices` re-reads the memory
figures (GetInfo does, on every call)."""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

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
    uuid: str = ""
    pci_bus_id: str = ""
    # Where the memory figures come from: MEM_NVML, MEM_MLX, MEM_METAL or MEM_OS.
    mem_source: str = ""
    # MLX's default device: the one this node's stages run on.
    runs_stages: bool = False


MEM_NVML = "nvml"  # the NVIDIA driver, per GPU
MEM_MLX = "mlx"  # MLX's device_info (a CUDA GPU NVML cannot read)
MEM_METAL = "metal-working-set"  # min(OS available, MLX's working-set limit - live arrays)
MEM_OS = "os"  # host memory as the OS reports it


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


def _meminfo() -> tuple[int, int] | None:
    try:
        fields: dict[str, int] = {}
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                fields[k] = int(v.split()[0]) * 1024
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"])
    except (OSError, KeyError, ValueError):
        return None


def _run(argv: Sequence[str]) -> str:
    """A short system command's output ("" when it fails)."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("%s failed: %s", argv[0], e)
        return ""
    return done.stdout if done.returncode == 0 else ""


_VM_PAGE = re.compile(r"page size of (\d+) bytes")
_VM_LINE = re.compile(r"^(Pages [\w ]+?):\s+(\d+)\.?\s*$", re.MULTILINE)


def parse_vm_stat(text: str) -> int | None:
    """Available bytes from macOS `vm_stat` output: free + inactive pages (None if unreadable)."""
    page = _VM_PAGE.search(text)
    pages = {k: int(v) for k, v in _VM_LINE.findall(text)}
    if page is None or "Pages free" not in pages:
        return None
    return (pages["Pages free"] + pages.get("Pages inactive", 0)) * int(page.group(1))


_darwin_total_bytes = 0  # sysctl's answer, once it gave one: it does not change


def _darwin_total() -> int | None:
    global _darwin_total_bytes
    if not _darwin_total_bytes:
        try:
            _darwin_total_bytes = int(_run(["sysctl", "-n", "hw.memsize"]).strip())
        except ValueError:
            return None
    return _darwin_total_bytes


def _darwin_memory() -> tuple[int, int] | None:
    total = _darwin_total()
    if total is None:
        return None
    avail = parse_vm_stat(_run(["vm_stat"]))
    if avail is None:
        return None
    return total, min(avail, total)


_warned_fallback = False


def memory() -> tuple[int, int]:
    """(total, available) host memory in bytes, as the OS reports it."""
    global _warned_fallback
    found = _darwin_memory() if platform.system() == "Darwin" else _meminfo()
    if found is not None:
        return found
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if not _warned_fallback:
        _warned_fallback = True
        log.warning("cannot read available memory on %s: reporting all of it as free",
                    platform.system())  # fmt: skip
    return pages, pages


def metal_memory(
    host_available: int, info: dict[str, Any] | None = None, active: int | None = None
) -> tuple[int, int]:
    """(total, free) of the Metal GPU: MLX's recommended working set, and what is left of it
    after MLX's live arrays, never more than the OS has available."""
    if info is None or active is None:
        import mlx.core as mx

        info = dict(mx.device_info()) if info is None else info
        active = int(mx.get_active_memory()) if active is None else active
    limit = int(info.get("max_recommended_working_set_size") or info.get("memory_size") or 0)
    if limit <= 0:
        limit = host_available
    return limit, max(0, min(host_available, limit - active))


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


def _cuda_devices(gpus: Sequence[Any]) -> list[Device]:
    """The GPUs MLX's CUDA backend drives, in its order, with NVML's figures where NVML lists
    the same GPU (by UUID, else PCI bus id) and MLX's own where it does not."""
    import mlx.core as mx

    from node import nvml

    by_uuid = {nvml.uuid_key(g.uuid): g for g in gpus}
    by_bus = {nvml.bus_key(g.pci_bus_id): g for g in gpus if g.pci_bus_id}
    devices = []
    for i in range(int(mx.device_count(mx.gpu))):
        info = dict(mx.device_info(mx.Device(mx.gpu, i)))
        uuid, bus = str(info.get("uuid", "")), str(info.get("pci_bus_id", ""))
        g = by_uuid.get(nvml.uuid_key(uuid)) if uuid else None
        g = g or (by_bus.get(nvml.bus_key(bus)) if bus else None)
        if g is not None:
            devices.append(Device(i, g.name, "cuda", g.mem_total_bytes, g.mem_free_bytes,
                                  g.pcie_gen, g.pcie_width, g.pcie_max_gen, g.pcie_max_width,
                                  uuid=g.uuid, pci_bus_id=g.pci_bus_id, mem_source=MEM_NVML,
                                  runs_stages=i == 0))  # fmt: skip
        else:
            total = int(info.get("total_memory", info.get("memory_size", 0)))
            devices.append(Device(i, str(info.get("device_name", f"CUDA GPU {i}")), "cuda",
                                  total, int(info.get("free_memory", 0)), uuid=uuid,
                                  pci_bus_id=bus, mem_source=MEM_MLX,
                                  runs_stages=i == 0))  # fmt: skip
    return devices


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
    if backend == "cuda":
        devices = _cuda_devices(gpus)
    elif backend == "metal":
        m_total, m_free = metal_memory(avail)
        devices.append(Device(0, f"Apple {_cpu_name()}", "metal", m_total, m_free,
                              mem_source=MEM_METAL, runs_stages=True))  # fmt: skip
    if not devices:
        devices.append(Device(0, _cpu_name(), "cpu", total, avail, mem_source=MEM_OS,
                              runs_stages=True))  # fmt: skip
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


def live_devices(
    devices: Sequence[Device], host: tuple[int, int] | None = None
) -> tuple[Device, ...]:
    """The same devices with their memory read again: NVML per CUDA GPU (one NVML session
    for all of them), the Metal working set, the host's memory (`host`, else read now) for a
    CPU device. A figure that cannot be read again keeps its last value. NVML and macOS's
    vm_stat take milliseconds: call this off the event loop."""
    out: list[Device] = []
    gpus_by_uuid: dict[str, Any] | None = None
    for d in devices:
        if d.kind == "cuda" and d.mem_source == MEM_NVML:
            from node import nvml

            if gpus_by_uuid is None:
                gpus_by_uuid = {nvml.uuid_key(g.uuid): g for g in nvml.read_gpus()[0]}
            g = gpus_by_uuid.get(nvml.uuid_key(d.uuid))
            if g is not None:
                d = replace(d, mem_total_bytes=g.mem_total_bytes, mem_free_bytes=g.mem_free_bytes)
        elif d.kind in ("metal", "cpu"):
            host = host or memory()
            if d.kind == "metal":
                m_total, m_free = metal_memory(host[1])
                d = replace(d, mem_total_bytes=m_total, mem_free_bytes=m_free)
            else:
                d = replace(d, mem_total_bytes=host[0], mem_free_bytes=host[1])
        out.append(d)
    return tuple(out)
