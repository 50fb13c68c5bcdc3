"""What-if planning: clusters you do not have, described in JSON, turned into a Cluster with
catalog presets and achieved-bandwidth factors, then planned like a live one.

The file (issue 4):

    {"model": {"name": "llama-3-70b", "params_b": 70.6, "layers": 80, "hidden": 8192,
               "heads": 64, "kv_heads": 8, "vocab": 128256, "bits_per_weight": 4.85},
     "nodes": [{"name": "pc", "devices": [{"name": "RTX 2060 Super", "count": 3}]},
               {"name": "mac", "devices": [{"name": "M4 Pro", "mem_gb": 48}]}],
     "network": {"latency_us": 200, "bandwidth_gbps": 10},
     "context": 4096, "prompt_tokens": 512}

A device names a catalog preset (`name` or `preset`, matched loosely); explicit fields override
it: kind, mem_gb, bandwidth_gbs (spec sheet), fp16_tflops, pcie_gen, pcie_width, and the
planning knobs stream_factor, prefill_factor, free_gb, per_layer_overhead_us. `count` repeats
a device. The model may instead be {"path": DIR} (config.json + safetensors headers).
`network` may name a catalog link ("preset": "10GbE"); `links` overrides single node pairs:
[{"a": "pc", "b": "mac", "latency_us": 300, "bandwidth_gbps": 1}].

How spec sheets become a DeviceSpec (factors and constants: coordinator/data/*.csv):
    stream_gbs    = bandwidth_gbs x achieved-bandwidth factor of the device or its family
    matmul_tflops = fp16_tflops x prefill factor
    mem_free      = cuda: mem_gb GiB - CUDA reserve; metal: mem_gb GiB x usable GPU fraction;
                    cpu: mem_gb GiB - OS reserve
Links: node pairs use the network (bandwidth_gbps x Ethernet efficiency, latency_us, plus the
per-hop software overhead); GPUs of one PC hop device -> host -> device over PCIe.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from coordinator import catalog
from coordinator.costmodel import (
    GIB,
    Cluster,
    DeviceSpec,
    LinkSpec,
    ModelSpec,
    Workload,
    predict,
)
from coordinator.planner import PlanChoice, even_split, memory_split, plan
from coordinator.replicas import Candidate, ServingChoice, plan_serving

__all__ = [
    "BRIEF_CLUSTERS",
    "BRIEF_MODELS",
    "WhatIf",
    "WhatIfError",
    "brief_table",
    "brief_table_markdown",
    "choice_json",
    "load",
    "parse",
    "run",
    "serving_json",
    "serving_table_markdown",
]


class WhatIfError(ValueError):
    """The what-if description is wrong in a way the user can fix."""


@dataclass(frozen=True)
class WhatIf:
    """A parsed what-if: the model, the imagined cluster and the workload."""

    model: ModelSpec
    cluster: Cluster
    workload: Workload


def load(path: str | Path) -> WhatIf:
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise WhatIfError(f"cannot read {p}: {e.strerror or e}") from e
    except (ValueError, RecursionError) as e:
        raise WhatIfError(f"{p} is not valid JSON: {e}") from e
    return parse(doc, base_dir=p.parent)


def parse(
    doc: Any,
    *,
    base_dir: Path | None = None,
    concurrency: int | None = None,
) -> WhatIf:
    """The what-if of a decoded JSON document. Any document that is not one raises
    WhatIfError naming the field (tests/test_whatif.py fuzzes this)."""
    if not isinstance(doc, Mapping):
        raise WhatIfError("the what-if file must hold a JSON object")
    top = _Fields(doc, "the what-if file")
    model = _model(top.object("model"), base_dir)
    context = top.integer("context", 4096, most=MAX_CONTEXT)
    prompt = top.integer("prompt_tokens", min(512, context), most=MAX_CONTEXT)
    if prompt > context:
        raise WhatIfError(f"prompt_tokens ({prompt}) must not exceed context ({context})")
    if concurrency is None:
        concurrency = top.integer("concurrency", 1, most=MAX_CONCURRENCY)
    try:
        workload = Workload(context=context, prompt_tokens=prompt, concurrency=concurrency)
    except ValueError as e:
        raise WhatIfError(str(e)) from e
    cluster = _cluster(top)
    return WhatIf(model, cluster, workload)


# Bounds that keep every figure finite and planning quick; far beyond any real hardware.
MAX_NUMBER = 1e9
MAX_INTEGER = 2**31
MAX_LAYERS = 512  # the planner's tables grow as devices x layers^2 (512 x 64: ~4 s, 200 MB)
MAX_DEVICES = 64
MAX_CONTEXT = 2**24
MAX_CONCURRENCY = 65_536
_MISSING: Any = object()


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, Mapping | list) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


class _Fields:
    """One JSON object of the what-if file, read field by field; `where` names it in errors."""

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, Mapping):
            raise WhatIfError(f"{where} must be an object, not {_show(value)}")
        self.m: Mapping[str, Any] = value
        self.where = where

    def __contains__(self, key: str) -> bool:
        return key in self.m

    def _get(self, key: str, default: Any) -> Any:
        if key in self.m:
            return self.m[key]
        if default is _MISSING:
            raise WhatIfError(f"{self.where}: needs {key!r}")
        return default

    def bad(self, key: str, what: str) -> WhatIfError:
        return WhatIfError(f"{self.where}: {key!r} must be {what}, not {_show(self.m.get(key))}")

    def number(self, key: str, default: Any = _MISSING, *, positive: bool = False) -> float:
        v = self._get(key, default)
        what = "a positive number" if positive else "a number >= 0"
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.bad(key, what)
        try:
            x = float(v)
        except OverflowError:
            raise self.bad(key, f"{what} up to {MAX_NUMBER:g}") from None
        if not math.isfinite(x) or x < 0 or (positive and x == 0):
            raise self.bad(key, what)
        if x > MAX_NUMBER:
            raise self.bad(key, f"{what} up to {MAX_NUMBER:g}")
        return x

    def integer(
        self, key: str, default: Any = _MISSING, *, least: int = 1, most: int = MAX_INTEGER
    ) -> int:
        v = self._get(key, default)
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not least <= v <= most:
            raise self.bad(key, f"a whole number from {least} to {most}")
        return v

    def text(self, key: str, default: Any = _MISSING) -> str:
        v = self._get(key, default)
        if not isinstance(v, str):
            raise self.bad(key, "a string")
        return v

    def flag(self, key: str, default: bool) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self.bad(key, "true or false")
        return v

    def object(self, key: str, default: Any = _MISSING) -> _Fields:
        v = self._get(key, default)
        if not isinstance(v, Mapping):
            raise WhatIfError(f"{self.where}: needs a {key!r} object")
        return _Fields(v, key if self.where == "the what-if file" else f"{self.where}.{key}")

    def items(self, key: str) -> list[Any]:
        v = self._get(key, [])
        if not isinstance(v, list):
            raise self.bad(key, "a list")
        return v


def _model(m: _Fields, base_dir: Path | None) -> ModelSpec:
    if "path" in m:
        p = Path(m.text("path"))
        name = m.text("name") if "name" in m else None
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        try:
            return ModelSpec.from_config_dir(p, name=name)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise WhatIfError(f"model: {e}") from e
    need = ("params_b", "layers", "hidden", "heads", "vocab", "bits_per_weight")
    missing = [k for k in need if k not in m]
    if missing:
        raise WhatIfError(f"model needs {', '.join(missing)} (or a 'path' to a model folder)")
    params_b = m.number("params_b", positive=True)
    heads = m.integer("heads")
    try:
        return ModelSpec.from_params(
            m.text("name", f"{params_b:g}B"),
            params_b,
            m.integer("layers", most=MAX_LAYERS),
            m.integer("hidden"),
            heads,
            m.integer("kv_heads", heads),
            m.integer("vocab"),
            m.number("bits_per_weight", positive=True),
            intermediate=m.integer("intermediate") if "intermediate" in m else None,
            head_dim=m.integer("head_dim") if "head_dim" in m else None,
            tied_embeddings=m.flag("tied_embeddings", False),
        )
    except ValueError as e:
        raise WhatIfError(f"model: {e}") from e


def _device(node: str, index: int, d: _Fields) -> tuple[DeviceSpec, float, float]:
    """(DeviceSpec, PCIe gen, PCIe lanes) from a device entry; 0 for no PCIe."""
    wanted = d.text("preset") if "preset" in d else d.text("name") if "name" in d else ""
    entry: catalog.HardwareEntry | None = None
    if wanted:
        try:
            entry = catalog.find(wanted, kinds=("gpu", "apple_soc"))
        except LookupError as e:
            if "preset" in d or not {"kind", "mem_gb", "bandwidth_gbs"} <= set(d.m):
                raise WhatIfError(f"{d.where}: {e}") from e
    name = entry.name if entry else d.text("name", f"device {index}")
    kind = d.text("kind", entry.device_kind if entry else "")
    if kind not in ("cuda", "metal", "cpu"):
        raise WhatIfError(f"{d.where} ({name}): 'kind' must be cuda, metal or cpu")

    def field(key: str, preset: float | None) -> float:
        if key not in d and preset is None:
            raise WhatIfError(f"{d.where} ({name}): needs {key!r} (no preset gives it)")
        return d.number(key, preset, positive=True)

    mem_gb = field("mem_gb", entry.mem_gb if entry else None)
    bw = field("bandwidth_gbs", entry.mem_bw_gbs if entry else None)
    tflops = field("fp16_tflops", entry.fp16_tflops if entry else None)
    sf = d.number("stream_factor", catalog.stream_factor(name, kind).value, positive=True)
    pf = d.number("prefill_factor", catalog.prefill_factor(name, kind).value, positive=True)
    if "free_gb" in d:
        free = d.number("free_gb") * GIB
    elif kind == "cuda":
        free = (mem_gb - catalog.calibration("cuda_reserve_gib")) * GIB
    elif kind == "metal":
        key = "metal_usable_fraction_small" if mem_gb <= 32 else "metal_usable_fraction_large"
        free = mem_gb * GIB * catalog.calibration(key)
    else:
        free = (mem_gb - catalog.calibration("cpu_reserve_gib")) * GIB
    if "per_layer_overhead_us" in d:
        overhead = d.number("per_layer_overhead_us") * 1e-6
    else:
        key = "cpu_per_layer_overhead_us" if kind == "cpu" else "gpu_per_layer_overhead_us"
        overhead = catalog.calibration(key) * 1e-6
    gen = d.number("pcie_gen", (entry.pcie_gen if entry else None) or 0)
    lanes = d.integer("pcie_width", int((entry.pcie_lanes if entry else None) or 0), least=0)
    if kind == "cuda" and gen and lanes:
        try:
            catalog.pcie_gbs(gen, lanes)
        except LookupError as e:
            raise WhatIfError(f"{d.where} ({name}): 'pcie_gen' {gen:g}: {e}") from e
    try:
        spec = DeviceSpec(
            id=f"{node}/{index}",
            node=node,
            name=name,
            kind=kind,
            mem_free_bytes=max(0, int(free)),
            stream_gbs=bw * sf,
            matmul_tflops=tflops * pf,
            per_layer_overhead_s=overhead,
        )
    except ValueError as e:
        raise WhatIfError(f"{d.where}: {e}") from e
    return spec, gen, lanes


def _network_link(a: str, b: str, net: _Fields) -> LinkSpec:
    if "bandwidth_gbps" in net:
        bw_gbps = net.number("bandwidth_gbps", positive=True)
    elif "preset" in net:
        try:
            e = catalog.find(net.text("preset"), kinds=("link",))
        except LookupError as err:
            raise WhatIfError(f"{net.where}: {err}") from err
        assert e.mem_bw_gbs is not None
        bw_gbps = e.mem_bw_gbs * 8
    else:
        raise WhatIfError(f"{net.where} needs bandwidth_gbps (Gb/s) or a catalog preset")
    efficiency = net.number("efficiency", catalog.calibration("ethernet_efficiency"), positive=True)
    return LinkSpec(
        src=a,
        dst=b,
        latency_s=net.number("latency_us", 200) * 1e-6,
        bandwidth_Bps=bw_gbps / 8 * 1e9 * efficiency,
        overhead_s=catalog.calibration("hop_overhead_us") * 1e-6,
        kind="network",
    )


def _cluster(doc: _Fields) -> Cluster:
    nodes = doc.items("nodes")
    if not nodes:
        raise WhatIfError("the what-if file needs a non-empty 'nodes' list")
    devices: list[DeviceSpec] = []
    pcie: dict[str, tuple[float, float]] = {}
    names: list[str] = []
    for ni, raw in enumerate(nodes):
        node = _Fields(raw, f"nodes[{ni}]")
        name = node.text("name", f"node{ni}")
        if not name:
            raise node.bad("name", "a non-empty string")
        if name in names:
            raise WhatIfError(f"two nodes are named {name!r}")
        names.append(name)
        i = 0
        for di, raw_device in enumerate(node.items("devices")):
            d = _Fields(raw_device, f"nodes[{ni}].devices[{di}]")
            for _ in range(d.integer("count", 1, most=MAX_DEVICES)):
                if len(devices) == MAX_DEVICES:
                    raise WhatIfError(f"the what-if file describes more than {MAX_DEVICES} devices")
                spec, gen, lanes = _device(name, i, d)
                devices.append(spec)
                pcie[spec.id] = (gen, lanes)
                i += 1
        if i == 0:
            raise WhatIfError(f"node {name} has no devices")
    net = doc.object("network", {"latency_us": 200, "bandwidth_gbps": 10})
    links: list[LinkSpec] = []
    for a in names:
        for b in names:
            if a != b:
                links.append(_network_link(a, b, net))
    for li, raw_link in enumerate(doc.items("links")):
        o = _Fields(raw_link, f"links[{li}]")
        a, b = o.text("a"), o.text("b")
        for key, end in (("a", a), ("b", b)):
            if end not in names:
                raise o.bad(key, f"the name of a node ({', '.join(names)})")
        if a == b:
            raise WhatIfError(f"{o.where}: 'a' and 'b' must name two different nodes")
        links = [lk for lk in links if {lk.src, lk.dst} != {a, b}]
        links += [_network_link(a, b, o), _network_link(b, a, o)]
    links += _intra_node_links(devices, pcie)
    try:
        return Cluster(tuple(devices), tuple(links))
    except ValueError as e:
        raise WhatIfError(str(e)) from e


def _intra_node_links(
    devices: Sequence[DeviceSpec], pcie: Mapping[str, tuple[float, float]]
) -> list[LinkSpec]:
    """Stage workers on one host: an IPC message plus device -> host -> device copies."""
    ipc = catalog.calibration("same_host_latency_us") + catalog.calibration("hop_overhead_us")
    copy = catalog.calibration("pcie_copy_latency_us")
    eff = catalog.calibration("pcie_efficiency")
    out: list[LinkSpec] = []
    for a in devices:
        for b in devices:
            if a.node != b.node or a.id == b.id:
                continue
            legs = []
            for dev in (a, b):
                gen, lanes = pcie.get(dev.id, (0.0, 0.0))
                if dev.kind == "cuda" and gen and lanes:
                    legs.append(catalog.pcie_gbs(gen, int(lanes)) * eff * 1e9)
            if legs:
                bw = 1.0 / sum(1.0 / x for x in legs)  # copies in series, staged in host memory
                latency = len(legs) * copy * 1e-6
                kind = "pcie"
            else:
                bw, latency, kind = 10e9, 0.0, "host"
            out.append(LinkSpec(a.id, b.id, latency, bw, ipc * 1e-6, kind))
    return out


# --------------------------------------------------------------------------------------------
# Running and reporting


def run(whatif: WhatIf, objective: str = "latency") -> PlanChoice:
    return plan(whatif.model, whatif.cluster, whatif.workload, objective)


def choice_json(choice: PlanChoice, cluster: Cluster) -> dict[str, Any]:
    """The --json answer: plan, predictions, fit, bottleneck, explanation and breakdowns."""
    out: dict[str, Any] = {
        "model": choice.model,
        "objective": choice.objective,
        "concurrency": choice.concurrency,
        "fits": choice.fits,
        "exact": choice.exact,
        "plan": [],
        "predicted": None,
        "bottleneck": choice.bottleneck,
        "explanation": choice.explanation,
    }
    if not choice.fits:
        out["reason"] = choice.explanation
    cost = choice.cost
    if cost is None:
        return out
    for p in choice.placements:
        d = cluster.device(p.device)
        out["plan"].append(
            {"node": d.node, "device": d.name, "device_id": d.id, "layers": [p.start, p.end]}
        )
    out["predicted"] = {
        "decode_tps": round(cost.decode_tps, 3),
        "ttft_s": round(cost.ttft_s, 4),
        "throughput_tps": round(cost.throughput_tps, 3),
        "token_ms": round(cost.token_s * 1e3, 4),
    }
    out["stages"] = [
        {
            "device_id": s.device,
            "layers": [s.start, s.end],
            "weights_ms": round(s.weights_s * 1e3, 4),
            "kv_ms": round(s.kv_s * 1e3, 4),
            "overhead_ms": round(s.overhead_s * 1e3, 4),
            "head_ms": round(s.head_s * 1e3, 4),
            "total_ms": round(s.total_s * 1e3, 4),
            "prefill_s": round(pf, 4),
        }
        for s, pf in zip(cost.stages, cost.prefill_stage_s, strict=True)
    ]
    out["hops"] = [
        {
            "src": h.src,
            "dst": h.dst,
            "kind": h.kind,
            "total_ms": round(h.total_s * 1e3, 4),
            "latency_ms": round(h.latency_s * 1e3, 4),
            "transfer_ms": round(h.transfer_s * 1e3, 5),
            "overhead_ms": round(h.overhead_s * 1e3, 4),
        }
        for h in cost.hops
    ]
    # The hops between devices of one node (PCIe or host memory), as the cost model prices
    # them: measured on a live cluster (coordinator/probe.py's device_links).
    out["intra_node_links"] = [
        {
            "src": lk.src,
            "dst": lk.dst,
            "kind": lk.kind,
            "latency_ms": round(lk.latency_s * 1e3, 4),
            "bandwidth_gbs": round(lk.bandwidth_Bps / 1e9, 3),
        }
        for lk in cluster.links
        if lk.kind in ("pcie", "host")
    ]
    out["memory"] = [
        {
            "device_id": m.device,
            "weights_gib": round(m.weights_bytes / GIB, 3),
            "kv_gib": round(m.kv_bytes / GIB, 3),
            "working_gib": round(m.working_bytes / GIB, 3),
            "free_gib": round(m.free_bytes / GIB, 3),
            "fits": m.fits,
        }
        for m in cost.memory
    ]
    return out


def serving_json(choice: ServingChoice, cluster: Cluster) -> dict[str, Any]:
    """The --json answer with replicas: the first replica's pipeline at the top level (as
    for one pipeline), every replica under "replicas", the totals under "serving" and every
    candidate the planner weighed, with its prediction, under "candidates"."""
    chosen = choice.chosen
    if chosen is None or not chosen.fits:
        first = chosen.pipelines[0] if chosen is not None else None
        out = (
            choice_json(first, cluster)
            if first is not None
            else {"model": choice.model, "fits": False, "plan": [], "predicted": None}
        )
        out.update(fits=False, reason=choice.explanation, explanation=choice.explanation)
        replicas: list[dict[str, Any]] = []
    else:
        replicas = [
            {"share": m, **choice_json(p, cluster)}
            for p, m in zip(chosen.at_shares(), chosen.shares, strict=True)
        ]
        out = {k: v for k, v in replicas[0].items() if k != "share"}
        out["explanation"] = choice.explanation
    out["objective"] = "throughput"
    out["concurrency"] = choice.concurrency
    out["replicas"] = replicas
    out["serving"] = {
        "replicas": chosen.replicas if chosen is not None else 0,
        "fixed_replicas": choice.replicas,
        "shape": chosen.shape if chosen is not None else "",
        "concurrency": choice.concurrency,
        "min_tps": choice.min_tps,
        "aggregate_tps": round(chosen.aggregate_tps, 3) if chosen else 0.0,
        "per_request_tps": round(chosen.per_request_tps, 3) if chosen else 0.0,
        "explanation": choice.explanation,
    }
    out["candidates"] = [
        {
            "replicas": c.replicas,
            "grouping": c.grouping,
            "shape": c.shape,
            "fits": c.fits,
            "chosen": c is chosen,
            "groups": [list(g) for g in c.groups],
            "stages": [
                [{"device_id": p.device, "layers": [p.start, p.end]} for p in pipe.placements]
                for pipe in c.pipelines
            ],
            "shares": list(c.shares),
            "aggregate_tps": round(c.aggregate_tps, 3),
            "per_request_tps": round(c.per_request_tps, 3),
            "shared_hosts": list(c.shared_hosts),
        }
        for c in choice.candidates
    ]
    return out


# --------------------------------------------------------------------------------------------
# The cluster shapes people ask about (docs/planning.md's table is generated from these)

_2060S = {"name": "RTX 2060 Super"}  # 8 GB, 448 GB/s, PCIe 3.0 x16
_TEN_GBE = {"latency_us": 200, "bandwidth_gbps": 10}

BRIEF_CLUSTERS: dict[str, dict[str, Any]] = {
    "2x RTX 2060 Super": {"nodes": [{"name": "pc", "devices": [{**_2060S, "count": 2}]}]},
    "3x RTX 2060 Super": {"nodes": [{"name": "pc", "devices": [{**_2060S, "count": 3}]}]},
    "4x RTX 2060 Super": {"nodes": [{"name": "pc", "devices": [{**_2060S, "count": 4}]}]},
    "1x RTX 3090": {"nodes": [{"name": "pc", "devices": [{"name": "RTX 3090"}]}]},
    "Mac Mini M4 Pro 48 GB": {
        "nodes": [{"name": "mac", "devices": [{"name": "M4 Pro", "mem_gb": 48}]}]
    },
    "3x 2060S + Mac Mini M4 Pro, 10 GbE": {
        "nodes": [
            {"name": "pc", "devices": [{**_2060S, "count": 3}]},
            {"name": "mac", "devices": [{"name": "M4 Pro", "mem_gb": 48}]},
        ],
        "network": _TEN_GBE,
    },
}

BRIEF_MODELS: dict[str, dict[str, Any]] = {
    # Llama-3-8B shapes
    "8B": {"name": "8B", "params_b": 8.03, "layers": 32, "hidden": 4096, "heads": 32,
           "kv_heads": 8, "vocab": 128256, "bits_per_weight": 4.85},
    # Yi-34B shapes
    "34B": {"name": "34B", "params_b": 34.4, "layers": 60, "hidden": 7168, "heads": 56,
            "kv_heads": 8, "vocab": 64000, "bits_per_weight": 4.85},
    # Llama-3-70B shapes (the example)
    "70B": {"name": "70B", "params_b": 70.6, "layers": 80, "hidden": 8192, "heads": 64,
            "kv_heads": 8, "vocab": 128256, "bits_per_weight": 4.85},
}  # fmt: skip


@dataclass(frozen=True)
class TableRow:
    cluster: str
    model: str
    choice: PlanChoice
    whatif: WhatIf


def brief_table(context: int = 4096, prompt_tokens: int = 512) -> list[TableRow]:
    rows: list[TableRow] = []
    for cname, cdoc in BRIEF_CLUSTERS.items():
        for mname, mdoc in BRIEF_MODELS.items():
            doc = {**cdoc, "model": mdoc, "context": context, "prompt_tokens": prompt_tokens}
            w = parse(doc)
            rows.append(TableRow(cname, mname, run(w), w))
    return rows


def _baseline_tps(r: TableRow, split: Any) -> str:
    """Decode tok/s of a baseline split over every device of the cluster, or "no fit"."""
    w = r.whatif
    if len(w.cluster.devices) > w.model.layers:
        return "no fit"
    cost = predict(w.model, w.cluster, split(w.model, w.cluster.devices), w.workload)
    return f"{cost.decode_tps:.1f}" if cost.fits else "no fit"


def brief_table_markdown(context: int = 4096, prompt_tokens: int = 512) -> str:
    """docs/planning.md's what-if table (the test suite checks the doc still matches)."""
    lines = [
        "| cluster | model | fits | stages (layers) | decode tok/s | TTFT s | exo split | "
        "even split | bottleneck or shortfall |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in brief_table(context, prompt_tokens):
        c = r.choice
        exo, even = _baseline_tps(r, memory_split), _baseline_tps(r, even_split)
        if c.cost is None or not c.fits:
            short = c.explanation.split(": ", 1)[-1]
            lines.append(f"| {r.cluster} | {r.model} | no | - | - | - | {exo} | {even} | {short} |")
            continue
        stages = " + ".join(
            f"{r.whatif.cluster.label(p.device)} [{p.start},{p.end})" for p in c.placements
        )
        lines.append(
            f"| {r.cluster} | {r.model} | yes | {stages} | {c.cost.decode_tps:.1f} | "
            f"{c.cost.ttft_s:.2f} | {exo} | {even} | {c.bottleneck} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Replicas against one pipeline (docs/planning.md, "Serving many users")


def _best(cands: Sequence[Candidate], keep: Any) -> str:
    kind = [c for c in cands if keep(c)]
    fitting = [c for c in kind if c.fits]
    if not fitting:
        return "no fit" if kind else "-"
    c = max(fitting, key=lambda c: (c.aggregate_tps, -c.replicas))
    return f"{c.shape}: {c.aggregate_tps:.1f} / {c.per_request_tps:.1f}"


def serving_table_markdown(paths: Sequence[str | Path], levels: Sequence[int]) -> str:
    """For each what-if file and number of users: one pipeline, replicas of one device,
    replicas of pipelines, and the planner's choice, as aggregate / per-user tokens/s."""
    lines = [
        "| model | users | one pipeline | replicas of one device | replicas of pipelines | "
        "planner picks |",
        "|---|---:|---|---|---|---|",
    ]
    for path in paths:
        base = load(path)
        for m in levels:
            w = WhatIf(base.model, base.cluster, replace(base.workload, concurrency=m))
            choice = plan_serving(w.model, w.cluster, w.workload)
            cands = choice.candidates

            def stages(c: Candidate) -> set[int]:
                return {len(p.placements) for p in c.pipelines}

            one = _best(cands, lambda c: c.replicas == 1)
            singles = _best(cands, lambda c: c.replicas > 1 and (not c.fits or stages(c) == {1}))
            mixes = _best(cands, lambda c: c.replicas > 1 and c.fits and stages(c) != {1})
            chosen = choice.chosen
            pick = (
                f"**{chosen.shape}: {chosen.aggregate_tps:.1f} / {chosen.per_request_tps:.1f}**"
                if chosen is not None and chosen.fits
                else "no fit"
            )
            lines.append(f"| {w.model.name} | {m} | {one} | {singles} | {mixes} | {pick} |")
    return "\n".join(lines)
