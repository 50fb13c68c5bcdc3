"""NVML reading: the plain "not available" path here, and the parsing path through a fake
pynvml module (real GPUs are checked on an accelerator machine)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from node import nvml


class FakeNVMLError(Exception):
    pass


def fake_pynvml(gpus: list[dict[str, Any]], init_error: str = "") -> types.ModuleType:
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    state = {"shutdown": 0}

    def init() -> None:
        if init_error:
            raise FakeNVMLError(init_error)

    def field(name: str) -> Any:
        def get(handle: int) -> Any:
            value = gpus[handle].get(name)
            if isinstance(value, Exception):
                raise value
            return value

        return get

    m.nvmlInit = init  # type: ignore[attr-defined]
    m.nvmlShutdown = lambda: state.__setitem__("shutdown", state["shutdown"] + 1)  # type: ignore[attr-defined]
    m.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    m.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    m.nvmlDeviceGetName = field("name")  # type: ignore[attr-defined]
    m.nvmlDeviceGetUUID = field("uuid")  # type: ignore[attr-defined]
    m.nvmlDeviceGetMemoryInfo = field("mem")  # type: ignore[attr-defined]
    m.nvmlDeviceGetCurrPcieLinkGeneration = field("gen")  # type: ignore[attr-defined]
    m.nvmlDeviceGetCurrPcieLinkWidth = field("width")  # type: ignore[attr-defined]
    m.nvmlDeviceGetMaxPcieLinkGeneration = field("max_gen")  # type: ignore[attr-defined]
    m.nvmlDeviceGetMaxPcieLinkWidth = field("max_width")  # type: ignore[attr-defined]
    m.state = state  # type: ignore[attr-defined]
    return m


def gpu(name: str, uuid: str, **kw: Any) -> dict[str, Any]:
    mem = types.SimpleNamespace(total=8 << 30, free=6 << 30, used=2 << 30)
    return {"name": name, "uuid": uuid, "mem": mem, "gen": 3, "width": 16, "max_gen": 3,
            "max_width": 16, **kw}  # fmt: skip


def test_no_driver_here_is_an_empty_list_with_a_reason() -> None:
    # This machine has no NVIDIA driver (CI neither): the real module path must not raise.
    gpus, why = nvml.read_gpus()
    if gpus:
        pytest.skip("this machine has NVIDIA GPUs")
    assert why.startswith("NVML not available")


def test_missing_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    gpus, why = nvml.read_gpus()
    assert gpus == []
    assert "nvidia-ml-py" in why


def test_init_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([], init_error="Driver Not Loaded"))
    gpus, why = nvml.read_gpus()
    assert gpus == [] and "Driver Not Loaded" in why


def test_gpus_are_read_with_their_pcie_link(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_pynvml([
        gpu(b"NVIDIA GeForce RTX 2060 SUPER", "GPU-aaa", gen=1, width=16),  # idle downclock
        gpu("NVIDIA GeForce RTX 3090", "GPU-bbb", gen=4, width=4, max_gen=4, max_width=16),
    ])  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus, why = nvml.read_gpus()
    assert why == ""
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 2060 SUPER", "NVIDIA GeForce RTX 3090"]
    a, b = gpus
    assert (a.index, a.uuid, a.mem_total_bytes, a.mem_free_bytes) == (
        0,
        "GPU-aaa",
        8 << 30,
        6 << 30,
    )
    assert (a.pcie_gen, a.pcie_width, a.pcie_max_gen, a.pcie_max_width) == (1, 16, 3, 16)
    assert (b.pcie_gen, b.pcie_width, b.pcie_max_gen, b.pcie_max_width) == (4, 4, 4, 16)
    assert b.pcie_theoretical_gbs == pytest.approx(4 * 16 * 128 / 130 / 8)
    assert fake.state["shutdown"] == 1  # type: ignore[attr-defined]


def test_one_unreadable_field_or_gpu_costs_only_that(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fake_pynvml([
        gpu("A", "GPU-a", gen=FakeNVMLError("Not Supported")),
        gpu("B", "GPU-b", mem=FakeNVMLError("GPU is lost")),
    ])  # fmt: skip
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    gpus, why = nvml.read_gpus()
    assert [g.name for g in gpus] == ["A"]
    assert gpus[0].pcie_gen == 0 and gpus[0].pcie_width == 16
    assert "GPU 1" in why and "GPU is lost" in why


@pytest.mark.parametrize(
    ("gen", "width", "gbs"),
    [(1, 16, 4.0), (2, 8, 4.0), (3, 16, 15.754), (4, 16, 31.508), (5, 16, 63.015), (3, 1, 0.985),
     (0, 16, 0.0), (9, 16, 0.0)],
)  # fmt: skip
def test_pcie_theoretical_rate(gen: int, width: int, gbs: float) -> None:
    assert nvml.pcie_theoretical_gbs(gen, width) == pytest.approx(gbs, abs=1e-3)
