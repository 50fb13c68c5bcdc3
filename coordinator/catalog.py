"""Hardware presets and the factors that turn spec sheets into what engines achieve.

Three CSV files in coordinator/data/, every row with its source:

- hardware_catalog.csv: spec-sheet memory, bandwidth, fp16 throughput, PCIe of consumer NVIDIA
  cards and Apple M1-M4 chips, and link rates (PCIe, Ethernet, Thunderbolt, Wi-Fi).
- achieved_bandwidth.csv: *published measurements* (decode and prefill tokens/s of a known
  model on a known device). Factors are fitted from them here, not typed in:
  decode factor = model bytes x tokens/s / spec bandwidth; prefill factor = 2 x params x
  tokens/s / spec fp16 throughput. A device uses its own measurements, else its family's
  median, else its kind's median. The CPU row is a slot the validation harness fills.
- calibration.csv: a few constants (hop software overhead, usable memory fractions, Ethernet
  and PCIe efficiency, per-layer overheads), each with its status and source.

Loading is lazy (first call) and cached; nothing is read at import.
"""

from __future__ import annotations

import csv
import difflib
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA = Path(__file__).parent / "data"

__all__ = [
    "Factor",
    "HardwareEntry",
    "Measurement",
    "calibration",
    "clear_cache",
    "factors_markdown",
    "family_of",
    "find",
    "load_catalog",
    "load_measurements",
    "pcie_gbs",
    "prefill_factor",
    "stream_factor",
]


@dataclass(frozen=True)
class HardwareEntry:
    """One row of hardware_catalog.csv."""

    kind: str  # "gpu" | "apple_soc" | "link"
    name: str
    mem_gb: float | None
    mem_bw_gbs: float | None  # memory bandwidth; for links, GB/s per direction
    fp16_tflops: float | None
    pcie_gen: float | None
    pcie_lanes: int | None
    tdp_w: float | None
    source: str

    @property
    def device_kind(self) -> str:
        """The cost model's kind: cuda for NVIDIA cards, metal for Apple chips."""
        return {"gpu": "cuda", "apple_soc": "metal"}.get(self.kind, self.kind)


@dataclass(frozen=True)
class Measurement:
    """A published measurement a factor is fitted from (one row of achieved_bandwidth.csv)."""

    metric: str  # "decode" | "prefill"
    device: str
    family: str
    engine: str
    model: str
    params_b: float
    model_bytes: float
    layers: int
    tokens_per_s: float
    spec_value: float | None  # spec GB/s or TFLOPS when the device is not in the catalog
    source: str

    @property
    def fitted(self) -> bool:
        return self.tokens_per_s > 0

    def factor(self) -> float:
        """Achieved / spec: bandwidth for decode, fp16 throughput for prefill."""
        if not self.fitted:
            raise ValueError(f"{self.family}: slot without a measurement")
        spec = self.spec_value
        if spec is None:
            e = find(self.device)
            spec = e.mem_bw_gbs if self.metric == "decode" else e.fp16_tflops
        if not spec:
            raise ValueError(f"no spec figure for {self.device}")
        if self.metric == "decode":
            return self.model_bytes * self.tokens_per_s / (spec * 1e9)
        return 2.0 * self.params_b * 1e9 * self.tokens_per_s / (spec * 1e12)


@dataclass(frozen=True)
class Factor:
    """A fitted factor and where it came from, in words."""

    value: float
    basis: str


def _num(s: str) -> float | None:
    s = s.strip()
    return float(s) if s else None


@cache
def load_catalog() -> tuple[HardwareEntry, ...]:
    rows: list[HardwareEntry] = []
    with (DATA / "hardware_catalog.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            lanes = _num(r["pcie_lanes"])
            rows.append(
                HardwareEntry(
                    kind=r["kind"],
                    name=r["name"],
                    mem_gb=_num(r["mem_gb"]),
                    mem_bw_gbs=_num(r["mem_bw_gbs"]),
                    fp16_tflops=_num(r["fp16_tflops"]),
                    pcie_gen=_num(r["pcie_gen"]),
                    pcie_lanes=int(lanes) if lanes is not None else None,
                    tdp_w=_num(r["tdp_w"]),
                    source=r["source"],
                )
            )
    return tuple(rows)


@cache
def load_measurements() -> tuple[Measurement, ...]:
    rows: list[Measurement] = []
    with (DATA / "achieved_bandwidth.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            rows.append(
                Measurement(
                    metric=r["metric"],
                    device=r["device"],
                    family=r["family"],
                    engine=r["engine"],
                    model=r["model"],
                    params_b=_num(r["params_b"]) or 0.0,
                    model_bytes=_num(r["model_bytes"]) or 0.0,
                    layers=int(_num(r["layers"]) or 0),
                    tokens_per_s=_num(r["tokens_per_s"]) or 0.0,
                    spec_value=_num(r["spec_value"]),
                    source=r["source"],
                )
            )
    return tuple(rows)


@cache
def _calibration() -> dict[str, tuple[float, str]]:
    out: dict[str, tuple[float, str]] = {}
    with (DATA / "calibration.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            out[r["key"]] = (float(r["value"]), f"{r['status']}: {r['source']}")
    return out


def clear_cache() -> None:
    """Forget the CSV files read so far (after `coordinator.calibrate` rewrote one)."""
    _calibration.cache_clear()


def calibration(key: str) -> float:
    """A constant from calibration.csv (units in its `unit` column)."""
    try:
        return _calibration()[key][0]
    except KeyError:
        raise KeyError(f"no calibration constant {key!r} in {DATA / 'calibration.csv'}") from None


# --------------------------------------------------------------------------------------------
# Name matching


_DROP = {"nvidia", "geforce", "apple"}


def _tokens(name: str) -> frozenset[str]:
    out: set[str] = set()
    for t in re.findall(r"[a-z0-9]+", name.lower()):
        if t in _DROP:
            continue
        m = re.fullmatch(r"(\d{4})s", t)  # "2060S" is how people write "2060 SUPER"
        if m:
            out.update({m.group(1), "super"})
        else:
            out.add(t)
    return frozenset(out)


def find(name: str, kinds: Iterable[str] = ("gpu", "apple_soc", "link")) -> HardwareEntry:
    """A catalog entry by name: exact (case-insensitive), else the entry whose name contains all
    of the query's words with the fewest extra words ("RTX 2060 Super" -> "NVIDIA GeForce RTX
    2060 SUPER", "M4 Pro" -> "Apple M4 Pro (20-core GPU)"). Ambiguous or unknown names raise
    LookupError with the candidates."""
    wanted = set(kinds)
    entries = [e for e in load_catalog() if e.kind in wanted]
    for e in entries:
        if e.name.lower() == name.strip().lower():
            return e
    q = _tokens(name)
    if not q:
        raise LookupError(f"empty hardware name {name!r}")
    scored = [(len(_tokens(e.name) - q), e) for e in entries if q <= _tokens(e.name)]
    if scored:
        best = min(s for s, _ in scored)
        top = [e for s, e in scored if s == best]
        if len(top) == 1:
            return top[0]
        names = ", ".join(repr(e.name) for e in top)
        raise LookupError(f"{name!r} matches several catalog entries: {names}; be more specific")
    close = difflib.get_close_matches(name, [e.name for e in entries], n=3, cutoff=0.3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise LookupError(f"no catalog entry matches {name!r}{hint}")


def pcie_gbs(gen: float, lanes: int) -> float:
    """PCIe data rate per direction in GB/s, from the catalog's x1 rows."""
    e = find(f"PCIe {gen:.1f} x1", kinds=("link",))
    assert e.mem_bw_gbs is not None
    return e.mem_bw_gbs * lanes


# --------------------------------------------------------------------------------------------
# Families and factors


def family_of(name: str, kind: str) -> str:
    """Device family for factor lookup: nvidia-turing/ampere/ada/blackwell/pascal, apple-base/
    pro/max/ultra, cpu."""
    n = name.lower()
    if kind == "cpu":
        return "cpu"
    if kind == "metal" or "apple" in n or re.search(r"\bm[1-9]\b", n):
        for tier in ("ultra", "max", "pro"):
            if tier in n:
                return f"apple-{tier}"
        return "apple-base"
    m = re.search(r"rtx\s*([2-5])0\d0", n)
    if m:
        return {
            "2": "nvidia-turing",
            "3": "nvidia-ampere",
            "4": "nvidia-ada",
            "5": "nvidia-blackwell",
        }[m.group(1)]
    if re.search(r"\bp(40|100)\b|gtx\s*10", n):
        return "nvidia-pascal"
    if "a100" in n or re.search(r"\ba\d{4}\b", n):
        return "nvidia-ampere"
    return "nvidia"


def _kind_of_family(family: str) -> str:
    return "metal" if family.startswith("apple") else "cpu" if family == "cpu" else "cuda"


def _median(rows: list[Measurement]) -> float:
    return float(statistics.median(m.factor() for m in rows))


def _fit(metric: str, name: str, kind: str) -> Factor | None:
    rows = [m for m in load_measurements() if m.metric == metric and m.fitted]
    fam = family_of(name, kind)
    own = [m for m in rows if m.device and m.device.lower() == name.lower()]
    if own:
        v = _median(own)
        return Factor(v, f"{metric} factor {v:.2f} from {len(own)} measurement(s) of {name}")
    same = [m for m in rows if m.family == fam]
    if same:
        v = _median(same)
        return Factor(v, f"{metric} factor {v:.2f}: median of {len(same)} {fam} measurement(s)")
    base = [m for m in rows if m.family == "apple-base"]
    top = [m for m in rows if m.family == "apple-max"]
    if fam == "apple-pro" and base and top:
        # No published M-Pro measurement found: between the base and Max tiers.
        v = (_median(base) + _median(top)) / 2
        return Factor(
            v,
            f"{metric} factor {v:.2f}: no apple-pro measurement, mean of the apple-base and "
            f"apple-max medians",
        )
    same_kind = [m for m in rows if _kind_of_family(m.family) == kind]
    if same_kind:
        v = _median(same_kind)
        return Factor(v, f"{metric} factor {v:.2f}: median of all {kind} measurements")
    return None


def stream_factor(name: str, kind: str) -> Factor:
    """Achieved / spec-sheet memory bandwidth for decode weight streaming."""
    return _fit("decode", name, kind) or Factor(
        1.0, f"no {kind} decode measurement yet: spec (or probe) bandwidth used as is"
    )


def prefill_factor(name: str, kind: str) -> Factor:
    """Achieved / spec-sheet fp16 matmul throughput for prefill."""
    return _fit("prefill", name, kind) or Factor(
        0.5, f"no {kind} prefill measurement: assumed half of spec fp16 throughput"
    )


def factors_markdown() -> str:
    """docs/planning.md's factor table: every measurement, the factor fitted from it, source."""
    lines = [
        "| metric | device | family | engine, model | tok/s | factor | source |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for m in load_measurements():
        if m.fitted:
            lines.append(
                f"| {m.metric} | {m.device} | {m.family} | {m.engine}, {m.model} | "
                f"{m.tokens_per_s:g} | {m.factor():.2f} | {m.source} |"
            )
        else:
            lines.append(f"| {m.metric} | - | {m.family} | {m.engine} | - | slot | {m.source} |")
    return "\n".join(lines)
