"""The planner: which devices take part, in which order, with which contiguous layer ranges.

Pure: (ModelSpec, Cluster, Workload, objective) -> PlanChoice. Nothing here measures or loads.

Objectives
    latency     minimise the single-stream decode time per token (the default);
    throughput  maximise min(m / t_token, 1 / slowest stage) for m requests in flight.

Search, up to `EXACT_LIMIT` (8) devices — exact:
    Stage costs and memory are tabulated once per device as (L+1) x (L+1) matrices over
    half-open ranges [s, e) (infinite where the stage does not fit), hop costs as a device x
    device matrix. A dynamic programme over (first device f, set S of devices used, last device
    d) holds, for every layer boundary e, the cheapest way to run layers [0, e) on S in some
    order that starts at f and ends at d. Extending by a device d' not in S is one min-plus
    vector-matrix product: new[e'] = min_s (min_d best[S, d][s] + hop(d, d')) + C[d'][s, e'],
    vectorised with numpy. The ring-closing hop (last -> first) is added when a plan completes,
    which is why the first device is part of the state. Every order of every subset is covered;
    partial plans already costlier than the best complete plan are pruned (all costs are >= 0).
    8 devices x 80 layers takes ~0.1-0.3 s.

    Throughput: for a bound B on the slowest stage, the cheapest plan whose stages all take
    <= B is the same DP with the stage tables masked above B; its objective is
    max(T_min(B) / m, B'). T_min(B) / m falls and B rises as B grows, so the optimum sits at the
    crossing, found by bisection over the distinct stage times (about 15 DP runs).

Beyond 8 devices — heuristic (documented in docs/planning.md):
    For a fixed device order, a DP over (first, last position, layer) chooses the best
    subsequence of devices and their layer ranges exactly. Orders are searched by local search
    (move one device to another position, keep improvements) from three seeds: devices grouped
    by node with the fastest nodes first, all devices by stream bandwidth, all devices by free
    memory; it stops when a full sweep finds nothing better or after `HEURISTIC_BUDGET_S`.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from coordinator.costmodel import (
    GIB,
    TOKEN_ID_BYTES,
    Cluster,
    DeviceSpec,
    ModelSpec,
    Placement,
    PlanCost,
    Workload,
    predict,
    working_bytes,
)
from coordinator.plan import Plan, Prediction, Stage, split_by_weights

log = logging.getLogger(__name__)

Objective = Literal["latency", "throughput"]
OBJECTIVES: tuple[str, ...] = ("latency", "throughput")
EXACT_LIMIT = 8
HEURISTIC_BUDGET_S = 1.5

Array = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
INF = math.inf


@dataclass(frozen=True)
class PlanChoice:
    """The planner's answer: stages in pipeline order and what they will cost."""

    model: str
    objective: str
    concurrency: int
    placements: tuple[Placement, ...]  # empty when nothing fits
    cost: PlanCost | None
    explanation: str
    exact: bool  # exhaustive over orders and subsets (<= EXACT_LIMIT devices)

    @property
    def fits(self) -> bool:
        return self.cost is not None and self.cost.fits

    @property
    def bottleneck(self) -> str:
        return self.cost.bottleneck if self.cost else ""

    @property
    def prediction(self) -> Prediction | None:
        if self.cost is None:
            return None
        return Prediction(
            decode_tps=self.cost.decode_tps,
            ttft_s=self.cost.ttft_s,
            throughput_tps=self.cost.throughput_tps,
            bottleneck=self.cost.bottleneck,
            stage_s=tuple(s.total_s for s in self.cost.stages),
        )

    def objective_value(self) -> float:
        """Seconds per token (latency) or per generated token overall (throughput); lower wins."""
        if self.cost is None:
            return INF
        return objective_s(self.cost, self.objective, self.concurrency)


def objective_s(cost: PlanCost, objective: str, concurrency: int) -> float:
    """The quantity the planner minimises: t_token, or max(t_token / m, slowest stage)."""
    if objective == "latency":
        return cost.token_s
    return max(cost.token_s / concurrency, cost.slowest_stage_s)


# --------------------------------------------------------------------------------------------
# Tables


@dataclass(frozen=True)
class _Tables:
    devices: tuple[DeviceSpec, ...]
    layers: int
    stage: Array  # (n, L+1, L+1) decode seconds of stage [s, e) on device; inf if it won't fit
    hop: Array  # (n, n) seconds of a decode hop i -> j; inf if no link or i == j
    ring: Array  # (n, n) seconds of the ring-closing hop last -> first


def _tables(model: ModelSpec, cluster: Cluster, workload: Workload) -> _Tables:
    """Vectorised versions of costmodel.stage_decode_cost / stage_memory / hop_cost."""
    L = model.layers
    prefix = np.asarray(model.prefix_bytes, dtype=np.float64)
    s_idx = np.arange(L + 1)[:, None]
    e_idx = np.arange(L + 1)[None, :]
    valid = e_idx > s_idx
    nlayers = (e_idx - s_idx).astype(np.float64)
    layer_b = prefix[None, :] - prefix[:, None]  # [s, e] -> bytes of layers [s, e)
    first = s_idx == 0
    last = e_idx == L

    # Memory of a stage (same formula as costmodel.stage_weight_bytes / stage_memory).
    weights = layer_b + np.where(first, model.embed_bytes, 0) + np.where(last, model.head_bytes, 0)
    if model.tied_embeddings:
        both = max(model.embed_bytes, model.head_bytes)
        weights[0, L] = prefix[L] + both
    kv_mem = nlayers * model.kv_bytes_per_token_layer * workload.context
    work = np.where(
        last, working_bytes(model, workload, True), working_bytes(model, workload, False)
    )
    mem = weights + kv_mem + work

    kv_read = nlayers * model.kv_bytes_per_token_layer * workload.prompt_tokens
    n = len(cluster.devices)
    stage = np.full((n, L + 1, L + 1), INF)
    for k, d in enumerate(cluster.devices):
        bw = d.stream_gbs * 1e9
        # Sum in the same order as StageCost.total_s so that DP and predict agree bit for bit
        # as closely as floating point allows.
        t = layer_b / bw + kv_read / bw + nlayers * d.per_layer_overhead_s
        t = t + np.where(last, model.head_bytes / bw + workload.sample_s, 0.0)
        ok = valid & (mem <= d.mem_free_bytes)
        stage[k] = np.where(ok, t, INF)

    hop = np.full((n, n), INF)
    ring = np.full((n, n), INF)
    for i, a in enumerate(cluster.devices):
        for j, b in enumerate(cluster.devices):
            if i == j:
                continue
            if not workload.ring_hop:
                ring[i, j] = 0.0  # the token returns through the coordinator: in sample_s
            try:
                lk = cluster.link(a.id, b.id)
            except KeyError:
                continue
            hop[i, j] = lk.latency_s + model.hop_bytes_per_token / lk.bandwidth_Bps + lk.overhead_s
            if workload.ring_hop:
                ring[i, j] = lk.latency_s + TOKEN_ID_BYTES / lk.bandwidth_Bps + lk.overhead_s
    return _Tables(tuple(cluster.devices), L, stage, hop, ring)


Seq = tuple[tuple[int, int, int], ...]  # (device index, start, end) per stage
_NONE: Seq = ()


# --------------------------------------------------------------------------------------------
# Exact search over subsets and orders


def _exact(tb: _Tables, stage: Array, upper: float = INF) -> tuple[float, Seq]:
    """Cheapest sum of stage and hop times over all ordered subsets; (inf, ()) if none fits."""
    n, L = len(tb.devices), tb.layers
    best_cost, best_seq = upper, _NONE
    full = 1 << n
    for f in range(n):
        row0 = stage[f, 0]
        if not np.isfinite(row0).any():
            continue
        start_set = 1 << f
        layers: dict[tuple[int, int], Array] = {(start_set, f): row0}
        back: dict[tuple[int, int], tuple[IntArray, IntArray]] = {}
        if row0[L] < best_cost:
            best_cost, best_seq = float(row0[L]), ((f, 0, L),)
        for used in range(start_set, full):
            if not used & start_set:
                continue
            ds = [d for d in range(n) if used >> d & 1 and (used, d) in layers]
            if not ds:
                continue
            block = np.stack([layers[(used, d)] for d in ds])  # (k, L+1)
            if used != start_set:
                # Later last devices first, so that exact ties keep the devices in list order.
                for i, d in reversed(list(enumerate(ds))):
                    total = float(block[i, L] + tb.ring[d, f])
                    if total < best_cost:
                        best_cost = total
                        best_seq = _unwind(back, used, d, L, start_set)
            if float(block[:, 1:L].min()) >= best_cost:
                continue
            ds_arr = np.asarray(ds)
            for d2 in range(n):
                if used >> d2 & 1:
                    continue
                g_all = block + tb.hop[ds_arr, d2][:, None]  # (k, L+1): ready at s via d
                arg_d = _last_argmin(g_all)
                g = g_all[arg_d, np.arange(L + 1)]
                g[0] = INF  # only the first stage starts at layer 0
                g[L] = INF
                if float(g.min()) >= best_cost:
                    continue
                m = g[:, None] + stage[d2]  # (L+1, L+1) over [s, e')
                arg_s = m.argmin(axis=0)
                new = m[arg_s, np.arange(L + 1)]
                if not float(new.min()) < best_cost:
                    continue
                key = (used | 1 << d2, d2)
                layers[key] = new
                back[key] = (arg_s, ds_arr[arg_d])
    return best_cost, best_seq


def _last_argmin(a: Array) -> IntArray:
    """Row of the minimum per column, the last row on ties (keeps devices in list order)."""
    return np.asarray(a.shape[0] - 1 - a[::-1].argmin(axis=0), dtype=np.int64)


def _unwind(
    back: Mapping[tuple[int, int], tuple[IntArray, IntArray]], used: int, d: int, e: int, start: int
) -> Seq:
    out: list[tuple[int, int, int]] = []
    while used != start:
        arg_s, arg_d = back[(used, d)]
        s = int(arg_s[e])
        out.append((d, s, e))
        used &= ~(1 << d)
        d, e = int(arg_d[s]), s
    out.append((d, 0, e))
    return tuple(reversed(out))


# --------------------------------------------------------------------------------------------
# Heuristic beyond EXACT_LIMIT devices: exact for a fixed order, local search over orders


def _best_for_order(tb: _Tables, stage: Array, order: Sequence[int]) -> tuple[float, Seq]:
    """Best subsequence of `order` with its layer ranges (exact for this order)."""
    L = tb.layers
    best_cost, best_seq = INF, _NONE
    k = len(order)
    for fi in range(k):
        f = order[fi]
        rows: dict[int, Array] = {fi: stage[f, 0]}
        back: dict[int, tuple[IntArray, IntArray]] = {}
        if stage[f, 0, L] < best_cost:
            best_cost, best_seq = float(stage[f, 0, L]), ((f, 0, L),)
        for j in range(fi + 1, k):
            prev = [i for i in range(fi, j) if i in rows]
            if not prev:
                continue
            block = np.stack([rows[i] for i in prev])
            hops = tb.hop[[order[i] for i in prev], order[j]][:, None]
            g_all = block + hops
            arg_i = _last_argmin(g_all)
            g = g_all[arg_i, np.arange(L + 1)]
            g[0] = INF
            g[L] = INF
            if not np.isfinite(g).any():
                continue
            m = g[:, None] + stage[order[j]]
            arg_s = m.argmin(axis=0)
            new = m[arg_s, np.arange(L + 1)]
            if not np.isfinite(new).any():
                continue
            rows[j] = new
            back[j] = (arg_s, np.asarray(prev)[arg_i])
            total = float(new[L] + tb.ring[order[j], f])
            if total < best_cost:
                best_cost = total
                out: list[tuple[int, int, int]] = []
                pos, e = j, L
                while pos != fi:
                    a_s, a_i = back[pos]
                    s = int(a_s[e])
                    out.append((order[pos], s, e))
                    pos, e = int(a_i[s]), s
                out.append((f, 0, e))
                best_seq = tuple(reversed(out))
    return best_cost, best_seq


def _seed_orders(tb: _Tables) -> list[list[int]]:
    devs = tb.devices
    n = len(devs)
    by_bw = sorted(range(n), key=lambda i: -devs[i].stream_gbs)
    by_mem = sorted(range(n), key=lambda i: -devs[i].mem_free_bytes)
    nodes: dict[str, list[int]] = {}
    for i in by_bw:
        nodes.setdefault(devs[i].node, []).append(i)
    grouped = [i for members in nodes.values() for i in members]
    seeds: list[list[int]] = []
    for o in (grouped, by_bw, by_mem):
        if o not in seeds:
            seeds.append(o)
    return seeds


def _heuristic(
    tb: _Tables, stage: Array, budget_s: float = HEURISTIC_BUDGET_S
) -> tuple[float, Seq]:
    deadline = time.perf_counter() + budget_s
    best_cost, best_seq, best_order = INF, _NONE, list(range(len(tb.devices)))
    for order in _seed_orders(tb):
        c, s = _best_for_order(tb, stage, order)
        if c < best_cost:
            best_cost, best_seq, best_order = c, s, order
    n = len(best_order)
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for a, b in itertools.permutations(range(n), 2):
            if time.perf_counter() >= deadline:
                break
            order = best_order[:a] + best_order[a + 1 :]
            order.insert(b, best_order[a])
            c, s = _best_for_order(tb, stage, order)
            if c < best_cost - 1e-15:
                best_cost, best_seq, best_order = c, s, order
                improved = True
    return best_cost, best_seq


def _balance(tb: _Tables, seq: Seq) -> Seq:
    """Among plans of equal total time, prefer even stages: move each boundary to where the
    slower of its two stages is fastest, never raising the total (ties between identical
    devices otherwise leave lopsided splits). Only stage times change; hops do not."""
    out = list(seq)
    st = tb.stage
    for _ in range(2):
        for i in range(len(out) - 1):
            (da, s, b), (db, _, e) = out[i], out[i + 1]
            pair = float(st[da, s, b] + st[db, b, e])
            slack = 1e-12 * max(pair, 1e-9)
            best_b, best_max = b, max(float(st[da, s, b]), float(st[db, b, e]))
            for c in range(s + 1, e):
                ta, tb_ = float(st[da, s, c]), float(st[db, c, e])
                if ta + tb_ <= pair + slack and max(ta, tb_) < best_max - slack:
                    best_b, best_max = c, max(ta, tb_)
            out[i], out[i + 1] = (da, s, best_b), (db, best_b, e)
    return tuple(out)


# --------------------------------------------------------------------------------------------
# Objectives


Search = Callable[[_Tables, Array], tuple[float, Seq]]


def _throughput(tb: _Tables, m: int, search: Search) -> tuple[float, Seq]:
    """min over stage-time bounds B of max(T_min(B) / m, B), by bisection on the crossing."""

    def value(seq: Seq, t: float) -> float:
        slowest = max(float(tb.stage[d, s, e]) for d, s, e in seq)
        return max(t / m, slowest)

    t0, seq0 = search(tb, tb.stage)
    if not seq0:
        return INF, ()
    best_v, best_seq = value(seq0, t0), seq0
    slowest0 = max(float(tb.stage[d, s, e]) for d, s, e in seq0)
    if t0 / m >= slowest0:
        return best_v, best_seq  # the latency optimum already has no binding stage
    finite = tb.stage[np.isfinite(tb.stage)]
    cands = np.unique(finite[finite <= slowest0])
    memo: dict[int, tuple[float, Seq]] = {}

    def solve(i: int) -> tuple[float, Seq]:
        if i not in memo:
            masked = np.where(tb.stage <= cands[i], tb.stage, INF)
            memo[i] = search(tb, masked)
        return memo[i]

    # Predicate P(i): T_min(cands[i]) / m <= cands[i]  (monotone in i); find the first true.
    lo, hi = 0, len(cands) - 1
    if hi < 0:
        return best_v, best_seq
    while lo < hi:
        mid = (lo + hi) // 2
        t, _ = solve(mid)
        if t / m <= cands[mid]:
            hi = mid
        else:
            lo = mid + 1
    for i in (lo - 1, lo):
        if 0 <= i < len(cands):
            t, seq = solve(i)
            if seq and value(seq, t) < best_v:
                best_v, best_seq = value(seq, t), seq
    return best_v, best_seq


# --------------------------------------------------------------------------------------------
# Public entry points


def plan(
    model: ModelSpec,
    cluster: Cluster,
    workload: Workload | None = None,
    objective: str = "latency",
    *,
    exact_limit: int = EXACT_LIMIT,
) -> PlanChoice:
    """Choose devices, order and layer ranges for `model` on `cluster`."""
    workload = workload or Workload()
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    if not cluster.devices:
        raise ValueError("the cluster has no devices")
    tb = _tables(model, cluster, workload)
    exact = len(cluster.devices) <= exact_limit
    search: Search = _exact if exact else _heuristic
    if not exact and objective == "throughput":
        # The bisection runs ~15 searches: share the heuristic's time budget among them.
        search = functools.partial(_heuristic, budget_s=HEURISTIC_BUDGET_S / 8)
    if objective == "latency":
        _, seq = search(tb, tb.stage)
        seq = _balance(tb, seq)
    else:
        _, seq = _throughput(tb, workload.concurrency, search)
    if not seq:
        return PlanChoice(
            model=model.name,
            objective=objective,
            concurrency=workload.concurrency,
            placements=(),
            cost=None,
            explanation=explain_no_fit(model, cluster, workload),
            exact=exact,
        )
    placements = tuple(Placement(tb.devices[d].id, s, e) for d, s, e in seq)
    cost = predict(model, cluster, placements, workload)
    return PlanChoice(
        model=model.name,
        objective=objective,
        concurrency=workload.concurrency,
        placements=placements,
        cost=cost,
        explanation=explain(model, cluster, workload, objective, cost, tb),
        exact=exact,
    )


def evaluate(
    model: ModelSpec,
    cluster: Cluster,
    placements: Sequence[Placement],
    workload: Workload | None = None,
    objective: str = "latency",
    explanation: str = "",
) -> PlanChoice:
    """A given split (e.g. a baseline) as a PlanChoice, costed by the same model."""
    workload = workload or Workload()
    cost = predict(model, cluster, placements, workload)
    return PlanChoice(
        model=model.name,
        objective=objective,
        concurrency=workload.concurrency,
        placements=tuple(placements),
        cost=cost,
        explanation=explanation,
        exact=False,
    )


def even_split(model: ModelSpec, devices: Sequence[DeviceSpec]) -> tuple[Placement, ...]:
    """mlx-lm's pipeline split: every listed device, equal layer counts, in the given order."""
    ranges = split_by_weights(model.layers, [1.0] * len(devices))
    return tuple(Placement(d.id, s, e) for d, (s, e) in zip(devices, ranges, strict=True))


def memory_split(model: ModelSpec, devices: Sequence[DeviceSpec]) -> tuple[Placement, ...]:
    """exo's split: every listed device, layer counts proportional to free memory."""
    ranges = split_by_weights(model.layers, [max(1.0, float(d.mem_free_bytes)) for d in devices])
    return tuple(Placement(d.id, s, e) for d, (s, e) in zip(devices, ranges, strict=True))


def to_plan(
    choice: PlanChoice,
    num_layers: int,
    nodes: Mapping[str, tuple[str, str, str, str]],
    *,
    version: int = 1,
) -> Plan:
    """The immutable Plan the runner loads. `nodes` maps device id -> (node_id, node_name,
    address, device label as the node knows it, e.g. "0")."""
    if not choice.placements:
        raise ValueError(f"no plan: {choice.explanation}")
    stages = []
    for p in choice.placements:
        try:
            node_id, node_name, address, device = nodes[p.device]
        except KeyError:
            raise KeyError(f"no node information for device {p.device!r}") from None
        stages.append(Stage(node_id, node_name, address, p.start, p.end, device))
    return Plan(
        model=choice.model,
        num_layers=num_layers,
        stages=tuple(stages),
        version=version,
        explanation=choice.explanation,
        predicted=choice.prediction,
    )


# --------------------------------------------------------------------------------------------
# Explanations


def min_memory_bytes(model: ModelSpec, workload: Workload) -> int:
    """What the model needs at the least: all weights, the KV cache for the context, and one
    stage's working memory."""
    kv = model.layers * model.kv_bytes_per_token_layer * workload.context
    return model.weight_bytes + kv + working_bytes(model, workload, True)


def explain_no_fit(model: ModelSpec, cluster: Cluster, workload: Workload) -> str:
    need = min_memory_bytes(model, workload)
    have = sum(d.mem_free_bytes for d in cluster.devices)
    kv = model.layers * model.kv_bytes_per_token_layer * workload.context
    if have < need:
        return (
            f"does not fit: {model.name} needs {need / GIB:.1f} GiB (weights "
            f"{model.weight_bytes / GIB:.1f} + KV cache {kv / GIB:.1f} at context "
            f"{workload.context} + working memory) but the devices have {have / GIB:.1f} GiB "
            f"free in total: short by {(need - have) / GIB:.1f} GiB"
        )
    return (
        f"does not fit: the devices have {have / GIB:.1f} GiB free in total, enough for the "
        f"{need / GIB:.1f} GiB {model.name} needs, but not in usable pieces (each stage holds "
        f"whole layers plus its working memory, and the links must join the devices)"
    )


def explain(
    model: ModelSpec,
    cluster: Cluster,
    workload: Workload,
    objective: str,
    cost: PlanCost,
    tb: _Tables | None = None,
) -> str:
    """One line: why this plan."""
    tb = tb or _tables(model, cluster, workload)
    L = tb.layers
    singles = [(float(tb.stage[i, 0, L]), d) for i, d in enumerate(tb.devices)]
    fitting = [(t, d) for t, d in singles if math.isfinite(t)]
    ms = 1e3
    if len(cost.stages) == 1:
        d = cluster.device(cost.placements[0].device)
        mem = cost.memory[0]
        used = f"{mem.total_bytes / GIB:.1f} of {mem.free_bytes / GIB:.1f} GiB"
        if len(cluster.devices) == 1:
            return f"everything on {cluster.label(d.id)}, the only device: it fits ({used})"
        why = "splitting only adds hops"
        if objective == "throughput" and workload.concurrency > 1:
            why = f"splitting would not raise throughput at {workload.concurrency} requests"
        return (
            f"everything on {cluster.label(d.id)}: it fits ({used}) and is the fastest; {why} "
            f"({cost.token_s * ms:.1f} ms per token on one device)"
        )
    stages = ", ".join(f"{s.label} [{s.start}, {s.end})" for s in cost.stages)
    hop_share = 100.0 * cost.hops_s / cost.token_s
    if objective == "throughput" and workload.concurrency > 1:
        head = (
            f"{len(cost.stages)} stages for {workload.concurrency} requests in flight: "
            f"{cost.throughput_tps:.1f} tok/s"
        )
        if fitting:
            t1, d1 = min(fitting, key=lambda x: x[0])
            head += f" vs {1.0 / t1:.1f} tok/s on {cluster.label(d1.id)} alone"
        return f"{head}; {stages}"
    if not fitting:
        largest = max(cluster.devices, key=lambda d: d.mem_free_bytes)
        return (
            f"{len(cost.stages)} stages because no single device holds the model "
            f"({min_memory_bytes(model, workload) / GIB:.1f} GiB needed, largest "
            f"{cluster.label(largest.id)} has {largest.mem_free_bytes / GIB:.1f} GiB); {stages}; "
            f"hops cost {hop_share:.0f}% of the token"
        )
    t1, d1 = min(fitting, key=lambda x: x[0])
    return (
        f"{len(cost.stages)} stages: faster than {cluster.label(d1.id)} alone ({cost.token_s * ms:.1f} vs "
        f"{t1 * ms:.1f} ms per token) because faster devices take layers it would stream "
        f"slowly; {stages}; hops cost {hop_share:.0f}% of the token"
    )
