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
    except ValueError as e:
        raise WhatIfError(f"{p} is not valid JSON: {e}") from e
    return parse(doc, base_dir=p.parent)


def parse(
    doc: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    concurrency: int | None = None,
) -> WhatIf:
    if not isinstance(doc, Mapping):
        raise WhatIfError("the what-if file must hold a JSON object")
    model = _model(_section(doc, "model"), base_dir)
    workload = Workload(
        context=int(doc.get("context", 4096)),
        prompt_tokens=int(doc.get("prompt_tokens", 512)),
        concurrency=int(concurrency or doc.get("concurrency", 1)),
    )
    cluster = _cluster(doc)
    return WhatIf(model, cluster, workload)


def _section(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = doc.get(key)
    if not isinstance(v, Mapping):
        raise WhatIfError(f"the what-if file needs a {key!r} object")
    return v


def _model(m: Mapping[str, Any], base_dir: Path | None) -> ModelSpec:
    if "path" in m:
        p = Path(str(m["path"]))
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        try:
            return ModelSpec.from_config_dir(p, name=m.get("name"))
        except ValueError as e:
            raise WhatIfError(str(e)) from e
    need = ("params_b", "layers", "hidden", "heads", "vocab", "bits_per_weight")
    missing = [k for k in need if k not in m]
    if missing:
        raise WhatIfError(f"model needs {', '.join(missing)} (or a 'path' to a model folder)")
    try:
        return ModelSpec.from_params(
            str(m.get("name", f"{m['params_b']}B")),
            float(m["params_b"]),
            int(m["layers"]),
            int(m["hidden"]),
            int(m["heads"]),
            int(m.get("kv_heads", m["heads"])),
            int(m["vocab"]),
            float(m["bits_per_weight"]),
            intermediate=int(m["intermediate"]) if "intermediate" in m else None,
            head_dim=int(m["head_dim"]) if "head_dim" in m else None,
            tied_embeddings=bool(m.get("tied_embeddings", False)),
        )
    except (TypeError, ValueError) as e:
        raise WhatIfError(f"model: {e}") from e


def _device(node: str, index: int, d: Mapping[str, Any]) -> tuple[DeviceSpec, float, float]:
    """(DeviceSpec, PCIe gen, PCIe lanes) from a device entry; 0 for no PCIe."""
    wanted = d.get("preset", d.get("name"))
    entry: catalog.HardwareEntry | None = None
    if wanted:
        try:
            entry = catalog.find(str(wanted), kinds=("gpu", "apple_soc"))
        except LookupError as e:
            if "preset" in d or not {"kind", "mem_gb", "bandwidth_gbs"} <= set(d):
                raise WhatIfError(f"node {node}: {e}") from e
    name = str(entry.name if entry else d.get("name", f"device {index}"))
    kind = str(d.get("kind", entry.device_kind if entry else ""))
    if kind not in ("cuda", "metal", "cpu"):
        raise WhatIfError(f"node {node}, device {name}: kind must be cuda, metal or cpu")

    def field(key: str, preset: float | None) -> float:
        v = d.get(key, preset)
        if v is None:
            raise WhatIfError(f"node {node}, device {name}: needs {key!r} (no preset gives it)")
        return float(v)

    mem_gb = field("mem_gb", entry.mem_gb if entry else None)
    bw = field("bandwidth_gbs", entry.mem_bw_gbs if entry else None)
    tflops = field("fp16_tflops", entry.fp16_tflops if entry else None)
    sf = float(d.get("stream_factor", catalog.stream_factor(name, kind).value))
    pf = float(d.get("prefill_factor", catalog.prefill_factor(name, kind).value))
    if "free_gb" in d:
        free = float(d["free_gb"]) * GIB
    elif kind == "cuda":
        free = (mem_gb - catalog.calibration("cuda_reserve_gib")) * GIB
    elif kind == "metal":
        key = "metal_usable_fraction_small" if mem_gb <= 32 else "metal_usable_fraction_large"
        free = mem_gb * GIB * catalog.calibration(key)
    else:
        free = (mem_gb - catalog.calibration("cpu_reserve_gib")) * GIB
    if "per_layer_overhead_us" in d:
        overhead = float(d["per_layer_overhead_us"]) * 1e-6
    else:
        key = "cpu_per_layer_overhead_us" if kind == "cpu" else "gpu_per_layer_overhead_us"
        overhead = catalog.calibration(key) * 1e-6
    gen = float(d.get("pcie_gen", (entry.pcie_gen if entry else None) or 0))
    lanes = float(d.get("pcie_width", (entry.pcie_lanes if entry else None) or 0))
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
        raise WhatIfError(str(e)) from e
    return spec, gen, lanes


def _network_link(a: str, b: str, net: Mapping[str, Any]) -> LinkSpec:
    bw_gbps = net.get("bandwidth_gbps")
    if bw_gbps is None and "preset" in net:
        try:
            e = catalog.find(str(net["preset"]), kinds=("link",))
        except LookupError as err:
            raise WhatIfError(f"network: {err}") from err
        assert e.mem_bw_gbs is not None
        bw_gbps = e.mem_bw_gbs * 8
    if bw_gbps is None:
        raise WhatIfError("network needs bandwidth_gbps (Gb/s) or a catalog preset")
    efficiency = float(net.get("efficiency", catalog.calibration("ethernet_efficiency")))
    return LinkSpec(
        src=a,
        dst=b,
        latency_s=float(net.get("latency_us", 200)) * 1e-6,
        bandwidth_Bps=float(bw_gbps) / 8 * 1e9 * efficiency,
        overhead_s=catalog.calibration("hop_overhead_us") * 1e-6,
        kind="network",
    )


def _cluster(doc: Mapping[str, Any]) -> Cluster:
    nodes = doc.get("nodes")
    if not isinstance(nodes, Sequence) or not nodes:
        raise WhatIfError("the what-if file needs a non-empty 'nodes' list")
    devices: list[DeviceSpec] = []
    pcie: dict[str, tuple[float, float]] = {}
    names: list[str] = []
    for ni, node in enumerate(nodes):
        if not isinstance(node, Mapping):
            raise WhatIfError(f"node {ni} must be an object")
        name = str(node.get("name", f"node{ni}"))
        if name in names:
            raise WhatIfError(f"two nodes are named {name!r}")
        names.append(name)
        i = 0
        for d in node.get("devices", []):
            for _ in range(int(d.get("count", 1))):
                spec, gen, lanes = _device(name, i, d)
                devices.append(spec)
                pcie[spec.id] = (gen, lanes)
                i += 1
        if i == 0:
            raise WhatIfError(f"node {name} has no devices")
    net = doc.get("network", {"latency_us": 200, "bandwidth_gbps": 10})
    links: list[LinkSpec] = []
    for a in names:
        for b in names:
            if a != b:
                links.append(_network_link(a, b, net))
    for o in doc.get("links", []):
        a, b = str(o["a"]), str(o["b"])
        links = [lk for lk in links if {lk.src, lk.dst} != {a, b}]
        links += [_network_link(a, b, o), _network_link(b, a, o)]
    links += _intra_node_links(devices, pcie)
    return Cluster(tuple(devices), tuple(links))


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
