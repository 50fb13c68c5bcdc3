"""The replica router's choice (coordinator/router.py): the replica expected to finish a new
request first, from its load, its plan's prediction and what it has measured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from coordinator.plan import Plan, Prediction, Stage
from coordinator.router import ReplicaRouter, predicted_rate
from coordinator.supervisor import Supervisor


@dataclass
class FakePipeline:
    """What the router reads of a pipeline: its plan and whether it failed."""

    plan: Plan
    failed: str | None = None


def plan_of(node: str, decode_tps: float, stages: int = 1) -> Plan:
    per = 1.0 / decode_tps / stages
    return Plan(
        model="m",
        num_layers=stages,
        stages=tuple(Stage(f"{node}{i}", f"{node}{i}", f"h:{i}", i, i + 1) for i in range(stages)),
        predicted=Prediction(decode_tps, 0.1, decode_tps, stage_s=(per,) * stages),
    )


async def _never(*_: Any) -> Any:
    raise AssertionError("not used")


def router(*plans: Plan) -> ReplicaRouter:
    sups = []
    for p in plans:
        s = Supervisor([], _never, _never)
        s.pipeline = FakePipeline(p)  # type: ignore[assignment]
        sups.append(s)
    return ReplicaRouter(sups)


def test_predicted_rate_is_the_cost_models_throughput() -> None:
    p = plan_of("a", 50.0, stages=2)  # 20 ms a token, 10 ms per stage
    assert predicted_rate(p, 1) == pytest.approx(50.0)
    assert predicted_rate(p, 2) == pytest.approx(100.0)
    assert predicted_rate(p, 5) == pytest.approx(100.0)  # the slowest stage caps it
    assert predicted_rate(p, 0) == 0.0


def test_a_burst_spreads_by_expected_finish_time() -> None:
    r = router(plan_of("fast", 100.0), plan_of("slow", 30.0))
    picks = []
    for _ in range(4):
        i = r.choose()
        assert i is not None
        r.load[i] += 1
        picks.append(i)
    # 100 alone, 50 each for two, 33 each for three; then 30 alone on the slow one wins.
    assert picks == [0, 0, 0, 1]


def test_measured_speed_corrects_the_prediction() -> None:
    r = router(plan_of("a", 100.0), plan_of("b", 100.0))
    assert r.choose() == 0  # equal: the first
    for _ in range(5):
        r.learn(0, 1, tokens=40, seconds=2.0)  # measured 20 tok/s, predicted 100
    assert r.correction[0] < 0.5
    assert r.choose() == 1
    # a is now expected at ~33 tok/s alone: b wins with 1 in flight (50 each), not with 3 (25).
    r.load[1] += 1
    assert r.choose() == 1
    r.load[1] += 2
    assert r.choose() == 0
    r.learn(1, 1, tokens=2, seconds=1.0)  # too short to learn from
    assert r.correction[1] == 1.0


def test_failed_and_dropped_replicas_take_no_requests() -> None:
    r = router(plan_of("a", 100.0), plan_of("b", 10.0), plan_of("c", 10.0))
    r.replicas[0].pipeline.failed = "stage 1 died"  # type: ignore[union-attr]
    r.replicas[1].fatal = "the model cannot be served after ..."
    assert r.healthy() == [2] and r.choose() == 2
    assert r.plan is r.replicas[2].plan
    r.replicas[2].fatal = "gone"
    assert r.choose() is None and r.fatal is None  # replica 1 may still recover
    r.replicas[0].fatal = "gone too"
    assert r.fatal is not None
    rows = r.to_json()
    assert [row["healthy"] for row in rows] == [False, False, False]
    assert rows[1]["nodes"] == ["b0"] and rows[1]["stages"] == [{"node": "b0", "layers": [0, 1]}]
