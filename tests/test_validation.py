"""The planner's validation harness (coordinator/lab/validation.py), without running a cluster: the
plan sets meet issue 4's shape, predictions are compared with measurements correctly, and the
reports are written where they belong."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.calibrate import LiveCalibration
from coordinator.costmodel import ModelSpec
from coordinator.lab import validation
from coordinator.lab.bench import SYSTEM_LAYERLINK, RunResult, RunSpec, Sample
from coordinator.lab.validation import (
    CALIBRATION_CASES,
    VALIDATION_CASES,
    Case,
    ValidationSettings,
    make_rows,
    stats,
)
from tests.test_calibrate import model, probe_json


def test_plan_sets_have_the_shape_issue_4_asks_for() -> None:
    val = VALIDATION_CASES
    assert len(val) >= 8
    assert {c.model for c in val} == {"tiny", "small"}
    assert {len(c.counts) for c in val} == {1, 2, 3}
    uneven = [c for c in val if len(set(c.counts)) > 1 and max(c.counts) - min(c.counts) > 1]
    assert uneven, "uneven splits"
    assert {c.condition for c in val} == {validation.LOOPBACK, validation.LAN}
    lan = next(x for x in validation.CONDITIONS if x.key == validation.LAN)
    assert lan.shaping, "the LAN condition shapes links"
    assert any(set(c.nodes) & {k for k, _ in lan.shaping} for c in val if c.condition == "lan")
    # Calibration never sees a validation model (nor a validation plan).
    assert not {c.model for c in CALIBRATION_CASES} & {c.model for c in val}
    models = {m.key: m for m in validation.MODELS}
    for c in (*val, *CALIBRATION_CASES):
        assert sum(c.counts) == models[c.model].layers, c.label
        assert len(set(c.nodes)) == len(c.nodes) and max(c.nodes) < validation.NODE_COUNT


def run(case: Case, ms: float, ttft_s: float, error: str = "") -> RunResult:
    spec = RunSpec(case.model, SYSTEM_LAYERLINK, case.condition, len(case.counts), case.counts)
    samples = () if error else tuple(Sample(32, 65, ttft_s, ms * 64 / 1e3) for _ in range(3))
    return RunResult(spec, samples, error=error)


def test_rows_compare_the_prediction_with_the_measurement() -> None:
    cal = LiveCalibration(0.9, 0.4, 480e-6, 600e-6, 900e-6, ring_hop=False)
    spec: ModelSpec = model(8, 2.9, "tiny")
    probe = probe_json()
    node_ids = ["id0", "id1", "id2"]
    cases = [
        Case("validation", "tiny", "loopback", (8,), (0,)),
        Case("validation", "tiny", "loopback", (4, 4), (2, 1)),
        Case("validation", "tiny", "loopback", (3, 3, 2), (0, 1, 2)),
    ]
    settings = ValidationSettings()
    blank = {"probe": probe, "runs": [run(c, 1.0, 0.1).to_json() for c in cases]}
    predicted = [
        r.predicted_ms
        for r in make_rows(cases, blank, {"tiny": spec}, node_ids, "float32", settings, cal)
    ]
    assert all(p is not None and p > 0 for p in predicted)
    # Measure 10% slower than predicted, exactly as predicted, and a failed run.
    assert predicted[0] is not None and predicted[1] is not None
    reply = {
        "probe": probe,
        "runs": [
            run(cases[0], predicted[0] / 0.9, 0.2).to_json(),
            run(cases[1], predicted[1], 0.2).to_json(),
            run(cases[2], 0.0, 0.0, error="node gone").to_json(),
        ],
    }
    rows = make_rows(cases, reply, {"tiny": spec}, node_ids, "float32", settings, cal)
    assert rows[0].decode_error == pytest.approx(-0.1)
    assert rows[1].decode_error == pytest.approx(0.0, abs=1e-9)
    assert rows[2].decode_error is None and not rows[2].run.ok
    assert rows[1].plan == "n2 [0, 4) + n1 [4, 8)"
    assert rows[1].links.startswith("n2->n1 170 us")
    s = stats(rows, lambda r: r.decode_error)
    assert (s.n, s.median_abs, s.worst_abs) == (2, pytest.approx(0.05), pytest.approx(0.1))
    assert s.worst_label == cases[0].label
    assert s.met(0.15, 0.30) is True and s.met(0.15, 0.05) is False


def test_session_probe_takes_medians_of_every_device_timing() -> None:
    probe = probe_json(2)  # float32 streams 4.0 and 4.1, matmul 0.006
    rounds = [
        {"id0": [{"index": 0, "stream_gbs": 2.0, "matmul_tflops": 0.002}]},  # a busy moment
        {"id0": [{"index": 0, "stream_gbs": 4.4, "matmul_tflops": 0.007}],
         "id1": [{"index": 0, "stream_gbs": 3.9, "matmul_tflops": 0.005}]},
        {"id0": [{"index": 0, "stream_gbs": 4.2, "matmul_tflops": 0.0065}]},
    ]  # fmt: skip
    out = validation.session_probe(probe, rounds, "float32")
    d0, d1 = (n["devices"][0] for n in out["nodes"])
    assert d0["stream_by_dtype"]["float32"] == pytest.approx(4.1)  # median of 4.0 2.0 4.4 4.2
    assert d0["matmul_tflops"] == pytest.approx(0.00625)
    assert d1["stream_by_dtype"]["float32"] == pytest.approx(4.0)  # median of 4.1 and 3.9
    assert d0["stream_by_dtype"]["float16"] == 1.0  # other dtypes untouched
    assert probe["nodes"][0]["devices"][0]["stream_by_dtype"]["float32"] == 4.0  # not mutated


def test_docs_section_is_replaced_between_markers(tmp_path: Path) -> None:
    doc = tmp_path / "planning.md"
    doc.write_text("# Planning\n\nintro\n")
    validation.write_docs_section(doc, "first table")
    text = doc.read_text()
    assert text.startswith("# Planning\n\nintro\n") and "first table" in text
    doc.write_text(text + "\n## Later section\n\nkept\n")
    validation.write_docs_section(doc, "second table")
    text = doc.read_text()
    assert "second table" in text and "first table" not in text
    assert text.count(validation.DOCS_BEGIN) == 1 and text.endswith("## Later section\n\nkept\n")


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="--models"):
        ValidationSettings(models=("huge",)).check()
    with pytest.raises(ValueError, match="--repeats"):
        ValidationSettings(repeats=0).check()
    ValidationSettings().check()
