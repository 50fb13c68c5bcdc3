"""`make device-check` (coordinator/lab/devicecheck.py) runs end to end here in its dry mode,
so that the script prepared for a GPU machine cannot rot; its report holds to the documented
format (coordinator/schemas/devicecheck.schema.json, docs/hardware-runs.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from coordinator.bundled import smollm2_gguf
from coordinator.lab import devicecheck
from node import hardware, nvml

SCHEMA = json.loads(
    (Path(devicecheck.__file__).parents[1] / "schemas" / "devicecheck.schema.json").read_text()
)
ROOT = Path(__file__).resolve().parents[1]


def run_check(out: Path, *extra: str, timeout: float = 600) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "coordinator.lab.devicecheck", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    report_path = out / devicecheck.REPORT_FILE
    assert report_path.is_file(), done.stderr[-3000:]
    report: dict[str, Any] = json.loads(report_path.read_text())
    jsonschema.validate(report, SCHEMA)
    return done.returncode, report


def test_dry_run_runs_every_part_here(tmp_path: Path) -> None:
    rc, report = run_check(tmp_path, "--dry-run")
    parts = report["parts"]
    assert rc == 0 and report["summary"]["failed"] == [], json.dumps(parts, indent=1)[:4000]
    assert report["dry_run"] and report["machine"]["mlx_backend"] == hardware.mlx_backend()
    assert parts["nvml"]["status"] == ("ok" if nvml.read_gpus()[0] else "skipped")
    nodes = parts["nodes"]["nodes"]
    assert len(nodes) >= 2
    for n in nodes:
        assert n["info"]["backend"] == hardware.mlx_backend()
        stage_devices = [d for d in n["info"]["devices"] if d.get("runs_stages")]
        assert len(stage_devices) == 1 and stage_devices[0]["mem_source"]
    bench = parts["device_bench"]["nodes"]
    assert bench and all(b["reply"]["devices"][0]["stream_gbs"] > 0 for b in bench)
    assert parts["pipeline"]["status"] == "ok"
    assert all(p["equal"] and p["tokens"] for p in parts["pipeline"]["prompts"])
    if smollm2_gguf() is None:
        assert parts["real_model"]["status"] == "skipped"
    else:
        real = parts["real_model"]
        assert real["status"] == "ok" and "Paris" in real["answer"]["text"]
        assert [(r["system"], r["stages"]) for r in real["runs"]] == [
            ("mlx_lm", 1), ("layerlink", 1), ("layerlink", 2)
        ]  # fmt: skip
        assert all(r["decode_tps"] > 0 and r["error"] is None for r in real["runs"])
    assert parts["llama_cpp"]["status"] in ("ok", "skipped")
    if parts["llama_cpp"]["status"] == "ok":
        assert parts["llama_cpp"]["decode_tps"] > 0
    assert (tmp_path / devicecheck.LOG_FILE).is_file()


def test_without_mlx_cuda_the_gpu_parts_say_why_they_were_skipped(tmp_path: Path) -> None:
    if hardware.mlx_backend() == "cuda":
        pytest.skip("MLX drives a CUDA GPU here: the full check would run")
    rc, report = run_check(tmp_path, timeout=120)
    assert rc == 0 and not report["dry_run"]
    for name in ("nodes", "device_bench", "pipeline", "real_model"):
        part = report["parts"][name]
        assert part["status"] == "skipped" and "no CUDA backend" in part["reason"], part


def test_a_part_that_breaks_or_runs_out_of_time_costs_only_itself(tmp_path: Path) -> None:
    check = devicecheck.Check(tmp_path, True, 100.0, devicecheck.Sizes.for_run(True))

    def broken() -> dict[str, Any]:
        raise KeyError("bug")

    check.part("a", broken, 1)
    check.part("b", lambda: {"value": 1}, 1)
    check.part("c", lambda: pytest.fail("ran without time for it"), 1000)
    assert check.parts["a"]["status"] == "failed" and "KeyError" in check.parts["a"]["reason"]
    assert check.parts["b"]["status"] == "ok" and check.parts["b"]["value"] == 1
    assert check.parts["c"]["status"] == "skipped" and "out of time" in check.parts["c"]["reason"]


def test_make_target_runs_the_module() -> None:
    dry = subprocess.run(["make", "-n", "device-check", "DRY=1"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert "-m coordinator.lab.devicecheck --out device-check --dry-run" in dry
    full = subprocess.run(["make", "-n", "device-check"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    assert "--dry-run" not in full.splitlines()[-1]
