"""The planner's validation harness (coordinator/lab/validation.py): without running a cluster,
the plan sets meet issue 4's shape, predictions are compared with measurements correctly, the
reports keep the fit set apart from the held-out plans and are written where they belong; and
the quick check (`coordinator validate-planner --quick`) on real loopback nodes: the committed
constants predict held-out plans' decode time within 25% (median)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.calibrate import DecodeFit, FitResult, LiveCalibration
from coordinator.costmodel import ModelSpec
from coordinator.lab import validation
from coordinator.lab.bench import SYSTEM_LAYERLINK, RunResult, RunSpec, Sample
from coordinator.lab.validation import (
    ACCEPT_QUICK_MEDIAN,
    CALIBRATION_CASES,
    QUICK_CASES,
    VALIDATION_CASES,
    Case,
    ValidationResult,
    ValidationSettings,
    make_rows,
    run_validation,
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
    # Streaming: the session's timings alone (another buffer size than the probe's).
    assert d0["stream_by_dtype"]["float32"] == pytest.approx(4.2)  # median of 2.0 4.4 4.2
    assert d0["matmul_tflops"] == pytest.approx(0.00625)  # of 0.006 (probe) 0.002 0.007 0.0065
    assert d1["stream_by_dtype"]["float32"] == pytest.approx(3.9)  # its one session timing
    none = validation.session_probe(probe, [], "float32")["nodes"][0]["devices"][0]
    assert none["stream_by_dtype"]["float32"] == 4.0  # no session timing: the probe's
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
    with pytest.raises(ValueError, match="cannot --calibrate"):
        ValidationSettings.quick_check(calibrate=True).check()
    with pytest.raises(ValueError, match="tiny"):
        ValidationSettings.quick_check(models=("small",)).check()
    with pytest.raises(ValueError, match="--fit-clusters"):
        ValidationSettings(fit_clusters=("wan",)).check()
    with pytest.raises(ValueError, match="--fit-clusters"):
        ValidationSettings(fit_clusters=()).check()
    with pytest.raises(ValueError, match="cpu policy"):
        ValidationSettings(cpu_policy="all").check()
    ValidationSettings().check()
    ValidationSettings.quick_check().check()


def test_quick_check_is_a_few_held_out_plans_on_loopback() -> None:
    assert 3 <= len(QUICK_CASES) <= 6
    assert all(c in VALIDATION_CASES for c in QUICK_CASES)
    assert {c.model for c in QUICK_CASES} == {"tiny"}
    assert {c.condition for c in QUICK_CASES} == {validation.LOOPBACK}  # no namespaces
    assert {len(c.counts) for c in QUICK_CASES} == {1, 2, 3}
    assert not {c.model for c in QUICK_CASES} & {c.model for c in CALIBRATION_CASES}
    s = ValidationSettings.quick_check()
    assert s.quick and not s.calibrate and not s.netns
    assert s.out_json is None and s.docs is None  # the full run's report is left alone
    # The production placement of local clusters, whatever the environment (conftest: none).
    assert s.cpu_policy == "spread"


def test_report_names_the_placement() -> None:
    # Loopback nodes as local clusters place them; the LAN's stand for machines of their own.
    spread = validation.cpu_placement("spread")
    assert spread.startswith("loopback nodes as local clusters place them, spread (n0 on core ")
    assert "namespace-LAN nodes not pinned" in spread
    assert "spread (not pinned)" not in spread
    assert "none (not pinned)" in validation.cpu_placement("none")


def _result(fitted: bool) -> ValidationResult:
    """Two held-out plans (errors -10% and 0%), and with `fitted` two fit-set plans (+4%, -2%)."""
    cal = LiveCalibration(0.9, 0.4, 480e-6, 600e-6, 900e-6, ring_hop=True)
    spec: ModelSpec = model(8, 2.9, "tiny")
    small: ModelSpec = model(4, 2.9, "tiny-4L")
    probe = probe_json()
    ids = ["id0", "id1", "id2"]
    held = [Case("validation", "tiny", "loopback", (8,), (0,)),
            Case("validation", "tiny", "loopback", (4, 4), (0, 1))]  # fmt: skip
    fit = [Case("calibration", "tiny-4L", "loopback", (4,), (1,)),
           Case("calibration", "tiny-4L", "loopback", (2, 2), (1, 2))]  # fmt: skip
    specs = {"tiny": spec, "tiny-4L": small}
    settings = ValidationSettings(calibrate=fitted, out_json=None, docs=None)

    def rows(cases: list[Case], ratios: list[float]) -> list[validation.Row]:
        blank = {"probe": probe, "runs": [run(c, 1.0, 0.1).to_json() for c in cases]}
        pred = [r.predicted_ms or 0.0 for r in make_rows(cases, blank, specs, ids, "float32",
                                                         settings, cal)]  # fmt: skip
        reply = {"probe": probe,
                 "runs": [run(c, p / k, 0.1).to_json() for c, p, k in zip(cases, pred, ratios, strict=True)]}  # fmt: skip
        return make_rows(cases, reply, specs, ids, "float32", settings, cal)

    held_rows = rows(held, [0.9, 1.0])
    fit_rows = rows(fit, [1.04, 0.98]) if fitted else []
    decode = DecodeFit(True, 1 / 0.9, 480e-6, 600e-6, 900e-6, 0.03)
    return ValidationResult(
        rows=tuple(held_rows),
        calibration_rows=tuple(fit_rows),
        calibration=cal,
        fit=FitResult(cal, decode, None, 0.1, 2) if fitted else None,
        probes={},
        machine={
            "git_commit": "abc1234",
            "loadavg_start": [1.5],
            "loadavg_end": [2.5],
            "duration_s": 600,
            "cpu_placement": "spread (n0 on core 0)",
        },  # fmt: skip
        notes=(),
        settings=settings,
        decode=stats(held_rows, lambda r: r.decode_error),
        decode_fit_set=stats(fit_rows, lambda r: r.decode_error),
    )


def test_report_keeps_the_fit_set_apart_from_the_held_out_plans() -> None:
    doc = validation.report_json(_result(fitted=True))
    split = doc["split"]
    assert split["held_out"]["models"] == ["tiny"]
    assert split["fit_set"]["models"] == ["tiny-4L"] and split["fit_set"]["fitted_in_this_run"]
    held, fit = split["held_out"]["decode_ms_per_token"], split["fit_set"]["decode_ms_per_token"]
    assert (held["plans"], held["median_abs_error"], held["worst_abs_error"]) == (
        2, pytest.approx(0.05), pytest.approx(0.1))  # fmt: skip
    assert (fit["plans"], fit["median_abs_error"], fit["worst_abs_error"]) == (
        2, pytest.approx(0.03, abs=1e-3), pytest.approx(0.04, abs=1e-3))  # fmt: skip
    text = validation.report_markdown(doc)
    assert "**Held out (the validation plans; models tiny, which the fit never saw)" in text
    assert "median absolute error 5.0%, worst 10.0%" in text
    assert "fit set (the 2 calibration plans, models tiny-4L on loopback, in sample): " in text
    assert "in sample): median 3.0%, worst 4.0%" in text
    assert "load average 1.5 -> 2.5" in text and "(10 minutes)" in text
    assert "at commit abc1234" in text


def test_report_without_a_fit_names_the_constants_source() -> None:
    doc = validation.report_json(_result(fitted=False))
    assert not doc["split"]["fit_set"]["fitted_in_this_run"]
    source = doc["split"]["fit_set"]["source"]
    assert source.startswith("Fitted by `coordinator validate-planner")  # calibration.csv's
    assert "the constants come from calibration.csv (Fitted by" in validation.report_markdown(doc)


@pytest.mark.slow
def test_quick_check_predicts_held_out_plans_within_25_percent(tmp_path: Path) -> None:
    """`coordinator validate-planner --quick` on real loopback nodes pinned as local clusters
    are: the committed constants (fitted on other models) and device/link figures measured in
    this session, under this session's load, predict the tiny model's plans. The median over
    the plans of |predicted / measured - 1| (each a median of interleaved repeats) must stay
    within 25%: a code change that makes the planner's figure rot fails here."""
    settings = ValidationSettings.quick_check(
        model_root=tmp_path / "models", out_json=tmp_path / "quick.json"
    )
    result = run_validation(settings, on_event=print)
    m = result.machine
    print(f"load average {m['loadavg_start']} -> {m['loadavg_end']}, {m['duration_s']} s, "
          f"placement {m['cpu_placement']}")  # fmt: skip
    for r in result.rows:
        print(f"{r.case.label}: predicted {r.predicted_ms} ms/token, measured {r.measured_ms} "
              f"(first probe alone {r.predicted_single_ms}), error {r.decode_error}")  # fmt: skip
    failed = [f"{r.case.label}: {r.run.error}" for r in result.rows if not r.run.ok]
    assert not failed
    d = result.decode
    print(f"median |error| {d.median_abs}, worst {d.worst_abs} ({d.worst_label}) over {d.n}")
    assert d.n == len(QUICK_CASES)
    assert d.median_abs is not None and d.median_abs <= ACCEPT_QUICK_MEDIAN, (
        f"median decode error {d.median_abs:.1%} > {ACCEPT_QUICK_MEDIAN:.0%}"
    )
    assert result.quick_met
    assert (tmp_path / "quick.json").is_file()


def test_cli_help_and_bad_combinations(capsys: pytest.CaptureFixture[str]) -> None:
    from coordinator.main import main

    with pytest.raises(SystemExit) as e:  # the help text has a percentage in it
        main(["validate-planner", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--fit-clusters" in out and "25%" in out
    assert main(["validate-planner", "--quick", "--calibrate"]) == 2
    assert "cannot --calibrate" in capsys.readouterr().err
    assert main(["validate-planner", "--calibrate", "--fit-clusters", "wan", "--no-docs"]) == 2
    assert "--fit-clusters" in capsys.readouterr().err
