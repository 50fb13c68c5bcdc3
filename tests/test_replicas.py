"""Serving plans with replicas (coordinator/replicas.py): one pipeline vs R replicas vs mixes,
predicted aggregate and per-request tokens/s, --replicas and --min-tps, on synthetic clusters."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from coordinator.costmodel import GIB, Cluster, DeviceSpec, LinkSpec, Workload, predict
from coordinator.main import main
from coordinator.plan import Plan, ServingPlan, Stage
from coordinator.replicas import (
    Candidate,
    choose,
    plan_serving,
    share_requests,
    to_serving_plan,
)
from coordinator.whatif import BRIEF_MODELS, parse, serving_table_markdown


def six_2060s(model: str, concurrency: int) -> Any:
    return parse(
        {
            "nodes": [{"name": "pc", "devices": [{"name": "RTX 2060 Super", "count": 6}]}],
            "model": BRIEF_MODELS[model],
            "concurrency": concurrency,
        }
    )


def recomputed(c: Candidate, w: Any) -> tuple[float, float]:
    """Aggregate and per-request tok/s of a candidate, from costmodel.predict directly."""
    total, slowest = 0.0, float("inf")
    for pipe, m in zip(c.pipelines, c.shares, strict=True):
        cost = predict(w.model, w.cluster, pipe.placements, w.workload)
        rate = 0.0 if m == 0 else min(m / cost.token_s, 1.0 / cost.slowest_stage_s)
        total += rate
        if m:
            slowest = min(slowest, rate / m)
    return total, slowest


def test_one_user_gets_one_pipeline_on_one_card() -> None:
    w = six_2060s("8B", 1)
    c = plan_serving(w.model, w.cluster, w.workload)
    assert c.chosen is not None and c.chosen.replicas == 1
    assert len(c.chosen.pipelines[0].placements) == 1
    assert {k.replicas for k in c.candidates} == {1, 2, 3, 4, 5, 6}
    best_single = max(k.aggregate_tps for k in c.candidates)
    assert c.chosen.aggregate_tps == pytest.approx(best_single)


def test_many_users_get_replicas_and_predictions_add_up() -> None:
    w = six_2060s("8B", 24)
    c = plan_serving(w.model, w.cluster, w.workload)
    assert c.chosen is not None and c.chosen.replicas == 6, c.explanation
    assert c.chosen.shares == (4, 4, 4, 4, 4, 4)
    one = next(k for k in c.candidates if k.replicas == 1)
    assert len(one.pipelines[0].placements) == 6  # one pipeline over every card
    assert c.chosen.aggregate_tps > one.aggregate_tps
    for k in c.candidates:
        if k.fits:
            agg, per = recomputed(k, w)
            assert k.aggregate_tps == pytest.approx(agg)
            assert k.per_request_tps == pytest.approx(per)
            assert sum(k.shares) == 24
    assert max(k.aggregate_tps for k in c.candidates if k.fits) == c.chosen.aggregate_tps


def test_a_model_no_card_holds_forces_pipelines() -> None:
    w = six_2060s("34B", 6)
    c = plan_serving(w.model, w.cluster, w.workload)
    assert c.chosen is not None and c.chosen.replicas == 2, c.explanation
    assert all(len(p.placements) >= 3 for p in c.chosen.pipelines)
    assert not any(k.fits for k in c.candidates if k.replicas >= 3)
    ids = [p.device for pipe in c.chosen.pipelines for p in pipe.placements]
    assert len(ids) == len(set(ids)), "a card in two replicas"


def test_replicas_fixes_the_count() -> None:
    w = six_2060s("8B", 8)
    c = plan_serving(w.model, w.cluster, w.workload, replicas=2)
    assert {k.replicas for k in c.candidates} == {2}
    assert c.chosen is not None and c.chosen.replicas == 2 and c.chosen.shares == (4, 4)
    with pytest.raises(ValueError, match="between 1 and 6"):
        plan_serving(w.model, w.cluster, w.workload, replicas=7)


def mixed_cluster() -> Cluster:
    """A fast card and two slow ones, all on one host."""
    model_gib = 6
    devs = (
        DeviceSpec("pc/0", "pc", "fast", "cuda", int(model_gib * GIB), 400.0, 50.0),
        DeviceSpec("pc/1", "pc", "slow", "cuda", int(model_gib * GIB), 100.0, 10.0),
        DeviceSpec("pc/2", "pc", "slow", "cuda", int(model_gib * GIB), 100.0, 10.0),
    )
    links = tuple(
        LinkSpec(a.id, b.id, 50e-6, 10e9, 250e-6, "pcie") for a in devs for b in devs if a != b
    )
    return Cluster(devs, links)


def cpu_box(host: str, cores: tuple[tuple[int, ...], ...] = ((), (), (), ())) -> Cluster:
    """Four CPU nodes; on one machine when `host` is given (the probe's hostname), each on
    the cores given (() when the node does not say)."""
    devs = tuple(
        DeviceSpec(f"n{i}/0", f"n{i}", "cpu", "cpu", 8 * GIB, 4.5, 0.0025, 400e-6, host=host,
                   cores=cores[i])  # fmt: skip
        for i in range(4)
    )
    links = tuple(
        LinkSpec(a.node, b.node, 150e-6, 1e9, 630e-6) for a in devs for b in devs if a != b
    )
    return Cluster(devs, links)


def test_cpu_devices_of_one_host_share_it() -> None:
    """Each CPU device was timed with the machine to itself: on one host, all replicas
    together get one second per core they run on (one when the nodes do not say), and
    replicas without hops do best."""
    model = six_2060s("8B", 1).model
    model = replace(model, layers=8, layer_bytes=(4 * 10**6,) * 8, embed_bytes=10**6,
                    head_bytes=10**6)  # fmt: skip
    wl = Workload(concurrency=8, context=256, prompt_tokens=32)
    apart = plan_serving(model, cpu_box(""), wl)
    shared = plan_serving(model, cpu_box("box"), wl)
    assert apart.chosen is not None and shared.chosen is not None
    single = next(k for k in shared.candidates if k.replicas == 4)
    t_one = single.pipelines[0].cost.token_s if single.pipelines[0].cost else 0.0
    for k in shared.candidates:
        assert k.aggregate_tps <= 1.0 / t_one * (1 + 1e-9), (k.shape, k.aggregate_tps)
    assert shared.chosen.replicas == 4 and shared.chosen.shape == "4 replicas of 1 stage"
    assert shared.chosen.shared_hosts == ("box",)
    assert shared.chosen.aggregate_tps == pytest.approx(1.0 / t_one)
    assert "capped by the CPU of box" in shared.explanation
    assert apart.chosen.aggregate_tps > 3 * shared.chosen.aggregate_tps
    assert not apart.chosen.shared_hosts
    # Pinned two and two on a 2-core machine (node/cpus.py's spread): each core carries one
    # device's worth, the machine two.
    spread = plan_serving(model, cpu_box("box", ((0,), (1,), (0,), (1,))), wl)
    assert spread.chosen is not None and spread.chosen.shape == "4 replicas of 1 stage"
    for k in spread.candidates:
        assert k.aggregate_tps <= 2.0 / t_one * (1 + 1e-9), (k.shape, k.aggregate_tps)
    assert spread.chosen.aggregate_tps == pytest.approx(2.0 / t_one)
    # Unpinned, every node may use both cores: the same two devices' worth in all.
    both = plan_serving(model, cpu_box("box", ((0, 1),) * 4), wl)
    assert both.chosen is not None and both.chosen.aggregate_tps == pytest.approx(2.0 / t_one)
    # All four on core 0: one device's worth, even though the host has two cores.
    one = plan_serving(model, cpu_box("box", ((0,),) * 4), wl)
    assert one.chosen is not None and one.chosen.aggregate_tps == pytest.approx(1.0 / t_one)


def test_min_tps_is_respected_and_changes_the_choice() -> None:
    w = six_2060s("8B", 1)
    cluster = mixed_cluster()
    wl = Workload(concurrency=6)
    free = plan_serving(w.model, cluster, wl)
    assert free.chosen is not None
    floor = free.chosen.per_request_tps
    bound = plan_serving(w.model, cluster, wl, min_tps=floor)
    assert bound.chosen is not None and bound.chosen.per_request_tps >= floor
    meeting = [k for k in bound.candidates if k.fits and k.per_request_tps >= floor]
    assert bound.chosen.aggregate_tps == max(k.aggregate_tps for k in meeting)
    assert "every request >= " in bound.explanation
    # Out of reach: the fastest per request, said in words.
    far = plan_serving(w.model, cluster, wl, min_tps=10 * floor)
    assert far.chosen is not None and "no candidate keeps every request" in far.explanation
    assert far.chosen.per_request_tps == max(k.per_request_tps for k in far.candidates)


def test_min_tps_trades_aggregate_for_per_request_speed() -> None:
    """The rule itself, on candidates whose figures disagree: the highest aggregate is slow
    per request; a floor above it picks the next best aggregate that meets it."""
    w = six_2060s("8B", 6)
    c = plan_serving(w.model, w.cluster, w.workload)
    fits = [k for k in c.candidates if k.fits][:3]
    a = replace(fits[0], aggregate_tps=300.0, per_request_tps=20.0)
    b = replace(fits[1], aggregate_tps=250.0, per_request_tps=40.0)
    d = replace(fits[2], aggregate_tps=200.0, per_request_tps=45.0)
    assert choose([a, b, d], None)[0] is a
    assert choose([a, b, d], 30.0)[0] is b
    assert choose([a, b, d], 45.0)[0] is d
    best, why = choose([a, b, d], 50.0)
    assert best is d and "no candidate keeps every request at 50" in why


def test_share_requests_follows_speed() -> None:
    def one_device(tps: float) -> Any:
        return lambda m: tps if m else 0.0

    assert share_requests([one_device(10.0)] * 3, 7) == (3, 2, 2)
    # 100 tok/s vs 30: the fast one takes requests while each still gets more than 30.
    assert share_requests([one_device(100.0), one_device(30.0)], 4) == (3, 1)
    assert share_requests([], 3) == ()


def test_to_serving_plan_gives_one_plan_per_replica() -> None:
    w = six_2060s("8B", 12)
    c = plan_serving(w.model, w.cluster, w.workload, replicas=3)
    nodes = {d.id: (f"id-{d.id}", d.node, f"127.0.0.1:{7000 + i}", d.id[-1]) for i, d in enumerate(w.cluster.devices)}  # fmt: skip
    sp = to_serving_plan(c, w.model.layers, nodes)
    assert len(sp.replicas) == 3 and sp.concurrency == 12
    assert sp.aggregate_tps == pytest.approx(c.chosen.aggregate_tps if c.chosen else 0.0)
    for p in sp.replicas:
        assert p.predicted is not None
        expected = min(4 * p.predicted.decode_tps, 1.0 / max(p.predicted.stage_s))
        assert p.predicted.throughput_tps == pytest.approx(expected)
    assert len({p.plan_id for p in sp.replicas}) == 3


def test_a_device_in_two_replicas_is_refused() -> None:
    a = Plan("m", 2, (Stage("n1", "a", "h:1", 0, 2),))
    b = Plan("m", 2, (Stage("n1", "a", "h:1", 0, 2),), version=2)
    with pytest.raises(ValueError, match="in two replicas"):
        ServingPlan((a, b))


# ---------------------------------------------------------------------------------------------
# CLI and docs

ROOT = Path(__file__).resolve().parents[1]
SEED = [ROOT / "docs/whatif/seed-6x2060s-7b.json", ROOT / "docs/whatif/seed-6x2060s-34b.json"]


def test_cli_lists_every_candidate_with_its_prediction(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--what-if", str(SEED[0]), "--json", "--objective", "throughput"]
    assert main([*args, "--concurrency", "24"]) == 0
    out = json.loads(capsys.readouterr().out)
    s = out["serving"]
    assert s["replicas"] == 6 and s["concurrency"] == 24 and out["fits"] is True
    assert len(out["replicas"]) == 6 and [r["share"] for r in out["replicas"]] == [4] * 6
    assert out["plan"] == out["replicas"][0]["plan"]
    assert sum(r["predicted"]["throughput_tps"] for r in out["replicas"]) == pytest.approx(
        s["aggregate_tps"], rel=1e-3
    )
    cands = out["candidates"]
    assert {c["replicas"] for c in cands} == {1, 2, 3, 4, 5, 6}
    assert [c["chosen"] for c in cands].count(True) == 1
    one = next(c for c in cands if c["replicas"] == 1)
    assert len(one["stages"][0]) == 6 and one["aggregate_tps"] < s["aggregate_tps"]
    assert all(
        {"shape", "shares", "aggregate_tps", "per_request_tps", "groups"} <= set(c) for c in cands
    )

    assert main([*args, "--concurrency", "8", "--replicas", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["serving"]["replicas"] == 2 and {c["replicas"] for c in out["candidates"]} == {2}

    assert main([*args, "--concurrency", "24", "--min-tps", "1000"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "no candidate keeps every request at 1000" in out["serving"]["explanation"]


def test_cli_text_and_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["plan", "--what-if", str(SEED[1]), "--objective", "throughput", "--concurrency", "6"]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "candidates for 6 request(s)" in out and "predicted in all" in out
    assert main([*base, "--replicas", "7"]) == 2
    assert "--replicas: replicas must be between 1 and 6" in capsys.readouterr().err
    assert main([*base, "--replicas", "0"]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err
    assert main([*base, "--min-tps", "-3"]) == 2
    assert "--min-tps must be positive" in capsys.readouterr().err
    assert main(["plan", "--serving-table", str(SEED[0]), "--levels", "1,x"]) == 2
    assert "--levels" in capsys.readouterr().err


def test_docs_table_is_what_the_code_produces() -> None:
    doc = (ROOT / "docs/planning.md").read_text()
    table = serving_table_markdown([str(p) for p in SEED], [1, 6, 24])
    assert table in doc, (
        "docs/planning.md's replicas table is stale: regenerate it with `coordinator plan "
        "--serving-table docs/whatif/seed-6x2060s-7b.json docs/whatif/seed-6x2060s-34b.json`"
    )
    # What the issue asks of it: one user, one pipeline; many users, replicas.
    rows = [r for r in table.splitlines() if r.startswith("| 7B") or r.startswith("| 34B")]
    picks = {(r.split(" | ")[0][2:], r.split(" | ")[1]): r.split(" | ")[-1] for r in rows}
    assert picks[("7B Q4", "1")].startswith("**1 pipeline")
    assert picks[("7B Q4", "24")].startswith("**6 replicas")
    assert picks[("34B Q4", "24")].startswith("**2 replicas of 3 stages")


def test_up_refuses_bad_replica_flags_before_touching_nodes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["up", "--model", "/nonexistent", "--node", "127.0.0.1:9"]
    assert main([*base, "--replicas", "0"]) == 2
    assert "--replicas must be at least 1" in capsys.readouterr().err
    assert main([*base, "--min-tps", "0"]) == 2
    assert "--min-tps must be positive" in capsys.readouterr().err
