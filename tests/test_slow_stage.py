"""A stage that becomes 3x slower than the plan predicted for it is reported: in the log
(once when it starts, once when it clears) and in /api/state's alerts, naming that stage.

The slowdown is real: the node's process is stopped and continued on a duty cycle (as
another job taking most of its CPU would), and the rate comes from the node's own counters
(StageStatus.decode_steps / decode_seconds) as the coordinator's monitor polls them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.dashboard.state import (
    NodeMonitor,
    NodeTarget,
    NodeView,
    StageView,
    stage_alerts,
    with_recent_rate,
)
from coordinator.lab.localcluster import LocalCluster
from coordinator.pipeline import GenerationParams, Pipeline
from coordinator.plan import Plan, Prediction, Stage
from coordinator.session import even_counts, fixed_plan, read_model

PROMPT = [5, 9, 33, 71, 2]


def test_recent_rate_needs_enough_steps_and_goes_stale() -> None:
    v = StageView(plan_id="p", model="m", start=0, end=4, active_requests=0, weight_bytes=1)
    first = with_recent_rate(replace(v, decode_steps=10, decode_seconds=1.0), None, now=0.0)
    assert first.recent_ms is None and first.base_steps == 10
    few = with_recent_rate(replace(v, decode_steps=13, decode_seconds=1.3), first, now=1.0)
    assert few.recent_ms is None and few.base_steps == 10  # the window keeps growing
    enough = with_recent_rate(replace(v, decode_steps=20, decode_seconds=1.5), few, now=2.0)
    assert enough.recent_ms == pytest.approx(50.0) and enough.base_steps == 20
    idle = with_recent_rate(replace(v, decode_steps=20, decode_seconds=1.5), enough, now=10.0)
    assert idle.recent_ms == pytest.approx(50.0)  # still fresh
    stale = with_recent_rate(replace(v, decode_steps=20, decode_seconds=1.5), idle, now=40.0)
    assert stale.recent_ms is None
    reloaded = with_recent_rate(replace(v, decode_steps=2, decode_seconds=0.1), enough, now=3.0)
    assert reloaded.recent_ms is None and reloaded.base_steps == 2


def test_stage_alerts_name_only_the_slow_stage() -> None:
    # Node a holds two stages: device 1's is served by its worker on another port, and the
    # node's GetInfo (at h:1) lists both.
    stages = (Stage("a", "alpha", "h:1", 0, 4), Stage("a", "alpha", "h:3", 4, 6, device="1"),
              Stage("b", "beta", "h:2", 6, 8))  # fmt: skip
    plan = Plan(model="m", num_layers=8, stages=stages,
                predicted=Prediction(10.0, 0.1, 10.0, stage_s=(0.004, 0.002, 0.002)))  # fmt: skip

    def view(start: int, end: int, ms: float | None) -> StageView:
        return StageView(plan_id=plan.plan_id, model="m", start=start, end=end,
                         active_requests=1, weight_bytes=1, recent_ms=ms)  # fmt: skip

    def nodes(a0: float | None, a1: float | None, b: float | None) -> list[NodeView]:
        return [
            NodeView(name="alpha", address="h:1", node_id="a", reachable=True,
                     stages=(view(0, 4, a0), view(4, 6, a1))),
            NodeView(name="beta", address="h:2", node_id="b", reachable=True,
                     stages=(view(6, 8, b),)),
        ]  # fmt: skip

    assert stage_alerts(plan, nodes(11.9, 5.9, 5.9)) == []
    (alert,) = stage_alerts(plan, nodes(4.0, 2.0, 6.5))
    assert alert.key == "stage 2" and "beta" in alert.message and "3.2x" in alert.message
    (alert,) = stage_alerts(plan, nodes(4.0, 7.0, 2.0))
    assert alert.key == "stage 1" and "alpha" in alert.message and "3.5x" in alert.message
    assert stage_alerts(plan, nodes(None, None, None)) == []
    assert stage_alerts(replace(plan, predicted=None), nodes(60.0, 60.0, 60.0)) == []


class DutyCycle:
    """Stop and continue a process in turn: it runs `run_ms` of every `run_ms + stop_ms`."""

    def __init__(self, pid: int, run_ms: float, stop_ms: float) -> None:
        self.pid, self.run_s, self.stop_s = pid, run_ms / 1e3, stop_ms / 1e3
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                time.sleep(self.stop_s)
                os.kill(self.pid, signal.SIGCONT)
                time.sleep(self.run_s)
        finally:
            os.kill(self.pid, signal.SIGCONT)

    def __enter__(self) -> DutyCycle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(5)


def test_a_stage_three_times_slower_than_predicted_is_reported(
    tiny_llama: Path, session_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="coordinator.dashboard.state")
    model = read_model(tiny_llama)
    with LocalCluster(2, "slow-" + os.urandom(3).hex(), log_dir=session_dir,
                      name_prefix="slow") as cluster:  # fmt: skip
        slow = cluster.nodes[1]
        served: list[Plan] = []

        async def go() -> dict[str, object]:
            out: dict[str, object] = {}
            plan = fixed_plan(model, cluster.nodes, even_counts(model.num_layers, 2))
            pipe = Pipeline(plan, str(model.path))
            await pipe.load()
            await pipe.open()
            monitor = NodeMonitor(
                [NodeTarget(n.name, n.address) for n in cluster.nodes],
                plan_of=lambda: served[0] if served else None,
            )

            async def window(tokens: int = 48) -> list[float]:
                """Decode `tokens` and poll: each stage's recent compute per token (ms)."""
                await pipe.generate(PROMPT, GenerationParams(max_tokens=tokens))
                await monitor.refresh()
                views = {v.address: v for v in monitor.views()}
                rates = []
                for s in plan.stages:
                    sv = next(x for x in views[s.address].stages if x.plan_id == plan.plan_id)
                    assert sv.recent_ms is not None
                    rates.append(sv.recent_ms)
                return rates

            try:
                await monitor.refresh()  # the windows start at the counters now
                await window()
                normal = await window()
                # The plan predicts what these stages do when nothing else runs.
                served.append(replace(plan, predicted=Prediction(
                    10.0, 0.1, 10.0, stage_s=tuple(r / 1e3 for r in normal))))  # fmt: skip
                await monitor.refresh()
                out["normal"] = normal
                out["alerts_normal"] = list(monitor.alert_log.active)
                with DutyCycle(cluster.procs[slow.name].pid, run_ms=2, stop_ms=30):
                    out["slowed"] = await window(32)
                out["alerts_slowed"] = dict(monitor.alert_log.active)
                await monitor.refresh()  # no traffic: still reported, not logged again
                out["recovered"] = await window()
                out["alerts_after"] = dict(monitor.alert_log.active)
            finally:
                await monitor.close()
                await pipe.close()
            return out

        try:
            out = asyncio.run(go())
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(cluster.procs[slow.name].pid, signal.SIGCONT)

    normal, slowed = out["normal"], out["slowed"]
    assert isinstance(normal, list) and isinstance(slowed, list)
    assert out["alerts_normal"] == []
    assert slowed[1] >= 3 * normal[1], (normal, slowed)
    alerts = out["alerts_slowed"]
    assert isinstance(alerts, dict) and list(alerts) == ["stage 1"], alerts
    assert f"on {slow.name} (layers [4, 8))" in alerts["stage 1"]
    assert out["alerts_after"] == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("stage 1 on" in w for w in warnings) == 1, warnings
    assert any(r.getMessage().startswith("cleared: stage 1 on") for r in caplog.records)
