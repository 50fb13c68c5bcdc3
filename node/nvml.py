"""NVIDIA GPUs as NVML sees them: name, UUID, memory and PCIe link (via `pynvml`).

NVML is optional: a machine without the NVIDIA driver, or without `nvidia-ml-py`, gets an
empty list and a sentence saying why; nothing here raises on a missing library. Each GPU
is read independently, so one GPU that NVML cannot query (lost, or a MIG quirk) costs that
GPU's PCIe figures, not the whole list.

PCIe figures: NVML reports the link's *current* generation and width, which a GPU lowers
when idle to save power, and the *maximum* the GPU and its slot can train to. Read them
while the GPU is busy (node/devicebench.py does, right after its copies) for the figure a
stage will see. `read_gpu` reads one GPU, found by UUID (or PCI bus id), for exactly that:
the bench calls it right after that GPU's own copies, not after every GPU is timed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# Per-lane data rate in GB/s per direction after line encoding (8b/10b for gen 1-2,
# 128b/130b for gen 3-5, FLIT mode for gen 6); packet (TLP/DLLP) overheads not deducted.
_LANE_GBS = {
    1: 2.5 * 8 / 10 / 8,
    2: 5.0 * 8 / 10 / 8,
    3: 8.0 * 128 / 130 / 8,
    4: 16.0 * 128 / 130 / 8,
    5: 32.0 * 128 / 130 / 8,
    6: 64.0 * 242 / 256 / 8,
}


def pcie_theoretical_gbs(gen: int, width: int) -> float:
    """GB/s per direction that a PCIe link of this generation and width carries; 0 if unknown."""
    return _LANE_GBS.get(gen, 0.0) * max(width, 0)


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU. PCIe fields are 0 when NVML could not read them."""

    index: int
    name: str
    uuid: str
    mem_total_bytes: int
    mem_free_bytes: int
    pcie_gen: int = 0
    pcie_width: int = 0
    pcie_max_gen: int = 0
    pcie_max_width: int = 0
    pci_bus_id: str = ""

    @property
    def pcie_theoretical_gbs(self) -> float:
        return pcie_theoretical_gbs(self.pcie_gen, self.pcie_width)


def _load() -> tuple[ModuleType | None, str]:
    try:
        import pynvml
    except ImportError as e:
        return None, f"NVML not available: the nvidia-ml-py package is not installed ({e})"
    return pynvml, ""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _optional_int(nv: ModuleType, fn_name: str, handle: Any) -> int:
    fn = getattr(nv, fn_name, None)
    if fn is None:
        return 0
    try:
        return int(fn(handle))
    except nv.NVMLError as e:
        log.debug("NVML %s failed: %s", fn_name, e)
        return 0


def uuid_key(uuid: str) -> str:
    """A GPU UUID as NVML ("GPU-8d3f...") and CUDA/MLX (with or without the prefix) write it."""
    u = uuid.strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def bus_key(bus_id: str) -> str:
    """A PCI bus id as NVML ("00000000:65:00.0") and CUDA ("0000:65:00.0") write it."""
    b = bus_id.strip().lower()
    if b.count(":") == 2:
        domain, rest = b.split(":", 1)
        return f"{int(domain, 16) if domain else 0:x}:{rest}"
    return b


def _bus_id(nv: ModuleType, handle: Any) -> str:
    fn = getattr(nv, "nvmlDeviceGetPciInfo", None)
    if fn is None:
        return ""
    try:
        return _text(getattr(fn(handle), "busId", ""))
    except nv.NVMLError as e:
        log.debug("NVML nvmlDeviceGetPciInfo failed: %s", e)
        return ""


def _read_one(nv: ModuleType, index: int) -> GpuInfo:
    handle = nv.nvmlDeviceGetHandleByIndex(index)
    mem = nv.nvmlDeviceGetMemoryInfo(handle)
    return GpuInfo(
        index=index,
        name=_text(nv.nvmlDeviceGetName(handle)),
        uuid=_text(nv.nvmlDeviceGetUUID(handle)),
        mem_total_bytes=int(mem.total),
        mem_free_bytes=int(mem.free),
        pcie_gen=_optional_int(nv, "nvmlDeviceGetCurrPcieLinkGeneration", handle),
        pcie_width=_optional_int(nv, "nvmlDeviceGetCurrPcieLinkWidth", handle),
        pcie_max_gen=_optional_int(nv, "nvmlDeviceGetMaxPcieLinkGeneration", handle),
        pcie_max_width=_optional_int(nv, "nvmlDeviceGetMaxPcieLinkWidth", handle),
        pci_bus_id=_bus_id(nv, handle),
    )


@contextmanager
def _session() -> Iterator[tuple[ModuleType | None, str]]:
    """NVML initialised for the block (module, ""), or (None, why not); shut down after."""
    nv, why = _load()
    if nv is None:
        yield None, why
        return
    failed = ""
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        failed = f"NVML not available: {_text(e)} (no NVIDIA driver on this machine?)"
    except OSError as e:  # a broken driver install can surface as a loader error
        failed = f"NVML not available: {e}"
    if failed:
        yield None, failed
        return
    try:
        yield nv, ""
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError as e:
            log.debug("nvmlShutdown failed: %s", e)


def read_gpus() -> tuple[list[GpuInfo], str]:
    """Every NVIDIA GPU NVML lists, and a note: why the list is empty, or what went wrong.

    Never raises for a missing driver or library."""
    with _session() as (nv, why):
        if nv is None:
            return [], why
        try:
            count = int(nv.nvmlDeviceGetCount())
        except nv.NVMLError as e:
            return [], f"NVML cannot count GPUs: {_text(e)}"
        gpus: list[GpuInfo] = []
        problems: list[str] = []
        for i in range(count):
            try:
                gpus.append(_read_one(nv, i))
            except nv.NVMLError as e:
                problems.append(f"GPU {i}: {_text(e)}")
        if count == 0:
            return [], "NVML found no NVIDIA GPU"
        note = "; ".join(problems)
        return gpus, (f"NVML could not read {note}" if note else "")


def read_gpu(uuid: str, pci_bus_id: str = "") -> tuple[GpuInfo | None, str]:
    """The one GPU with this UUID (or, failing that, this PCI bus id), read now; else None and
    why. For a figure taken right after that GPU was busy (its PCIe link is then trained up)."""
    want_uuid, want_bus = uuid_key(uuid), bus_key(pci_bus_id)
    if not want_uuid and not want_bus:
        return None, "no UUID or PCI bus id to find the GPU by"
    with _session() as (nv, why):
        if nv is None:
            return None, why
        try:
            count = int(nv.nvmlDeviceGetCount())
        except nv.NVMLError as e:
            return None, f"NVML cannot count GPUs: {_text(e)}"
        for i in range(count):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                same_uuid = (
                    bool(want_uuid) and uuid_key(_text(nv.nvmlDeviceGetUUID(handle))) == want_uuid
                )
                same_bus = bool(want_bus) and bus_key(_bus_id(nv, handle)) == want_bus
                if same_uuid or same_bus:
                    return _read_one(nv, i), ""
            except nv.NVMLError as e:
                log.debug("NVML GPU %d: %s", i, e)
        return None, f"NVML lists no GPU with UUID {uuid or '?'} / bus {pci_bus_id or '?'}"
