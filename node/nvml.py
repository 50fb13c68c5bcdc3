"""NVIDIA GPUs as NVML sees them: name, UUID, memory and PCIe link (via `pynvml`).

NVML is optional: a machine without the NVIDIA driver, or without `nvidia-ml-py`, gets an
empty list and a sentence saying why; nothing here raises on a missing library. Each GPU
is read independently, so one GPU that NVML cannot query (lost, or a MIG quirk) costs that
GPU's PCIe figures, not the whole list.

PCIe figures: NVML reports the link's *current* generation and width, which a GPU lowers
when idle to save power, and the *maximum* the GPU and its slot can train to. Read them
while the GPU is busy (node/devicebench.py does, right after its copies) for the figure a
stage will see.
"""

from __future__ import annotations

import logging
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
    )


def read_gpus() -> tuple[list[GpuInfo], str]:
    """Every NVIDIA GPU NVML lists, and a note: why the list is empty, or what went wrong.

    Never raises for a missing driver or library."""
    nv, why = _load()
    if nv is None:
        return [], why
    try:
        nv.nvmlInit()
    except nv.NVMLError as e:
        return [], f"NVML not available: {_text(e)} (no NVIDIA driver on this machine?)"
    except OSError as e:  # a broken driver install can surface as a loader error
        return [], f"NVML not available: {e}"
    try:
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
    finally:
        try:
            nv.nvmlShutdown()
        except nv.NVMLError as e:
            log.debug("nvmlShutdown failed: %s", e)
