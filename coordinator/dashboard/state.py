"""What the dashboard shows: every node's last GetInfo (polled in the background), the plan,
the live serving figures and, when a probe result is at hand, the link matrix.

`build_state` returns the JSON document served at GET /api/state; the page renders it as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import grpc

from coordinator.metrics import ServingMetrics
from coordinator.nodeclient import NodeClient
from coordinator.plan import Plan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeTarget:
    """A node the dashboard watches."""

    name: str
    address: str


@dataclass(frozen=True)
class DeviceView:
    index: int
    name: str
    kind: str
    mem_total_bytes: int
    mem_free_bytes: int
    mem_source: str = ""  # DeviceInfo.mem_source: "nvml", "mlx", "metal-working-set", "os"
    runs_stages: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "index": self.index,
            "name": self.name,
            "kind": self.kind,
            "mem_total_bytes": self.mem_total_bytes,
            "mem_free_bytes": self.mem_free_bytes,
            "mem_used_bytes": max(0, self.mem_total_bytes - self.mem_free_bytes),
            "mem_source": self.mem_source,
            "runs_stages": self.runs_stages,
        }


@dataclass(frozen=True)
class StageView:
    plan_id: str
    model: str
    start: int
    end: int
    active_requests: int
    weight_bytes: int
    # Cumulative single-token decode steps and their compute seconds (the node's counters).
    decode_steps: int = 0
    decode_seconds: float = 0.0
    # Compute per decode step over the last window of >= RATE_MIN_STEPS steps (ms), when
    # measured within RATE_STALE_S; the window starts at these counters.
    recent_ms: float | None = None
    recent_at: float = 0.0
    base_steps: int = 0
    base_seconds: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "plan_id": self.plan_id,
            "model": self.model,
            "layers": [self.start, self.end],
            "active_requests": self.active_requests,
            "weight_bytes": self.weight_bytes,
            "decode_steps": self.decode_steps,
            "decode_ms": None if self.recent_ms is None else round(self.recent_ms, 3),
        }


RATE_MIN_STEPS = 8
RATE_STALE_S = 30.0


def with_recent_rate(new: StageView, old: StageView | None, now: float) -> StageView:
    """`new` with its recent compute per decode step: measured when at least RATE_MIN_STEPS
    steps ran since the window began, else carried over from `old` while fresh."""
    if old is None or new.decode_steps < old.base_steps:  # first sight, or reloaded
        return replace(new, base_steps=new.decode_steps, base_seconds=new.decode_seconds)
    steps = new.decode_steps - old.base_steps
    if steps >= RATE_MIN_STEPS:
        ms = (new.decode_seconds - old.base_seconds) / steps * 1e3
        return replace(
            new,
            recent_ms=ms,
            recent_at=now,
            base_steps=new.decode_steps,
            base_seconds=new.decode_seconds,
        )
    fresh = old.recent_ms is not None and now - old.recent_at <= RATE_STALE_S
    return replace(
        new,
        recent_ms=old.recent_ms if fresh else None,
        recent_at=old.recent_at if fresh else 0.0,
        base_steps=old.base_steps,
        base_seconds=old.base_seconds,
    )


@dataclass(frozen=True)
class NodeView:
    """A node as its last GetInfo described it (`reachable` False: the last call failed)."""

    name: str
    address: str
    reachable: bool = False
    error: str = "not polled yet"
    node_id: str = ""
    backend: str = ""
    hostname: str = ""
    os: str = ""
    mem_total_bytes: int = 0
    mem_available_bytes: int = 0
    mlx_active_bytes: int = 0
    devices: tuple[DeviceView, ...] = ()
    stages: tuple[StageView, ...] = ()
    rpc_s: float = 0.0
    checked_at: float = 0.0

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "address": self.address,
            "reachable": self.reachable,
            "error": self.error,
            "node_id": self.node_id,
            "backend": self.backend,
            "hostname": self.hostname,
            "os": self.os,
            "mem_total_bytes": self.mem_total_bytes,
            "mem_available_bytes": self.mem_available_bytes,
            "mlx_active_bytes": self.mlx_active_bytes,
            "devices": [d.to_json() for d in self.devices],
            "stages": [s.to_json() for s in self.stages],
            "rpc_ms": round(self.rpc_s * 1e3, 2),
            "checked_at": self.checked_at,
        }


def node_view(target: NodeTarget, info: Any, rpc_s: float) -> NodeView:
    """A NodeView from a NodeInfo message."""
    return NodeView(
        name=info.name or target.name,
        address=target.address,
        reachable=True,
        error="",
        node_id=info.node_id,
        backend=info.backend,
        hostname=info.hostname,
        os=info.os,
        mem_total_bytes=int(info.mem_total_bytes),
        mem_available_bytes=int(info.mem_available_bytes),
        mlx_active_bytes=int(info.mlx_active_bytes),
        devices=tuple(
            DeviceView(
                index=int(d.index),
                name=d.name,
                kind=d.kind,
                mem_total_bytes=int(d.mem_total_bytes),
                mem_free_bytes=int(d.mem_free_bytes),
                mem_source=d.mem_source,
                runs_stages=bool(d.runs_stages),
            )
            for d in info.devices
        ),
        stages=tuple(
            StageView(
                plan_id=s.plan_id,
                model=s.model,
                start=int(s.start),
                end=int(s.end),
                active_requests=int(s.active_requests),
                weight_bytes=int(s.weight_bytes),
                decode_steps=int(s.decode_steps),
                decode_seconds=float(s.decode_seconds),
            )
            for s in info.stages
        ),
        rpc_s=rpc_s,
        checked_at=time.time(),
    )


class NodeMonitor:
    """Polls GetInfo on every watched node every `period_s` seconds, concurrently."""

    def __init__(
        self,
        targets: Sequence[NodeTarget],
        period_s: float = 1.5,
        timeout_s: float = 2.0,
        metrics: ServingMetrics | None = None,
        plan_of: Callable[[], Plan | None] | None = None,
    ) -> None:
        self.targets = tuple(targets)
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.metrics = metrics
        # The plan being served: with it, every poll checks the stages' speed and logs alerts.
        self.plan_of = plan_of
        self.alert_log = AlertLog()
        self._views = {t.address: NodeView(name=t.name, address=t.address) for t in self.targets}
        self._clients: dict[str, NodeClient] = {}
        self._task: asyncio.Task[None] | None = None

    def views(self) -> tuple[NodeView, ...]:
        return tuple(self._views[t.address] for t in self.targets)

    async def start(self) -> None:
        if self._task is None:
            await self.refresh()
            self._task = asyncio.create_task(self._run(), name="node-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for c in self._clients.values():
            await c.close()
        self._clients.clear()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            await self.refresh()

    async def refresh(self) -> None:
        await asyncio.gather(*(self._poll(t) for t in self.targets))
        if self.plan_of is not None:
            recent = list(self.metrics.recent) if self.metrics is not None else []
            self.alert_log.update(current_alerts(self.plan_of(), recent, self.views()))

    async def _poll(self, target: NodeTarget) -> None:
        client = self._clients.get(target.address)
        if client is None:
            client = self._clients[target.address] = NodeClient(target.address)
        t0 = time.perf_counter()
        try:
            info = await client.get_info(timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            old = self._views[target.address]
            if old.reachable:
                log.warning("node %s (%s) stopped answering: %s", target.name, target.address, e)
            self._views[target.address] = replace(
                old,
                reachable=False,
                error=f"{e.code().name}: {e.details()}",
                checked_at=time.time(),
            )
            if self.metrics is not None:
                self.metrics.node_up.set(0, node=target.name)
            return
        view = node_view(target, info, time.perf_counter() - t0)
        before = {(st.plan_id, st.start): st for st in self._views[target.address].stages}
        now = time.monotonic()
        view = replace(
            view,
            stages=tuple(
                with_recent_rate(st, before.get((st.plan_id, st.start)), now) for st in view.stages
            ),
        )
        self._views[target.address] = view
        if self.metrics is not None:
            self.metrics.node_up.set(1, node=target.name)
            self.metrics.node_rpc.set(view.rpc_s, node=target.name)


def plan_json(plan: Plan) -> dict[str, object]:
    return {
        "plan_id": plan.plan_id,
        "model": plan.model,
        "num_layers": plan.num_layers,
        "version": plan.version,
        "explanation": plan.explanation,
        "predicted": None
        if plan.predicted is None
        else {
            "decode_tps": plan.predicted.decode_tps,
            "ttft_s": plan.predicted.ttft_s,
            "throughput_tps": plan.predicted.throughput_tps,
            "bottleneck": plan.predicted.bottleneck,
        },
        "stages": [
            {
                "index": i,
                "node": s.node_name,
                "node_id": s.node_id,
                "address": s.address,
                "device": s.device,
                "layers": [s.start, s.end],
                "layer_count": s.layer_count,
            }
            for i, s in enumerate(plan.stages)
        ],
    }


@dataclass(frozen=True)
class LinkView:
    """One measured node-to-node link, by node name."""

    src: str
    dst: str
    latency_us: float
    bandwidth_gbs: float
    same_host: bool
    slowest: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "src": self.src,
            "dst": self.dst,
            "latency_us": self.latency_us,
            "bandwidth_gbs": self.bandwidth_gbs,
            "same_host": self.same_host,
            "slowest": self.slowest,
        }


def links_of(probe: Mapping[str, Any] | None) -> tuple[LinkView, ...] | None:
    """The node-to-node links of a probe result (`ProbeResult.to_json()`: `nodes` with id and
    name, `links` with src, dst, [src_name, dst_name,] latency_us, bandwidth_gbs, same_host,
    slowest), by node name; None when there is no probe. Malformed entries are skipped."""
    if not probe:
        return None
    names: dict[str, str] = {}
    for n in probe.get("nodes", []) or []:
        if isinstance(n, Mapping) and "id" in n:
            names[str(n["id"])] = str(n.get("name") or n["id"])
    out: list[LinkView] = []
    for lk in probe.get("links", []) or []:
        if not isinstance(lk, Mapping):
            continue
        try:
            src, dst = str(lk["src"]), str(lk["dst"])
            out.append(
                LinkView(
                    src=str(lk.get("src_name") or names.get(src, src)),
                    dst=str(lk.get("dst_name") or names.get(dst, dst)),
                    latency_us=float(lk["latency_us"]),
                    bandwidth_gbs=float(lk["bandwidth_gbs"]),
                    same_host=bool(lk.get("same_host", False)),
                    slowest=bool(lk.get("slowest", False)),
                )
            )
        except (KeyError, TypeError, ValueError):
            log.debug("skipping malformed link entry %r", lk)
    return tuple(out)


def probe_summary(probe: Mapping[str, Any] | None) -> dict[str, object] | None:
    """Which nodes the last probe measured, when, and what failed; None without a probe."""
    if not probe:
        return None
    nodes = [n for n in probe.get("nodes", []) or [] if isinstance(n, Mapping)]
    at = probe.get("measured_at")
    return {
        "nodes": [str(n.get("name") or n.get("id")) for n in nodes],
        "node_ids": [str(n.get("id")) for n in nodes],
        "links": len(probe.get("links", []) or []),
        "seconds": probe.get("seconds"),
        "measured_at": float(at) if isinstance(at, (int, float)) else None,
        "errors": [str(e) for e in probe.get("errors", []) or []],
    }


SLOW_FACTOR = 3.0
SLOW_MIN_TOKENS = 8


def speed_alerts(plan: Plan | None, recent: Sequence[Any]) -> list[str]:
    """A warning when requests decode SLOW_FACTOR x slower than the plan predicted (median of
    the last five finished requests long enough to time): a stage has become slow."""
    if plan is None or plan.predicted is None or plan.predicted.decode_tps <= 0:
        return []
    timed = [r.decode_tps for r in list(recent)[-5:]
             if r.completion_tokens >= SLOW_MIN_TOKENS and r.decode_tps > 0]  # fmt: skip
    if not timed:
        return []
    timed.sort()
    measured = timed[len(timed) // 2]
    predicted = plan.predicted.decode_tps
    if measured * SLOW_FACTOR > predicted:
        return []
    return [
        f"decoding at {measured:.1f} tokens/s per stream, {predicted / measured:.1f}x slower "
        f"than the {predicted:.1f} predicted for plan {plan.plan_id}: a stage has slowed down"
    ]


def stage_alerts(plan: Plan | None, nodes: Sequence[NodeView]) -> list[Alert]:
    """A warning for each stage whose recent compute per decode step is SLOW_FACTOR x what
    the plan predicted for it: that node has slowed down (throttling, another job, swap)."""
    if plan is None or plan.predicted is None:
        return []
    predicted = plan.predicted.stage_s
    if len(predicted) != len(plan.stages):
        return []
    by_node = {n.node_id: n for n in nodes if n.reachable}  # (with its device workers' stages)
    out = []
    for i, (stage, pred_s) in enumerate(zip(plan.stages, predicted, strict=True)):
        node = by_node.get(stage.node_id)
        if node is None or pred_s <= 0:
            continue
        view = next(
            (v for v in node.stages if v.plan_id == plan.plan_id and v.start == stage.start),
            None,
        )
        if view is None or view.recent_ms is None:
            continue
        ratio = view.recent_ms / (pred_s * 1e3)
        if ratio >= SLOW_FACTOR:
            out.append(
                Alert(
                    f"stage {i}",
                    f"stage {i} on {stage.node_name} (layers [{stage.start}, {stage.end})) "
                    f"computes a token in {view.recent_ms:.1f} ms, {ratio:.1f}x the "
                    f"{pred_s * 1e3:.1f} ms predicted for plan {plan.plan_id}: that node has "
                    "slowed down",
                )
            )
    return out


def hop_estimate(plan: Plan, computes: Sequence[float], recent: Sequence[Any]) -> float | None:
    """Seconds per hop: (time per token of the recent requests, median - the stages'
    compute per token) / hops per token (stages, the ring included); None when a stage's
    compute is unknown, the plan has one stage, or no recent request was long enough."""
    hops = len(plan.stages)
    if hops < 2 or len(computes) != hops:
        return None
    timed = sorted(r.decode_tps for r in list(recent)[-5:]
                   if r.completion_tokens >= SLOW_MIN_TOKENS and r.decode_tps > 0)  # fmt: skip
    if not timed:
        return None
    token_s = 1.0 / float(timed[len(timed) // 2])
    return max(0.0, (token_s - sum(computes)) / hops)


@dataclass(frozen=True)
class Alert:
    """A warning for the log and the dashboard; `key` names what it is about, so that the
    log reports it once when it starts and once when it clears, not on every poll."""

    key: str
    message: str


def current_alerts(
    plan: Plan | None, recent: Sequence[Any], nodes: Sequence[NodeView]
) -> list[Alert]:
    return [Alert("plan", a) for a in speed_alerts(plan, recent)] + stage_alerts(plan, nodes)


class AlertLog:
    """Logs an alert when it starts and when it clears."""

    def __init__(self) -> None:
        self.active: dict[str, str] = {}

    def update(self, alerts: Sequence[Alert]) -> None:
        now = {a.key: a.message for a in alerts}
        for key, message in now.items():
            if key not in self.active:
                log.warning("%s", message)
        for key, message in self.active.items():
            if key not in now:
                log.info("cleared: %s", message)
        self.active = now


def build_state(
    model_name: str,
    plan: Plan | None,
    metrics: ServingMetrics,
    nodes: Sequence[NodeView],
    probe: Mapping[str, Any] | None = None,
    shipping: Mapping[str, object] | None = None,
) -> dict[str, object]:
    links = links_of(probe)
    return {
        "model": model_name,
        "plan": None if plan is None else plan_json(plan),
        "nodes": [n.to_json() for n in nodes],
        "live": metrics.live().to_json(),
        "recent": [r.to_json() for r in metrics.recent],
        "links": None if links is None else [lk.to_json() for lk in links],
        "probe": probe_summary(probe),
        "alerts": [a.message for a in current_alerts(plan, list(metrics.recent), nodes)],
        "shipping": shipping,
        "time": time.time(),
    }
