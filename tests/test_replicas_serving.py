"""`coordinator up` with replicas on four local nodes and the tiny model: eight concurrent
streams each equal their solo greedy answer under one pipeline, two replicas and four
replicas; every replica takes requests; predicted and measured aggregate tokens/s are printed
(`pytest -s`; no timing assertion: the four nodes share this machine's cores)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.lab.localcluster import CoordinatorProcess, LocalCluster
from tests.test_api_stream import stream_chat

PROMPTS = [f"Request number {i}: tell me about {w}" for i, w in enumerate("abcdefgh")]
TOKENS = 24


@pytest.fixture(scope="module")
def four_nodes(session_dir: Path) -> Iterator[LocalCluster]:
    log_dir = session_dir / "logs-replicas"
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(4, os.environ["LAYERLINK_CLUSTER"], log_dir=log_dir, name_prefix="rep")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def serve(model: Path, nodes: list[Any], log: Path, replicas: int) -> CoordinatorProcess:
    args = ["--objective", "throughput", "--concurrency", "8", "--replicas", str(replicas)]
    return CoordinatorProcess(model, nodes, log, [*args, "--check-tokens", "8"], timeout=300)


async def burst(url: str, model: str) -> tuple[list[tuple[str, int]], float]:
    """The eight prompts at once: answers and the aggregate decode rate (tokens after each
    request's first, over the time from the earliest first token to the last end)."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        got = await asyncio.gather(*(stream_chat(c, model, p, TOKENS) for p in PROMPTS))
    first = min(g[2] for g in got)
    end = max(g[3] for g in got)
    decoded = sum(g[1] - 1 for g in got)
    return [(g[0], g[1]) for g in got], decoded / (end - first)


async def one_by_one(url: str, model: str) -> list[tuple[str, int]]:
    """The eight prompts, each alone."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        out = []
        for p in PROMPTS:
            text, n, _, _ = await stream_chat(c, model, p, TOKENS)
            out.append((text, n))
        return out


def test_eight_streams_match_their_solo_runs_on_1_2_and_4_replicas(
    four_nodes: LocalCluster, tiny_llama: Path, tmp_path: Path
) -> None:
    solo: list[tuple[str, int]] = []
    report: list[str] = []
    for replicas in (1, 2, 4):
        proc = serve(tiny_llama, four_nodes.nodes, tmp_path / f"up-{replicas}.log", replicas)
        try:
            state = httpx.get(proc.url + "/api/state", timeout=30).json()
            serving = state["serving"]
            assert serving["replicas"] == replicas
            if replicas == 1:
                assert "replicas" not in state  # one replica: today's single supervisor
                solo = asyncio.run(one_by_one(proc.url, tiny_llama.name))
                assert len({s[0] for s in solo}) == len(PROMPTS), "prompts should differ"
            else:
                nodes = [set(r["nodes"]) for r in state["replicas"]]
                assert len(nodes) == replicas
                assert sum(len(n) for n in nodes) == len(set().union(*nodes)), "shared nodes"
            answers, measured = asyncio.run(burst(proc.url, tiny_llama.name))
            for i, (got, want) in enumerate(zip(answers, solo, strict=True)):
                assert got[1] == want[1] == TOKENS, f"request {i}: {got[1]} vs {want[1]} tokens"
                assert got[0] == want[0], f"request {i} differs under {replicas} replica(s)"
            if replicas > 1:
                after = httpx.get(proc.url + "/api/state", timeout=30).json()["replicas"]
                # 8 at once over equal replicas: the router spreads them over every replica.
                assert all(r["routed"] >= 1 for r in after), after
                assert sum(r["routed"] for r in after) == len(PROMPTS), after
                assert all(r["in_flight"] == 0 and r["healthy"] for r in after), after
                prom = httpx.get(proc.url + "/metrics", timeout=30).text
                for r in after:
                    n = r["replica"]
                    assert (
                        f'layerlink_replica_requests_total{{replica="{n}"}} {r["routed"]}' in prom
                    )
                    assert f'layerlink_replica_up{{replica="{n}"}} 1' in prom
            predicted = float(serving["aggregate_tps"])
            report.append(
                f"{replicas} replica(s), {serving['shape']}: predicted {predicted:.1f} tok/s in "
                f"all, measured {measured:.1f} ({100 * (predicted / measured - 1):+.0f}%)"
            )
        finally:
            proc.stop()
    cores = os.cpu_count()
    print(f"\n8 concurrent streams, tiny model, 4 local nodes on {cores} logical CPUs:")
    for line in report:
        print("  " + line)


def test_plan_weighs_replicas_on_the_live_cluster(
    four_nodes: LocalCluster, tiny_llama: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coordinator plan --model` over the four live nodes: every candidate with its
    prediction; the nodes share one machine, so the aggregate is capped by its CPU."""
    from coordinator.main import main

    args = ["plan", "--model", str(tiny_llama), "--json", "--objective", "throughput"]
    for n in four_nodes.nodes:
        args += ["--node", n.address]
    assert main([*args, "--concurrency", "8"]) == 0
    out = json.loads(capsys.readouterr().out)
    cands = out["candidates"]
    assert {c["replicas"] for c in cands} == {1, 2, 3, 4}
    assert all(c["fits"] for c in cands)
    chosen = next(c for c in cands if c["chosen"])
    assert chosen["aggregate_tps"] == max(c["aggregate_tps"] for c in cands)
    assert out["serving"]["replicas"] == chosen["replicas"] == len(out["replicas"])
    # One machine's CPU: hops only cost it (the chosen replicas have none), and no candidate
    # predicts more than the fastest of the chosen (single-stage) replicas alone on each of
    # the cores the nodes run on.
    assert all(len(stages) == 1 for stages in chosen["stages"]), chosen
    assert any(c["shared_hosts"] for c in cands), cands
    alone = max(r["predicted"]["decode_tps"] for r in out["replicas"])
    cores = len(os.sched_getaffinity(0))
    assert all(c["aggregate_tps"] <= cores * alone * 1.001 for c in cands), (alone, cands)
    print(f"\nlive plan for 8 requests: {out['serving']['explanation']}")


def test_the_replica_benchmark_compares_predicted_and_measured(tiny_llama: Path) -> None:
    """`python -m coordinator.lab.replicabench`, shrunk: its own nodes, `coordinator up`, a
    burst of streams, the plan's prediction beside the measured rate."""
    from coordinator.lab import replicabench

    doc = replicabench.run(tiny_llama, replica_counts=(2,), streams=2, tokens=6, rounds=1, nodes=2)
    (row,) = doc["rows"]
    assert row["replicas"] == 2 and row["shape"] == "2 replicas of 1 stage"
    assert row["predicted_tps"] > 0 and len(row["measured_tps"]) == 1
    assert row["measured_median_tps"] > 0 and row["error"] is not None
    assert doc["machine"]["loadavg_end"] is not None or os.name != "posix"
