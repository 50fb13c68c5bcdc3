"""A node of one replica dies: new requests go to the other replicas at once, requests in
flight resume on another replica with the tokens of an uninterrupted run, and the lost
replica is re-planned over its remaining nodes, or dropped when none remain."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from coordinator.lab.localcluster import LocalCluster
from coordinator.pipeline import GenerationParams
from coordinator.plan import Plan
from coordinator.router import ReplicaRouter
from coordinator.session import ModelInfo, even_counts, fixed_plan, open_pipeline, read_model
from coordinator.supervisor import Supervisor
from node.mdns import NodeRecord
from tests.helpers import reference_generate, wait_until

PROMPTS = [[5, 9, 33, 71, 2], [7, 1, 40, 3], [11, 12, 13], [60, 2, 9, 9, 4, 1]]
N = 80


def replica(model: ModelInfo, nodes: list[NodeRecord]) -> Supervisor:
    """A Supervisor whose re-plans spread the layers evenly over the nodes it has left."""

    async def planner(records: list[NodeRecord]) -> Plan:
        ordered = sorted(records, key=lambda r: r.name)
        return fixed_plan(model, ordered, even_counts(model.num_layers, len(ordered)))

    async def opener(plan: Plan):  # type: ignore[no-untyped-def]
        return await open_pipeline(plan, model, show_progress=False)

    return Supervisor(nodes, planner, opener)


async def scenario(cluster: LocalCluster, model_path: Path) -> dict[str, object]:
    model = read_model(model_path)
    n = cluster.nodes  # n0, n1: replica 1 (two stages); n2: replica 2; n3: replica 3
    groups = [[n[0], n[1]], [n[2]], [n[3]]]
    sups = [replica(model, g) for g in groups]  # type: ignore[arg-type]
    for s in sups:
        await s.start()
    router = ReplicaRouter(sups)
    params = GenerationParams(max_tokens=N, step_timeout_s=60)
    seen: list[list[int]] = [[] for _ in PROMPTS]
    progress = asyncio.Event()

    async def run(i: int) -> list[int]:
        async for ev in router.stream(PROMPTS[i], params):
            seen[i].append(ev.token)
            if all(len(t) >= 10 for t in seen[:3]):
                progress.set()
        return seen[i]

    try:
        # Three requests at once: one on each replica (equal predictions: the least loaded).
        first = [asyncio.create_task(run(i)) for i in range(3)]
        await asyncio.wait_for(progress.wait(), 120)
        assert router.routed == [1, 1, 1], router.routed
        os.kill(cluster.procs[n[1].name].pid, signal.SIGKILL)  # replica 1 loses a stage
        await wait_until(lambda: 0 not in router.healthy(), 30, "replica 1 marked failed")
        # A new request while replica 1 recovers goes to another replica.
        before = list(router.routed)
        late = asyncio.create_task(run(3))
        await wait_until(lambda: len(seen[3]) >= 1, 60, "the new request's first token")
        assert router.routed[0] == before[0], "a new request went to the failed replica"
        results = await asyncio.gather(*first, late)
        await wait_until(lambda: router.healthy() == [0, 1, 2], 60, "replica 1 re-planned")
        recovered = sups[0].recoveries[0]
        # Replica 3 loses its only node: dropped, its request resumes elsewhere.
        late_tokens: list[int] = []
        flowing = asyncio.Event()

        async def on_replica_three() -> list[int]:
            async for ev in router.stream(PROMPTS[0], params):
                late_tokens.append(ev.token)
                if len(late_tokens) == 10:
                    flowing.set()
            return late_tokens

        # Replicas 1 and 2 look busy for a moment, so that this request lands on replica 3.
        routed = list(router.routed)
        router.load[0] += 5
        router.load[1] += 5
        try:
            on_three = asyncio.create_task(on_replica_three())
            await asyncio.wait_for(flowing.wait(), 120)
        finally:
            router.load[0] -= 5
            router.load[1] -= 5
        assert router.routed == [routed[0], routed[1], routed[2] + 1], router.routed
        os.kill(cluster.procs[n[3].name].pid, signal.SIGKILL)
        dropped = await on_three
        await wait_until(lambda: sups[2].fatal is not None, 60, "replica 3 given up")
        return {
            "results": results,
            "dropped": dropped,
            "recovered": recovered,
            "healthy": router.healthy(),
            "resumed": router.resumed,
            "fatal": sups[2].fatal,
            "json": router.to_json(),
        }
    finally:
        await router.close()


def test_a_replica_losing_nodes_is_replanned_then_dropped(
    tiny_llama: Path, session_dir: Path
) -> None:
    refs = [reference_generate(tiny_llama, p, N)[0] for p in PROMPTS]
    with LocalCluster(4, "replica-faults", log_dir=session_dir, name_prefix="rf") as cluster:
        out = asyncio.run(scenario(cluster, tiny_llama))
    results = out["results"]
    assert isinstance(results, list)
    for i, tokens in enumerate(results):
        assert tokens == refs[i], f"request {i} differs from an uninterrupted run"
    assert out["dropped"] == refs[0], "the request of the dropped replica differs"
    assert out["resumed"] >= 2  # replica 1's request, then replica 3's
    recovered = out["recovered"]
    assert isinstance(recovered, dict) and recovered["stages"] == 1
    assert out["healthy"] == [0, 1]
    assert "no nodes remain" in str(out["fatal"])
    rows = out["json"]
    assert isinstance(rows, list) and [r["healthy"] for r in rows] == [True, True, False]
