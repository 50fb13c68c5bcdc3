"""Live calibration (coordinator/calibrate.py): applying the constants to a probe, fitting them
back from measurements, storing them; and the cost model's two token paths (Workload.ring_hop)
with the planner agreeing with it."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from coordinator import calibrate, catalog, planner
from coordinator.calibrate import LiveCalibration, Observation
from coordinator.costmodel import GIB, ModelSpec, Placement, Workload, predict

MB = 1_000_000


def probe_json(n: int = 3, stream: float = 4.0, latency_us: float = 150.0) -> dict[str, Any]:
    """A probe result of n one-CPU nodes, as `ProbeResult.to_json()` writes it."""
    nodes = [
        {
            "id": f"id{i}",
            "name": f"n{i}",
            "devices": [
                {
                    "index": 0,
                    "name": "cpu",
                    "kind": "cpu",
                    "mem_free_bytes": 8 * GIB,
                    "stream_gbs": 1.0,  # the first dtype the probe timed (float16 here)
                    "stream_by_dtype": {"float16": 1.0, "float32": stream + 0.1 * i},
                    "matmul_tflops": 0.006,
                }
            ],
        }
        for i in range(n)
    ]
    links = [
        {"src": f"id{i}", "dst": f"id{j}", "latency_us": latency_us + 10 * i, "bandwidth_gbs": 1.5}
        for i in range(n)
        for j in range(n)
        if i != j
    ]
    return {"nodes": nodes, "links": links}


def model(layers: int, layer_mb: float, name: str) -> ModelSpec:
    return ModelSpec(
        name=name, layers=layers, hidden=256, heads=8, kv_heads=4, head_dim=32, vocab=512,
        intermediate=688, layer_bytes=(int(layer_mb * MB),) * layers, embed_bytes=MB // 2,
        head_bytes=MB // 2, act_bytes=4, kv_bytes=4, layer_params=int(layer_mb * MB / 4),
    )  # fmt: skip


TRUE = LiveCalibration(
    cpu_stream_factor=0.9,
    cpu_matmul_factor=0.4,
    cpu_per_layer_overhead_s=480e-6,
    hop_overhead_s=600e-6,
    token_overhead_s=900e-6,
    ring_hop=False,
)

# (model, counts, node order): 1, 2 and 3 stages over three model shapes.
PLANS = [
    ((4, 2.9), [4], [1]), ((4, 2.9), [2, 2], [1, 2]), ((4, 2.9), [1, 1, 2], [2, 0, 1]),
    ((16, 2.9), [16], [2]), ((16, 2.9), [8, 8], [2, 0]), ((16, 2.9), [4, 6, 6], [1, 2, 0]),
    ((6, 11.8), [6], [1]), ((6, 11.8), [3, 3], [0, 2]), ((6, 11.8), [2, 2, 2], [2, 1, 0]),
]  # fmt: skip


def observations(truth: LiveCalibration, noise: float = 0.0, seed: int = 0) -> list[Observation]:
    """What a cluster that really follows `truth` would measure (with relative noise)."""
    rng = random.Random(seed)
    probe = probe_json()
    out = []
    for (layers, mb), counts, order in PLANS:
        spec = model(layers, mb, f"m{layers}")
        placements, start = [], 0
        for c, i in zip(counts, order, strict=True):
            placements.append(Placement(f"n{i}/0", start, start + c))
            start += c
        blank = Observation(
            f"{spec.name}{counts}", spec, probe, "float32", tuple(placements), 32, 104, 0.0, 0.0
        )
        cost = blank.cost(truth)
        out.append(
            replace(
                blank,
                ms_per_token=cost.token_s * 1e3 * (1 + rng.uniform(-noise, noise)),
                ttft_s=cost.ttft_s * (1 + rng.uniform(-noise, noise)),
            )
        )
    return out


def test_fit_recovers_the_constants_that_generated_the_measurements() -> None:
    result = calibrate.fit(observations(TRUE))
    c = result.calibration
    assert c.ring_hop is False
    assert c.cpu_stream_factor == pytest.approx(0.9, rel=1e-3)
    assert c.cpu_per_layer_overhead_s == pytest.approx(480e-6, rel=1e-3)
    assert c.hop_overhead_s == pytest.approx(600e-6, rel=1e-3)
    assert c.token_overhead_s == pytest.approx(900e-6, rel=1e-3)
    assert c.cpu_matmul_factor == pytest.approx(0.4, rel=1e-3)
    assert result.decode.rms_rel_error < 1e-6
    assert result.other is not None and result.other.rms_rel_error > 1e-3


def test_fit_tells_the_two_token_paths_apart() -> None:
    ring = replace(TRUE, ring_hop=True)
    assert calibrate.fit(observations(ring)).calibration.ring_hop is True


def test_fit_with_noise_stays_close_and_non_negative() -> None:
    truth = replace(TRUE, token_overhead_s=0.0)
    result = calibrate.fit(observations(truth, noise=0.03, seed=3))
    c = result.calibration
    assert c.cpu_stream_factor == pytest.approx(0.9, rel=0.15)
    assert c.cpu_per_layer_overhead_s == pytest.approx(480e-6, rel=0.25)
    assert min(c.hop_overhead_s, c.token_overhead_s, c.cpu_per_layer_overhead_s) >= 0.0
    for o in observations(truth, noise=0.03, seed=3):
        assert o.cost(c).token_s * 1e3 == pytest.approx(o.ms_per_token, rel=0.08)


def test_fit_needs_enough_plans() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        calibrate.fit(observations(TRUE)[:3])


def test_live_cluster_uses_the_models_dtype_and_the_constants() -> None:
    probe = probe_json()
    cl = calibrate.live_cluster(probe, "float32", TRUE)
    d = cl.device("n1/0")
    assert d.stream_gbs == pytest.approx(4.1 * 0.9)  # float32 figure x the factor
    assert d.matmul_tflops == pytest.approx(0.006 * 0.4)
    assert d.per_layer_overhead_s == pytest.approx(480e-6)
    lk = cl.link("n0/0", "n2/0")
    assert lk.latency_s == pytest.approx(150e-6) and lk.overhead_s == pytest.approx(600e-6)
    # A dtype the probe did not time: its first figure, as the probe reported it.
    assert (
        calibrate.live_cluster(probe, "bfloat16", calibrate.UNIT).device("n0/0").stream_gbs == 1.0
    )


def test_live_cluster_leaves_gpus_unscaled() -> None:
    probe = probe_json(2)
    probe["nodes"][0]["devices"][0].update(kind="cuda", stream_by_dtype={"float32": 300.0})
    cl = calibrate.live_cluster(probe, "float32", TRUE)
    gpu = cl.device("n0/0")
    assert gpu.stream_gbs == 300.0 and gpu.matmul_tflops == 0.006
    assert gpu.per_layer_overhead_s == 0.0


def test_live_workload_carries_the_token_path() -> None:
    w = calibrate.live_workload(TRUE, context=2048, prompt_tokens=512, concurrency=2)
    assert (w.sample_s, w.ring_hop, w.concurrency) == (900e-6, False, 2)


@pytest.mark.parametrize(
    ("config", "dtype"),
    [
        ({"torch_dtype": "float32"}, "float32"),
        ({"torch_dtype": "bfloat16"}, "bfloat16"),
        ({"text_config": {"torch_dtype": "float16"}}, "float16"),
        ({"torch_dtype": "float16", "quantization": {"bits": 4, "group_size": 64}}, "q4"),
        ({}, "float16"),
    ],
)
def test_stream_dtype(config: dict[str, Any], dtype: str) -> None:
    assert calibrate.stream_dtype(config) == dtype


def test_ring_hop_off_costs_no_ring_and_the_planner_agrees() -> None:
    spec = model(8, 2.9, "m8")
    cl = calibrate.live_cluster(probe_json(), "float32", TRUE)
    split = [Placement("n0/0", 0, 4), Placement("n1/0", 4, 8)]
    ring = predict(spec, cl, split, Workload(context=104, prompt_tokens=32))
    via = predict(spec, cl, split, Workload(context=104, prompt_tokens=32, ring_hop=False))
    assert len(ring.hops) == 2 and len(via.hops) == 1
    assert ring.token_s - via.token_s == pytest.approx(ring.hops[1].total_s)
    # The planner costs plans as predict does under both token paths: its choice is the
    # brute-force optimum over every split, on a slow node that holds the model and two fast
    # ones that do not.
    small = probe_json()
    for n in small["nodes"][1:]:
        n["devices"][0]["mem_free_bytes"] = 15 * MB
        n["devices"][0]["stream_by_dtype"]["float32"] = 40.0
    cl2 = calibrate.live_cluster(small, "float32", TRUE)
    for ring_hop in (True, False):
        w = Workload(context=104, prompt_tokens=32, sample_s=1e-3, ring_hop=ring_hop)
        choice = planner.plan(spec, cl2, w)
        assert choice.cost is not None and len(choice.placements) > 1
        costs = []
        for order in itertools.permutations(range(3)):
            for k in (1, 2, 3):
                for cuts in itertools.combinations(range(1, 8), k - 1):
                    bounds = [0, *cuts, 8]
                    stages = [
                        Placement(f"n{order[i]}/0", bounds[i], bounds[i + 1]) for i in range(k)
                    ]
                    cost = predict(spec, cl2, stages, w)
                    if cost.fits:
                        costs.append(cost.token_s)
        assert choice.cost.token_s == pytest.approx(min(costs), rel=1e-9)


def test_write_constants_replaces_and_appends_rows_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "calibration.csv"
    original = catalog.DATA.joinpath("calibration.csv").read_text()
    path.write_text(original)
    result = calibrate.fit(observations(TRUE))
    rows = calibrate.constant_rows(result, "Fitted by `a test`, with a comma")
    calibrate.write_constants(rows, path)
    text = path.read_text()
    untouched = [ln for ln in original.splitlines() if ln.split(",", 1)[0] not in rows]
    assert all(ln in text.splitlines() for ln in untouched)
    import csv

    table = {r["key"]: r for r in csv.DictReader(text.splitlines())}
    assert float(table["cpu_stream_factor"]["value"]) == pytest.approx(0.9, rel=1e-3)
    assert table["ring_hop"]["value"] == "0"
    assert "Fitted by `a test`, with a comma" in table["live_hop_overhead_us"]["source"]
    # Writing again replaces, never duplicates.
    calibrate.write_constants(rows, path)
    keys = [ln.split(",", 1)[0] for ln in path.read_text().splitlines()]
    assert len(keys) == len(set(keys))


def test_calibration_csv_loads_into_live_constants() -> None:
    cal = LiveCalibration.load()
    assert cal.cpu_stream_factor > 0 and cal.cpu_matmul_factor > 0
    assert cal.cpu_per_layer_overhead_s >= 0 and cal.hop_overhead_s >= 0
