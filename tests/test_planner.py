"""Planner: exact against brute force, never worse than exo's or mlx-lm's splits, one device
when that is best, fast enough for 70B over 8 devices, a heuristic beyond 8."""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time

import pytest

from coordinator.costmodel import (
    GIB,
    Cluster,
    DeviceSpec,
    LinkSpec,
    ModelSpec,
    Placement,
    Workload,
    hop_cost,
    predict,
    stage_decode_cost,
    stage_memory,
)
from coordinator.plan import Plan
from coordinator.planner import (
    PlanChoice,
    even_split,
    memory_split,
    min_memory_bytes,
    objective_s,
    plan,
    to_plan,
)
from coordinator.whatif import parse

MB = 1_000_000


# ---------------------------------------------------------------------------------------------
# Random heterogeneous clusters


def random_model(rng: random.Random, layers: int, total_bytes: float) -> ModelSpec:
    """Uneven layer sizes so that prefix sums and ranges matter."""
    raw = [rng.uniform(0.6, 1.4) for _ in range(layers)]
    scale = 0.9 * total_bytes / sum(raw)
    return ModelSpec(
        name=f"rand{layers}",
        layers=layers,
        hidden=rng.choice([2048, 4096, 8192]),
        heads=32,
        kv_heads=8,
        head_dim=128,
        vocab=32000,
        intermediate=11008,
        layer_bytes=tuple(int(r * scale) for r in raw),
        embed_bytes=int(0.05 * total_bytes),
        head_bytes=int(0.05 * total_bytes),
        layer_params=int(scale),
    )


def random_cluster(rng: random.Random, n: int, model_bytes: float) -> Cluster:
    n_nodes = rng.randint(1, min(n, 4))
    nodes = [f"n{i}" for i in range(n_nodes)]
    devices = []
    for i in range(n):
        node = nodes[i] if i < n_nodes else rng.choice(nodes)
        kind = rng.choice(["cuda", "cuda", "metal", "cpu"])
        devices.append(
            DeviceSpec(
                id=f"{node}/{i}",
                node=node,
                name=f"{kind}-{i}",
                kind=kind,
                mem_free_bytes=int(rng.uniform(0.12, 1.2) * model_bytes),
                stream_gbs=rng.uniform(20, 1000),
                matmul_tflops=rng.uniform(1, 80),
                per_layer_overhead_s=rng.choice([0.0, rng.uniform(0, 200e-6)]),
            )
        )
    links = []
    for a in nodes:
        for b in nodes:
            if a != b:
                links.append(
                    LinkSpec(
                        a,
                        b,
                        rng.uniform(50e-6, 3e-3),
                        rng.uniform(0.05e9, 5e9),
                        rng.uniform(0, 500e-6),
                    )
                )
    for da in devices:
        for db in devices:
            if da.node == db.node and da.id != db.id:
                links.append(LinkSpec(da.id, db.id, rng.uniform(10e-6, 100e-6), 10e9, 3e-4, "pcie"))
    return Cluster(tuple(devices), tuple(links))


def brute_force(model: ModelSpec, cluster: Cluster, workload: Workload, objective: str) -> float:
    """Every ordered subset of devices and every contiguous split, costed with the cost
    model's primitives; independent of the planner's tables and DP."""
    L = model.layers
    ids = [d.id for d in cluster.devices]
    stage: dict[tuple[str, int, int], float] = {}
    for d in cluster.devices:
        for s in range(L):
            for e in range(s + 1, L + 1):
                if stage_memory(model, d, s, e, workload).fits:
                    stage[(d.id, s, e)] = stage_decode_cost(model, d, s, e, workload).total_s
    hop = {
        (a, b): hop_cost(cluster.link(a, b), model.hop_bytes_per_token).total_s
        for a in ids
        for b in ids
        if a != b
    }
    ring = {(a, b): hop_cost(cluster.link(a, b), 4).total_s for a in ids for b in ids if a != b}
    m = workload.concurrency
    best = math.inf
    for k in range(1, min(len(ids), L) + 1):
        for cuts in itertools.combinations(range(1, L), k - 1):
            bounds = (0, *cuts, L)
            for order in itertools.permutations(ids, k):
                times = []
                for i, dev in enumerate(order):
                    t = stage.get((dev, bounds[i], bounds[i + 1]))
                    if t is None:
                        break
                    times.append(t)
                else:
                    total = sum(times) + sum(hop[order[i], order[i + 1]] for i in range(k - 1))
                    if k > 1:
                        total += ring[order[-1], order[0]]
                    value = total if objective == "latency" else max(total / m, max(times))
                    best = min(best, value)
    return best


# ---------------------------------------------------------------------------------------------
# Regret


def test_regret_200_random_clusters_against_brute_force_and_baselines() -> None:
    rng = random.Random(20260604)
    regrets: list[float] = []
    vs_even: list[float] = []
    vs_memory: list[float] = []
    even_no_fit = memory_no_fit = 0
    checked = 0
    for i in range(200):
        n = 2 + i % 7  # 2..8 devices, evenly
        total = rng.uniform(5, 60) * GIB
        cluster = random_cluster(rng, n, total)
        small = random_model(rng, 5 if n >= 7 else 6, total)
        objective = "throughput" if i % 4 == 3 else "latency"
        w = Workload(context=2048, prompt_tokens=256, concurrency=rng.randint(2, 8))
        if objective == "latency":
            w = Workload(context=2048, prompt_tokens=256)

        # 1. Exact: within 1% of brute force (in fact equal up to rounding).
        reference = brute_force(small, cluster, w, objective)
        choice = plan(small, cluster, w, objective)
        if math.isinf(reference):
            assert not choice.placements, f"cluster {i}: planned a model that cannot fit"
        else:
            assert choice.fits
            got = choice.objective_value()
            assert got <= reference * 1.01, f"cluster {i}: {got} vs optimum {reference}"
            regrets.append(got / reference - 1.0)
            checked += 1

        # 2. Never worse than exo's (memory) or mlx-lm's (even) split, on a 40-layer model.
        big = random_model(rng, 40, total)
        mine = plan(big, cluster, w, objective)
        for split, bucket in ((even_split, vs_even), (memory_split, vs_memory)):
            base = predict(big, cluster, split(big, cluster.devices), w)
            if not base.fits:
                if split is even_split:
                    even_no_fit += 1
                else:
                    memory_no_fit += 1
                continue
            assert mine.fits, f"cluster {i}: a baseline fits but the planner found nothing"
            ours = mine.objective_value()
            theirs = objective_s(base, objective, w.concurrency)
            assert ours <= theirs * (1 + 1e-9), f"cluster {i}: worse than {split.__name__}"
            bucket.append(theirs / ours - 1.0)

    assert checked >= 100
    assert max(regrets) < 1e-6
    report = (
        f"regret vs brute force over {checked} feasible clusters: median "
        f"{100 * statistics.median(regrets):.4f}%, max {100 * max(regrets):.4f}%\n"
        f"better than even split (mlx-lm): median {100 * statistics.median(vs_even):.1f}%, "
        f"max {100 * max(vs_even):.1f}% over {len(vs_even)} clusters where it fits "
        f"(it does not fit on {even_no_fit})\n"
        f"better than memory split (exo): median {100 * statistics.median(vs_memory):.1f}%, "
        f"max {100 * max(vs_memory):.1f}% over {len(vs_memory)} clusters where it fits "
        f"(it does not fit on {memory_no_fit})"
    )
    print("\n" + report)


def test_heuristic_beyond_8_devices_stays_close_to_exact() -> None:
    """The >8-device heuristic, forced on clusters the exact search can check."""
    rng = random.Random(7)
    regrets = []
    for i in range(30):
        n = 3 + i % 6
        total = rng.uniform(5, 60) * GIB
        cluster = random_cluster(rng, n, total)
        model = random_model(rng, 32, total)
        w = Workload(context=2048, prompt_tokens=256)
        exact = plan(model, cluster, w)
        heur = plan(model, cluster, w, exact_limit=0)
        assert heur.exact is False and exact.exact is True
        if not exact.fits:
            continue
        assert heur.fits
        regrets.append(heur.objective_value() / exact.objective_value() - 1.0)
    print(
        f"\nheuristic regret over {len(regrets)} clusters: median "
        f"{100 * statistics.median(regrets):.3f}%, max {100 * max(regrets):.3f}%"
    )
    assert statistics.median(regrets) < 0.01
    assert max(regrets) < 0.10


def test_twelve_devices_use_the_heuristic_and_beat_the_baselines() -> None:
    rng = random.Random(12)
    total = 60 * GIB
    cluster = random_cluster(rng, 12, total)
    model = random_model(rng, 80, total)
    w = Workload()
    t0 = time.perf_counter()
    choice = plan(model, cluster, w)
    elapsed = time.perf_counter() - t0
    assert not choice.exact and choice.fits
    assert elapsed < 5.0
    for split in (even_split, memory_split):
        base = predict(model, cluster, split(model, cluster.devices), w)
        if base.fits:
            assert choice.objective_value() <= base.token_s * (1 + 1e-9)


# ---------------------------------------------------------------------------------------------
# Behaviour people ask about


MIXED = {
    "nodes": [
        {"name": "gamer", "devices": [{"name": "RTX 3090"}]},
        {"name": "pc", "devices": [{"name": "RTX 2060 Super", "count": 2}]},
        {"name": "mac", "devices": [{"name": "M4 Pro", "mem_gb": 48}]},
    ],
    "network": {"latency_us": 200, "bandwidth_gbps": 10},
}
LLAMA_8B = {
    "name": "llama-3-8b",
    "params_b": 8.03,
    "layers": 32,
    "hidden": 4096,
    "heads": 32,
    "kv_heads": 8,
    "vocab": 128256,
    "bits_per_weight": 4.85,
}
LLAMA_70B = {**LLAMA_8B, "name": "llama-3-70b", "params_b": 70.6, "layers": 80, "hidden": 8192,
             "heads": 64}  # fmt: skip


def test_one_device_when_it_fits_and_is_fastest() -> None:
    w = parse({**MIXED, "model": LLAMA_8B})
    choice = plan(w.model, w.cluster, w.workload)
    assert [p.device for p in choice.placements] == ["gamer/0"]
    assert choice.placements[0].start == 0 and choice.placements[0].end == 32
    assert choice.explanation.startswith("everything on gamer (RTX 3090): it fits")
    assert "fastest" in choice.explanation and "splitting only adds hops" in choice.explanation
    # And it is right: every two-device split of the same model is slower.
    for other in ("pc/0", "mac/0"):
        split = [Placement("gamer/0", 0, 16), Placement(other, 16, 32)]
        assert predict(w.model, w.cluster, split, w.workload).token_s > choice.cost.token_s  # type: ignore[union-attr]


def test_splits_when_the_fast_device_is_too_small() -> None:
    doc = {
        "nodes": [
            {"name": "pc", "devices": [{"name": "RTX 3090"}]},
            {"name": "mac", "devices": [{"name": "M4 Pro", "mem_gb": 48}]},
        ],
        "network": {"latency_us": 200, "bandwidth_gbps": 10},
        "model": LLAMA_70B,
    }
    w = parse(doc)
    choice = plan(w.model, w.cluster, w.workload)
    assert choice.fits and len(choice.placements) == 2
    assert "no single device holds the model" in choice.explanation
    # The 3090 streams faster than the Mac: it is filled as far as its memory allows.
    on_gpu = next(p for p in choice.placements if p.device == "pc/0")
    gpu_mem = next(m for m in choice.cost.memory if m.device == "pc/0")  # type: ignore[union-attr]
    layer = w.model.layer_bytes[0] + w.model.kv_bytes_per_token_layer * w.workload.context
    assert gpu_mem.headroom_bytes < layer
    assert on_gpu.end - on_gpu.start > 30


def test_throughput_objective_splits_for_concurrency() -> None:
    doc = {"nodes": [{"name": "pc", "devices": [{"name": "RTX 2060 Super", "count": 4}]}]}
    w = parse({**doc, "model": LLAMA_8B}, concurrency=4)
    latency = plan(w.model, w.cluster, w.workload, "latency")
    throughput = plan(w.model, w.cluster, w.workload, "throughput")
    assert len(latency.placements) == 1
    assert len(throughput.placements) >= 3
    assert throughput.cost.throughput_tps > 2.5 * latency.cost.throughput_tps  # type: ignore[union-attr]
    assert "requests in flight" in throughput.explanation


def test_identical_devices_keep_their_order() -> None:
    doc = {"nodes": [{"name": "pc", "devices": [{"name": "RTX 2060 Super", "count": 3}]}]}
    w = parse({**doc, "model": {**LLAMA_8B, "params_b": 34.4, "layers": 60, "hidden": 7168,
                                "heads": 56, "vocab": 64000}})  # fmt: skip
    choice = plan(w.model, w.cluster, w.workload)
    assert [p.device for p in choice.placements] == ["pc/0", "pc/1", "pc/2"]


def test_nothing_fits_says_by_how_much() -> None:
    doc = {"nodes": [{"name": "pc", "devices": [{"name": "RTX 2060 Super", "count": 2}]}]}
    w = parse({**doc, "model": LLAMA_70B})
    choice = plan(w.model, w.cluster, w.workload)
    assert not choice.fits and choice.placements == () and choice.prediction is None
    need = min_memory_bytes(w.model, w.workload)
    have = sum(d.mem_free_bytes for d in w.cluster.devices)
    assert f"short by {(need - have) / GIB:.1f} GiB" in choice.explanation


def test_70b_over_8_devices_plans_in_under_2_seconds() -> None:
    doc = {
        "nodes": [
            {"name": "pc1", "devices": [{"name": "RTX 2060 Super", "count": 3}]},
            {"name": "pc2", "devices": [{"name": "RTX 3090"}, {"name": "RTX 3060 12GB"}]},
            {"name": "mac1", "devices": [{"name": "M4 Pro", "mem_gb": 48}]},
            {"name": "mac2", "devices": [{"name": "M2 Max", "mem_gb": 32}]},
            {"name": "pc3", "devices": [{"name": "RTX 4060 Ti 16GB"}]},
        ],
        "network": {"latency_us": 250, "bandwidth_gbps": 2.5},
        "model": LLAMA_70B,
    }
    w = parse(doc)
    assert len(w.cluster.devices) == 8
    t0 = time.perf_counter()
    choice = plan(w.model, w.cluster, w.workload)
    elapsed = time.perf_counter() - t0
    print(f"\n70B over 8 devices: planned in {elapsed:.3f} s: {choice.explanation}")
    assert choice.exact and choice.fits
    assert elapsed < 2.0


def test_to_plan_builds_the_runners_plan() -> None:
    w = parse({**MIXED, "model": LLAMA_70B})
    choice = plan(w.model, w.cluster, w.workload)
    nodes = {
        d.id: (f"id-{d.node}", d.node, f"{d.node}.lan:50051", d.id.split("/")[1])
        for d in w.cluster.devices
    }
    p = to_plan(choice, w.model.layers, nodes)
    assert isinstance(p, Plan)
    assert [(s.start, s.end) for s in p.stages] == [(c.start, c.end) for c in choice.placements]
    assert p.predicted is not None and p.predicted.decode_tps == pytest.approx(
        choice.cost.decode_tps  # type: ignore[union-attr]
    )
    assert p.explanation == choice.explanation and p.plan_id.startswith("p")
    with pytest.raises(KeyError):
        to_plan(choice, w.model.layers, {})
    with pytest.raises(ValueError):
        to_plan(PlanChoice("m", "latency", 1, (), None, "does not fit", True), 80, nodes)


def test_unknown_objective_is_rejected() -> None:
    w = parse({**MIXED, "model": LLAMA_8B})
    with pytest.raises(ValueError, match="objective"):
        plan(w.model, w.cluster, w.workload, "fastest")
