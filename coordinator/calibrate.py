"""Live calibration: the few fitted constants that turn a probe of real nodes into the cost
model's inputs, how they are applied, and how they are fitted from measured runs.

The probe (coordinator.probe) measures what it can measure directly: each device's weight
streaming in the model's dtype, its matmul throughput, and every link's latency and bandwidth
over the transport that carries activations. What a real decode step costs beyond those figures
is fitted, not typed in, by `coordinator validate-planner --calibrate` (coordinator.lab.validation),
which runs calibration plans on this machine's nodes and writes the result, with the command,
the date and the fit's residual, into coordinator/data/calibration.csv:

    cpu_stream_factor          achieved decode weight streaming / the probe's stream figure
    cpu_matmul_factor          achieved prefill matmul throughput / the probe's matmul figure
    cpu_per_layer_overhead_us  fixed cost per layer and token on a CPU device (op dispatch)
    live_hop_overhead_us       cost per decode hop beyond the probe's echo latency (the stage's
                               hand-off to its compute thread, tensor encoding, the extra stage)
    token_overhead_us          fixed cost per token whatever the plan: sampling and the sampled
                               token's way back into stage 0
    ring_hop                   1 when the last stage sends the token to stage 0 itself (a hop
                               when split), 0 when it goes back through the coordinator

Decode time is linear in these (1 / stream factor, per-layer, per-hop, per-token), so the fit
is an exact non-negative least squares on relative errors; both token paths (ring_hop 0 and 1)
are fitted and the one with the smaller residual is kept. The matmul factor enters TTFT through
a max(compute, streaming) per stage and is fitted by a one-dimensional search on the cost
model itself. Everything here is pure except `write_constants` (one CSV file).
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from coordinator import catalog
from coordinator.costmodel import Cluster, ModelSpec, Placement, PlanCost, Workload, predict

log = logging.getLogger(__name__)

__all__ = [
    "UNIT",
    "DecodeFit",
    "LiveCalibration",
    "Observation",
    "device_ids",
    "fit",
    "fit_decode",
    "fit_matmul_factor",
    "live_cluster",
    "live_workload",
    "stream_dtype",
    "write_constants",
]

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
HALF_DTYPES = ("float16", "bfloat16")
CALIBRATION_CSV = catalog.DATA / "calibration.csv"


@dataclass(frozen=True)
class LiveCalibration:
    """The constants applied to a live probe (see the module docstring)."""

    cpu_stream_factor: float = 1.0
    cpu_matmul_factor: float = 1.0
    cpu_per_layer_overhead_s: float = 0.0
    hop_overhead_s: float = 0.0
    token_overhead_s: float = 0.0
    ring_hop: bool = True

    def __post_init__(self) -> None:
        if self.cpu_stream_factor <= 0 or self.cpu_matmul_factor <= 0:
            raise ValueError("calibration factors must be positive")
        if min(self.cpu_per_layer_overhead_s, self.hop_overhead_s, self.token_overhead_s) < 0:
            raise ValueError("calibration overheads must be >= 0")

    @staticmethod
    def load() -> LiveCalibration:
        """The constants in coordinator/data/calibration.csv (defaults where a key is absent)."""

        def get(key: str, default: float) -> float:
            try:
                return catalog.calibration(key)
            except KeyError:
                return default

        return LiveCalibration(
            cpu_stream_factor=get("cpu_stream_factor", 1.0),
            cpu_matmul_factor=get("cpu_matmul_factor", 1.0),
            cpu_per_layer_overhead_s=get("cpu_per_layer_overhead_us", 0.0) * 1e-6,
            hop_overhead_s=get("live_hop_overhead_us", 0.0) * 1e-6,
            token_overhead_s=get("token_overhead_us", 0.0) * 1e-6,
            ring_hop=get("ring_hop", 1.0) >= 0.5,
        )

    def describe(self) -> str:
        path = "a direct ring hop" if self.ring_hop else "the coordinator"
        return (
            f"CPU stream factor {self.cpu_stream_factor:.3f}, matmul factor "
            f"{self.cpu_matmul_factor:.3f}, {self.cpu_per_layer_overhead_s * 1e6:.0f} us per layer, "
            f"{self.hop_overhead_s * 1e6:.0f} us per hop beyond the probed latency, "
            f"{self.token_overhead_s * 1e6:.0f} us per token (token returns via {path})"
        )


UNIT = LiveCalibration()  # the probe's figures as they are, no overheads


def stream_dtype(config: Mapping[str, Any], folder: Path | None = None) -> str:
    """The dtype the model's weights are stored in, as the probe names it (float32, float16,
    bfloat16, q4, q8): what `probe_cluster(dtypes=[...])` should time for this model. When
    config.json does not say, the safetensors headers of `folder` do (by bytes)."""
    cfg = config.get("text_config", config)
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, Mapping) and quant.get("bits") in (4, 8):
        return f"q{quant['bits']}"
    raw = str(cfg.get("torch_dtype") or config.get("torch_dtype") or cfg.get("dtype") or "")
    if raw in FLOAT_DTYPES:
        return raw
    stored = _stored_float_dtype(folder) if folder is not None else None
    return stored or "float16"


def computed_as(dtype: str, compute_dtype: str) -> tuple[str, float]:
    """(the dtype whose streaming rate prices a model stored in `dtype`, how many times its
    stored bytes stream) on a device computing as `compute_dtype` (node/computedtype.py): a
    half-precision model on a float32 node streams twice its bytes at the float32 rate."""
    if compute_dtype == "float32" and dtype in HALF_DTYPES:
        return "float32", 2.0
    return dtype, 1.0


def probe_dtypes(dtype: str) -> list[str]:
    """The dtypes to time for a model stored in `dtype`: float32 too for half-precision
    models, which CPU nodes compute in float32."""
    return [dtype, "float32"] if dtype in HALF_DTYPES else [dtype]


def _stored_float_dtype(folder: Path) -> str | None:
    from node.tensorfiles import TensorFileError, read_header

    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    by_bytes: dict[str, int] = {}
    try:
        for f in sorted(folder.glob("*.safetensors")):
            for e in read_header(f):
                if e.dtype in names:
                    by_bytes[names[e.dtype]] = by_bytes.get(names[e.dtype], 0) + e.nbytes
    except (OSError, TensorFileError):
        return None
    return max(by_bytes, key=lambda k: by_bytes[k]) if by_bytes else None


def _node_names(probe: Mapping[str, Any]) -> dict[str, str]:
    """Node id -> the node name `Cluster.from_probe_json` gives it (duplicates get a suffix)."""
    names: dict[str, str] = {}
    for node in probe.get("nodes", []):
        node_id = str(node["id"])
        name = str(node.get("name") or node_id)
        if name in names.values():
            name = f"{name}-{node_id[:6]}"
        names[node_id] = name
    return names


def device_ids(probe: Mapping[str, Any]) -> dict[str, list[str]]:
    """Node id -> the ids of its usable devices in a cluster built from this probe."""
    names = _node_names(probe)
    out: dict[str, list[str]] = {}
    for node in probe.get("nodes", []):
        node_id = str(node["id"])
        out[node_id] = [
            f"{names[node_id]}/{d.get('index', i)}"
            for i, d in enumerate(node.get("devices", []))
            if float(d.get("stream_gbs", 0)) > 0 and float(d.get("matmul_tflops", 0)) > 0
        ]
    return out


def live_cluster(
    probe: Mapping[str, Any], dtype: str, cal: LiveCalibration, *, reserve_bytes: int = 0
) -> Cluster:
    """The cost model's cluster from a probe result (`ProbeResult.to_json()`): each device
    streams at its measured figure for `dtype` (the first measured dtype when that one was not
    timed), CPU devices scaled by the fitted factors and given the per-layer overhead; every
    link costs its measured latency plus the fitted hop overhead."""
    nodes = []
    for node in probe.get("nodes", []):
        devices = []
        for d in node.get("devices", []):
            by_dtype = d.get("stream_by_dtype") or {}
            timed, factor = computed_as(dtype, str(d.get("compute_dtype") or ""))
            stream = float(by_dtype.get(timed) or d.get("stream_gbs") or 0.0)
            if timed not in by_dtype and stream > 0:
                log.warning(
                    "%s: no %s stream figure in the probe; using its %.2f GB/s",
                    node.get("name"), timed, stream,
                )  # fmt: skip
            stream /= factor
            matmul = float(d.get("matmul_tflops") or 0.0)
            extra: dict[str, Any] = {"stream_gbs": stream}
            if d.get("kind", "cpu") == "cpu":
                extra = {
                    "stream_gbs": stream * cal.cpu_stream_factor,
                    "matmul_tflops": matmul * cal.cpu_matmul_factor,
                    "per_layer_overhead_s": cal.cpu_per_layer_overhead_s,
                }
            devices.append({**d, **extra})
        nodes.append({**node, "devices": devices})
    adjusted = {**probe, "nodes": nodes}
    return Cluster.from_probe_json(
        adjusted, hop_overhead_s=cal.hop_overhead_s, reserve_bytes=reserve_bytes
    )


def live_workload(
    cal: LiveCalibration, context: int, prompt_tokens: int, concurrency: int = 1
) -> Workload:
    """A workload whose per-token costs and token path are the calibrated ones."""
    return Workload(
        context=context,
        prompt_tokens=prompt_tokens,
        concurrency=concurrency,
        sample_s=cal.token_overhead_s,
        ring_hop=cal.ring_hop,
    )


# --------------------------------------------------------------------------------------------
# Fitting


@dataclass(frozen=True)
class Observation:
    """One measured plan: what ran (model, the probe's cluster with no calibration applied,
    stages) and what was measured (medians over repeats)."""

    label: str
    model: ModelSpec
    probe: Mapping[str, Any]
    dtype: str
    placements: tuple[Placement, ...]
    prompt_tokens: int
    context: int
    ms_per_token: float
    ttft_s: float

    def cost(self, cal: LiveCalibration) -> PlanCost:
        """What the cost model predicts for this plan under `cal`."""
        cluster = live_cluster(self.probe, self.dtype, cal)
        return predict(
            self.model,
            cluster,
            self.placements,
            live_workload(cal, self.context, self.prompt_tokens),
        )


@dataclass(frozen=True)
class DecodeFit:
    """The linear decode fit under one token path."""

    ring_hop: bool
    inv_stream_factor: float
    per_layer_s: float
    hop_s: float
    token_s: float
    rms_rel_error: float  # root mean square of (predicted - measured) / measured

    @property
    def stream_factor(self) -> float:
        return 1.0 / self.inv_stream_factor


def _decode_features(obs: Observation, ring_hop: bool) -> tuple[list[float], float]:
    """([streaming s at factor 1, CPU layers, hops, 1], seconds the probed links cost)."""
    cost = obs.cost(replace(UNIT, ring_hop=ring_hop))
    stream = sum(s.weights_s + s.kv_s + s.head_s for s in cost.stages)
    cluster = live_cluster(obs.probe, obs.dtype, UNIT)
    cpu_layers = sum(
        p.end - p.start for p in obs.placements if cluster.device(p.device).kind == "cpu"
    )
    links = sum(h.latency_s + h.transfer_s for h in cost.hops)
    return [stream, float(cpu_layers), float(len(cost.hops)), 1.0], links


def _nnls(a: np.ndarray, b: np.ndarray, required: int = 0) -> np.ndarray | None:
    """Non-negative least squares by enumeration (4 unknowns: 15 subsets); column `required`
    must be in the solution. None when no subset gives a non-negative solution."""
    n = a.shape[1]
    best: tuple[float, np.ndarray] | None = None
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            if required not in cols:
                continue
            sub = a[:, cols]
            x_sub, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if (x_sub < 0).any():
                continue
            x = np.zeros(n)
            x[list(cols)] = x_sub
            sse = float(np.sum((a @ x - b) ** 2))
            if best is None or sse < best[0] - 1e-18:
                best = (sse, x)
    return None if best is None else best[1]


def fit_decode(observations: Sequence[Observation], ring_hop: bool) -> DecodeFit:
    """Least squares on relative errors of decode time per token, all constants >= 0."""
    if len(observations) < 4:
        raise ValueError(f"a decode fit needs at least 4 measured plans, got {len(observations)}")
    rows, targets = [], []
    for o in observations:
        feats, links = _decode_features(o, ring_hop)
        t = o.ms_per_token * 1e-3
        rows.append([f / t for f in feats])  # divided by the measurement: relative errors
        targets.append((t - links) / t)
    a, b = np.asarray(rows), np.asarray(targets)
    x = _nnls(a, b, required=0)
    if x is None or x[0] <= 0:
        raise ValueError("no non-negative decode fit: the measurements contradict the model")
    rms = float(np.sqrt(np.mean((a @ x - b) ** 2)))
    return DecodeFit(ring_hop, float(x[0]), float(x[1]), float(x[2]), float(x[3]), rms)


def _ttft_rms(observations: Sequence[Observation], cal: LiveCalibration) -> float:
    errs = [(o.cost(cal).ttft_s - o.ttft_s) / o.ttft_s for o in observations]
    return float(math.sqrt(sum(e * e for e in errs) / len(errs)))


def fit_matmul_factor(
    observations: Sequence[Observation], cal: LiveCalibration
) -> tuple[float, float]:
    """(matmul factor, RMS relative TTFT error): a search over log(factor) on the cost model
    itself, the decode constants held at `cal`."""

    def rms_at(log_f: float) -> float:
        return _ttft_rms(observations, replace(cal, cpu_matmul_factor=math.exp(log_f)))

    grid = np.linspace(math.log(0.01), math.log(10.0), 61)
    values = [rms_at(float(g)) for g in grid]
    i = int(np.argmin(values))
    lo, hi = float(grid[max(0, i - 1)]), float(grid[min(len(grid) - 1, i + 1)])
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(40):  # golden-section refinement inside the best grid cell's neighbours
        c, d = hi - golden * (hi - lo), lo + golden * (hi - lo)
        if rms_at(c) <= rms_at(d):
            hi = d
        else:
            lo = c
    best = (lo + hi) / 2
    return math.exp(best), rms_at(best)


@dataclass(frozen=True)
class FitResult:
    calibration: LiveCalibration
    decode: DecodeFit  # the token path kept
    other: DecodeFit | None  # the token path rejected (None when it could not be fitted)
    ttft_rms_rel_error: float
    observations: int

    def summary(self) -> str:
        d = self.decode
        text = (
            f"decode RMS relative error {d.rms_rel_error:.1%} over {self.observations} plans "
            f"with the token returning via {'a ring hop' if d.ring_hop else 'the coordinator'}"
        )
        if self.other is not None:
            text += f" (the other path: {self.other.rms_rel_error:.1%})"
        return text + f"; TTFT RMS relative error {self.ttft_rms_rel_error:.1%}"


def fit(observations: Sequence[Observation]) -> FitResult:
    """Every live constant from measured plans (see the module docstring)."""
    if len(observations) < 4:
        raise ValueError(f"a fit needs at least 4 measured plans, got {len(observations)}")
    fits = []
    for ring in (False, True):
        try:
            fits.append(fit_decode(observations, ring))
        except ValueError as e:
            log.info("decode fit with ring_hop=%s failed: %s", ring, e)
    if not fits:
        raise ValueError("no decode fit: the measurements contradict the model")
    fits.sort(key=lambda f: f.rms_rel_error)
    d = fits[0]
    cal = LiveCalibration(
        cpu_stream_factor=d.stream_factor,
        cpu_matmul_factor=1.0,
        cpu_per_layer_overhead_s=d.per_layer_s,
        hop_overhead_s=d.hop_s,
        token_overhead_s=d.token_s,
        ring_hop=d.ring_hop,
    )
    factor, ttft_rms = fit_matmul_factor(observations, cal)
    return FitResult(
        calibration=replace(cal, cpu_matmul_factor=factor),
        decode=d,
        other=fits[1] if len(fits) > 1 else None,
        ttft_rms_rel_error=ttft_rms,
        observations=len(observations),
    )


# --------------------------------------------------------------------------------------------
# Storing


def constant_rows(result: FitResult, provenance: str) -> dict[str, tuple[str, str, str, str]]:
    """calibration.csv rows (key -> value, unit, status, source) for a fit."""
    c = result.calibration
    base = f"{provenance}; {result.summary()}"
    return {
        "cpu_stream_factor": (
            f"{c.cpu_stream_factor:.4f}", "ratio", "fitted here",
            "Decode weight streaming achieved on CPU nodes / the probe's stream figure for "
            f"the model's dtype. {base}",
        ),
        "cpu_matmul_factor": (
            f"{c.cpu_matmul_factor:.4f}", "ratio", "fitted here",
            "Prefill matmul throughput achieved on CPU nodes / the probe's matmul figure "
            f"(fitted on TTFT with the decode constants fixed). {base}",
        ),
        "cpu_per_layer_overhead_us": (
            f"{c.cpu_per_layer_overhead_s * 1e6:.1f}", "us", "fitted here",
            "Fixed cost per layer per token on a CPU device (MLX op dispatch; norms and "
            f"attention at short context). {base}",
        ),
        "live_hop_overhead_us": (
            f"{c.hop_overhead_s * 1e6:.1f}", "us", "fitted here",
            "Cost of a decode hop on live clusters beyond the probe's echo latency (the "
            f"receiving stage's hand-off, tensor encoding, one more stage). {base}",
        ),
        "token_overhead_us": (
            f"{c.token_overhead_s * 1e6:.1f}", "us", "fitted here",
            "Fixed cost per generated token on live clusters whatever the plan: sampling and "
            f"the token's way back into stage 0 (Workload.sample_s). {base}",
        ),
        "ring_hop": (
            "1" if c.ring_hop else "0", "flag", "fitted here",
            "1: the last stage sends the sampled token straight to stage 0 (one hop when "
            "split); 0: it returns through the coordinator for every plan. Chosen by the "
            f"smaller residual of the two decode fits. {base}",
        ),
    }  # fmt: skip


def write_constants(
    rows: Mapping[str, tuple[str, str, str, str]], path: Path = CALIBRATION_CSV
) -> None:
    """Replace (or append) these keys' rows in calibration.csv, leaving every other line as it
    is; the catalog's cache is cleared so that the new values are read from now on."""
    lines = path.read_text().splitlines(keepends=True)
    done: set[str] = set()
    out: list[str] = []

    def render(key: str) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([key, *rows[key]])
        return buf.getvalue()

    for line in lines:
        key = line.split(",", 1)[0]
        if key in rows:
            out.append(render(key))
            done.add(key)
        else:
            out.append(line if line.endswith("\n") else line + "\n")
    out += [render(k) for k in rows if k not in done]
    path.write_text("".join(out))
    catalog.clear_cache()
