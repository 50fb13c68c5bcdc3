"""Serving plans with replicas: one or more pipelines, each holding the whole model on devices
of its own, and which mix of them serves M concurrent requests best.

Pure: (ModelSpec, Cluster, Workload) -> ServingChoice. Nothing here measures or loads.

Candidates. For every replica count R (1 .. number of devices, or the one `replicas` fixes),
the devices are split into R groups in up to three ways, duplicates dropped:
    contiguous  the devices in locality order (grouped by node, fastest node first, fastest
                device first inside a node) cut into R runs of near-equal length: keeps a
                replica's hops inside one machine where it can;
    dealt       the devices by stream bandwidth dealt round-robin to the R groups: even
                replicas out of uneven devices;
    by memory   locality order, each group closed as soon as its free memory holds the model,
                the rest dealt to the groups made: as many replicas as memory allows.
Each group's pipeline is chosen by the single-pipeline planner (coordinator/planner.py, the
throughput objective at the group's even share of the M requests): it may leave some of the
group's devices out, so "one pipeline over everything" is the R = 1 candidate.

Predictions. A pipeline with m requests in flight yields min(m / t_token, 1 / slowest stage)
tokens/s (costmodel.throughput_at; batched decode is not modelled, as for one pipeline). The
M requests are shared the way the router sends them: one at a time, each to the replica where
it would decode fastest (`share_requests`). Aggregate tokens/s is the sum over replicas;
per-request tokens/s is the slowest request's rate (its replica's throughput / its load).
CPU devices of one host share its cores (the probe times them one after another, each with
the machine to itself): where the stages and hop overheads on a set of cores would need more
than one second per core per second, the replicas on them are scaled down to fit
(`host_capped`).

Choice. The candidate with the highest aggregate whose per-request rate is >= `min_tps`;
ties (within 1e-6) go to fewer replicas, then fewer devices. When no candidate reaches
`min_tps` the one with the fastest per-request rate is chosen and the explanation says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from coordinator.costmodel import (
    Cluster,
    DeviceSpec,
    ModelSpec,
    PlanCost,
    Workload,
    describe_bottleneck,
)
from coordinator.plan import ServingPlan
from coordinator.planner import PlanChoice, explain_no_fit, plan, to_plan

__all__ = [
    "Candidate",
    "ServingChoice",
    "choose",
    "device_groups",
    "plan_serving",
    "share_requests",
    "to_serving_plan",
]

TIE = 1e-6


@dataclass(frozen=True)
class Candidate:
    """One way to serve: device groups, the pipeline chosen on each, and what it predicts."""

    grouping: str  # "contiguous" | "dealt" | "by memory"
    groups: tuple[tuple[str, ...], ...]  # device ids offered to each replica
    pipelines: tuple[PlanChoice, ...]  # one per group (a group that cannot hold it: no fit)
    shares: tuple[int, ...]  # requests in flight on each replica at the workload's M
    aggregate_tps: float
    per_request_tps: float  # the slowest request's decode rate
    concurrency: int
    shared_hosts: tuple[str, ...] = ()  # hosts whose CPU capped the replicas on them

    @property
    def replicas(self) -> int:
        return len(self.groups)

    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.pipelines)

    @property
    def devices_used(self) -> int:
        return sum(len(p.placements) for p in self.pipelines)

    @property
    def shape(self) -> str:
        """ "1 pipeline of 3 stages", "2 replicas of 1 stage + 1 of 2 stages"."""
        if not self.fits:
            return f"{self.replicas} replica(s): a group cannot hold the model"
        counts: dict[int, int] = {}
        for p in self.pipelines:
            counts[len(p.placements)] = counts.get(len(p.placements), 0) + 1
        parts = []
        for stages, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            what = "pipeline" if self.replicas == 1 else ("replica" if n == 1 else "replicas")
            parts.append(f"{n} {what} of {stages} stage{'s' if stages > 1 else ''}")
        return " + ".join(parts)

    def at_shares(self) -> tuple[PlanChoice, ...]:
        """The pipelines costed at the requests each will hold (its own concurrency)."""
        out = []
        for p, m in zip(self.pipelines, self.shares, strict=True):
            if p.cost is None:
                out.append(p)
                continue
            cost = replace(p.cost, concurrency=max(1, m))
            cost = replace(cost, bottleneck=describe_bottleneck(cost))
            out.append(replace(p, concurrency=max(1, m), cost=cost))
        return tuple(out)

    def replica_tps(self) -> tuple[float, ...]:
        """Each replica's aggregate tokens/s at its share."""
        return tuple(
            p.cost.throughput_with(m) if p.cost is not None else 0.0
            for p, m in zip(self.pipelines, self.shares, strict=True)
        )


@dataclass(frozen=True)
class ServingChoice:
    """The planner's answer for serving M requests: every candidate weighed, and the chosen."""

    model: str
    concurrency: int
    min_tps: float | None
    replicas: int | None  # fixed by the caller, or None (the planner chose)
    candidates: tuple[Candidate, ...]
    chosen: Candidate | None
    explanation: str

    @property
    def fits(self) -> bool:
        return self.chosen is not None and self.chosen.fits


# --------------------------------------------------------------------------------------------
# Sharing requests among replicas


def share_requests(rates: Sequence[Callable[[int], float]], requests: int) -> tuple[int, ...]:
    """Requests per replica when each of `requests`, one after the other, goes where it
    would decode fastest: rate_i(m_i + 1) / (m_i + 1), the earlier replica on ties. `rates[i]`
    is replica i's aggregate tokens/s with m requests in flight."""
    shares = [0] * len(rates)
    if not rates:
        return ()
    for _ in range(requests):
        best, best_v = 0, -math.inf
        for i, rate in enumerate(rates):
            v = rate(shares[i] + 1) / (shares[i] + 1)
            if v > best_v * (1 + 1e-12):
                best, best_v = i, v
        shares[best] += 1
    return tuple(shares)


# --------------------------------------------------------------------------------------------
# Device groups


def _locality_order(devices: Sequence[DeviceSpec]) -> list[DeviceSpec]:
    """Grouped by node, the node with the fastest device first, fastest devices first."""
    by_node: dict[str, list[DeviceSpec]] = {}
    for d in sorted(devices, key=lambda d: -d.stream_gbs):
        by_node.setdefault(d.node, []).append(d)
    return [d for members in by_node.values() for d in members]


def _contiguous(order: Sequence[DeviceSpec], r: int) -> list[list[DeviceSpec]]:
    base, extra = divmod(len(order), r)
    out, start = [], 0
    for i in range(r):
        n = base + (1 if i < extra else 0)
        out.append(list(order[start : start + n]))
        start += n
    return out


def _dealt(devices: Sequence[DeviceSpec], r: int) -> list[list[DeviceSpec]]:
    out: list[list[DeviceSpec]] = [[] for _ in range(r)]
    for i, d in enumerate(sorted(devices, key=lambda d: -d.stream_gbs)):
        out[i % r].append(d)
    return out


def _by_memory(order: Sequence[DeviceSpec], need_bytes: int) -> list[list[DeviceSpec]]:
    groups: list[list[DeviceSpec]] = []
    current: list[DeviceSpec] = []
    held = 0
    for d in order:
        current.append(d)
        held += d.mem_free_bytes
        if held >= need_bytes:
            groups.append(current)
            current, held = [], 0
    if not groups:
        return [current]
    for i, d in enumerate(current):  # the rest cannot hold a replica: deal them out
        groups[i % len(groups)].append(d)
    return groups


def device_groups(
    cluster: Cluster, r: int, need_bytes: int
) -> list[tuple[str, tuple[tuple[str, ...], ...]]]:
    """(grouping name, device ids per group) for R = r, without duplicates."""
    order = _locality_order(cluster.devices)
    ways = [("contiguous", _contiguous(order, r)), ("dealt", _dealt(cluster.devices, r))]
    mem = _by_memory(order, need_bytes)
    if len(mem) == r:
        ways.append(("by memory", mem))
    seen: set[frozenset[frozenset[str]]] = set()
    out = []
    for name, groups in ways:
        if any(not g for g in groups):
            continue
        key = frozenset(frozenset(d.id for d in g) for g in groups)
        if key in seen:
            continue
        seen.add(key)
        out.append((name, tuple(tuple(d.id for d in g) for g in groups)))
    return out


# --------------------------------------------------------------------------------------------
# The search


def plan_serving(
    model: ModelSpec,
    cluster: Cluster,
    workload: Workload | None = None,
    *,
    replicas: int | None = None,
    min_tps: float | None = None,
) -> ServingChoice:
    """Compare one pipeline, R replicas and mixes for `workload.concurrency` requests."""
    from coordinator.planner import min_memory_bytes

    workload = workload or Workload()
    n = len(cluster.devices)
    if n == 0:
        raise ValueError("the cluster has no devices")
    if replicas is not None and not 1 <= replicas <= n:
        raise ValueError(f"replicas must be between 1 and {n} (the devices), not {replicas}")
    if min_tps is not None and min_tps <= 0:
        raise ValueError("min_tps must be positive")
    m = workload.concurrency
    need = min_memory_bytes(model, workload)
    memo: dict[tuple[frozenset[str], int], PlanChoice] = {}

    def pipeline(ids: tuple[str, ...], share: int) -> PlanChoice:
        key = (frozenset(ids), share)
        if key not in memo:
            sub = Cluster(tuple(cluster.device(i) for i in ids), cluster.links)
            if sum(cluster.device(i).mem_free_bytes for i in ids) < need:
                memo[key] = PlanChoice(
                    model=model.name,
                    objective="throughput",
                    concurrency=share,
                    placements=(),
                    cost=None,
                    explanation=explain_no_fit(model, sub, workload),
                    exact=True,
                )
            else:
                memo[key] = plan(model, sub, replace(workload, concurrency=share), "throughput")
        return memo[key]

    candidates: list[Candidate] = []
    same: set[tuple[object, ...]] = set()
    counts = [replicas] if replicas is not None else list(range(1, n + 1))
    for r in counts:
        share = max(1, math.ceil(m / r))
        for name, groups in device_groups(cluster, r, need):
            pipes = tuple(pipeline(g, share) for g in groups)
            c = _candidate(name, groups, pipes, m, cluster)
            # Identical devices grouped two ways predict the same: keep the first.
            key = (r, c.shape, c.shares, round(c.aggregate_tps, 9), round(c.per_request_tps, 9))
            if key not in same:
                same.add(key)
                candidates.append(c)
    chosen, why = choose(candidates, min_tps)
    explanation = why if chosen is None else f"{chosen.shape}: {why}"
    return ServingChoice(
        model=model.name,
        concurrency=m,
        min_tps=min_tps,
        replicas=replicas,
        candidates=tuple(candidates),
        chosen=chosen,
        explanation=explanation,
    )


def _candidate(
    name: str,
    groups: tuple[tuple[str, ...], ...],
    pipes: tuple[PlanChoice, ...],
    m: int,
    cluster: Cluster,
) -> Candidate:
    if not all(p.fits for p in pipes):
        return Candidate(name, groups, pipes, (0,) * len(groups), 0.0, 0.0, m)
    costs = [p.cost for p in pipes if p.cost is not None]
    shares = share_requests([c.throughput_with for c in costs], m)
    rates = [c.throughput_with(k) for c, k in zip(costs, shares, strict=True)]
    rates, shared = host_capped(rates, [host_work(c, cluster) for c in costs])
    per_request = min(rate / k for rate, k in zip(rates, shares, strict=True) if k > 0)
    return Candidate(name, groups, pipes, shares, sum(rates), per_request, m, shared)


CpuKey = tuple[str, tuple[int, ...]]  # (host, the cores its devices there run on)


def host_work(cost: PlanCost, cluster: Cluster) -> dict[CpuKey, float]:
    """CPU seconds one decoded token of this pipeline costs each set of cores: its stages on
    CPU devices (by host and the cores they may run on), and the software overhead of the
    hops those stages send."""
    out: dict[CpuKey, float] = {}
    for st in cost.stages:
        d = cluster.device(st.device)
        if d.kind == "cpu" and d.host:
            key = (d.host, d.cores)
            out[key] = out.get(key, 0.0) + st.total_s
    for hop in cost.hops:
        d = cluster.device(hop.src)
        if d.kind == "cpu" and d.host:
            key = (d.host, d.cores)
            out[key] = out.get(key, 0.0) + hop.overhead_s
    return out


def host_capped(
    rates: Sequence[float], works: Sequence[Mapping[CpuKey, float]]
) -> tuple[list[float], tuple[str, ...]]:
    """Rates scaled down where CPU devices would need more of their cores than there are:
    each device was timed with the host to itself, so devices on the same cores share them
    (one second per core per second), and a host's devices share all the cores they run on.
    Cores unknown (a node that does not say): one. A replica on several capped sets takes the
    smallest of their scales; the hosts named are those where a cap applied."""
    load: dict[CpuKey, float] = {}
    host_load: dict[str, float] = {}
    host_cores: dict[str, set[int]] = {}
    for rate, work in zip(rates, works, strict=True):
        for key, seconds in work.items():
            load[key] = load.get(key, 0.0) + rate * seconds
            host_load[key[0]] = host_load.get(key[0], 0.0) + rate * seconds
            host_cores.setdefault(key[0], set()).update(key[1])
    scale = {k: max(1, len(k[1])) / w for k, w in load.items() if w > max(1, len(k[1]))}
    host_scale = {
        h: max(1, len(host_cores[h])) / w
        for h, w in host_load.items()
        if w > max(1, len(host_cores[h]))
    }

    def factor(work: Mapping[CpuKey, float]) -> float:
        limits = [scale[k] for k in work if k in scale]
        limits += [host_scale[k[0]] for k in work if k[0] in host_scale]
        return min(limits, default=1.0)

    out = [rate * factor(work) for rate, work in zip(rates, works, strict=True)]
    capped = {k[0] for k in scale} | set(host_scale)
    return out, tuple(sorted(capped))


def choose(candidates: Sequence[Candidate], min_tps: float | None) -> tuple[Candidate | None, str]:
    fitting = [c for c in candidates if c.fits]
    if not fitting:
        return None, (
            "no candidate fits: " + candidates[0].pipelines[0].explanation
            if candidates and candidates[0].pipelines
            else "no candidate fits"
        )
    ok = [c for c in fitting if min_tps is None or c.per_request_tps >= min_tps]
    if not ok:
        best = max(fitting, key=lambda c: (c.per_request_tps, -c.replicas))
        return best, (
            f"no candidate keeps every request at {min_tps:g} tok/s; the fastest per request "
            f"gives {best.per_request_tps:.1f} tok/s ({best.aggregate_tps:.1f} in all)"
        )
    top = max(c.aggregate_tps for c in ok)
    tied = [c for c in ok if c.aggregate_tps >= top * (1 - TIE)]
    best = min(tied, key=lambda c: (c.replicas, c.devices_used))
    why = (
        f"{best.aggregate_tps:.1f} tok/s in all, {best.per_request_tps:.1f} per request at "
        f"{best.concurrency} in flight"
    )
    if best.shared_hosts:
        why += f" (capped by the CPU of {', '.join(best.shared_hosts)}, shared by its stages)"
    one = [c for c in fitting if c.replicas == 1]
    if best.replicas > 1 and one:
        why += f" (one pipeline: {one[0].aggregate_tps:.1f} in all)"
    elif best.replicas == 1:
        more = [c for c in ok if c.replicas > 1]
        if more:
            alt = max(more, key=lambda c: c.aggregate_tps)
            why += f"; more replicas would not raise it ({alt.shape}: {alt.aggregate_tps:.1f})"
    if min_tps is not None:
        why += f"; every request >= {min_tps:g} tok/s"
    return best, why


# --------------------------------------------------------------------------------------------
# To loadable plans


def to_serving_plan(
    choice: ServingChoice,
    num_layers: int,
    nodes: Mapping[str, tuple[str, str, str, str]],
) -> ServingPlan:
    """The replicas' Plans (each predicted at its share of the requests) for the runner."""
    c = choice.chosen
    if c is None or not c.fits:
        raise ValueError(f"no plan: {choice.explanation}")
    plans = []
    for k, pipe in enumerate(c.at_shares()):
        if c.replicas > 1:  # its explanation speaks of its group of devices
            pipe = replace(pipe, explanation=f"replica {k + 1} of {c.replicas}: {pipe.explanation}")
        plans.append(to_plan(pipe, num_layers, nodes))
    return ServingPlan(
        replicas=tuple(plans),
        concurrency=choice.concurrency,
        aggregate_tps=c.aggregate_tps,
        per_request_tps=c.per_request_tps,
        explanation=choice.explanation,
        shares=c.shares,
    )
