"""`coordinator bench` and its building blocks: the JSON a user gets, where the layers really
were, the per-hop arithmetic, and a killed llama.cpp RPC server reported as an error (no hang).

Speeds are never asserted: these tests check shapes, placements and failure paths."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.lab import bench
from coordinator.lab.bench import (
    DEPLOY_IN_PROCESS,
    DEPLOY_LOOPBACK,
    SYSTEM_FLOOR,
    SYSTEM_LAYERLINK,
    SYSTEM_LLAMA,
    SYSTEM_MLX_LM,
    RunResult,
    RunSpec,
    Sample,
)
from coordinator.main import main
from tests.helpers import reference_generate

ModelFactory = Callable[..., Path]
HAVE_LLAMA = bench.baseline_unavailable() == ""


def result(system: str, stages: int, ms: float, deployment: str = DEPLOY_LOOPBACK,
           model: str = "tiny") -> RunResult:  # fmt: skip
    counts = tuple(bench.even_counts(8, stages))
    samples = tuple(Sample(32, 65, 0.1, ms * 64 / 1e3) for _ in range(3))
    return RunResult(RunSpec(model, system, deployment, stages, counts), samples)


# ----- pure parts ------------------------------------------------------------------------------


def test_per_hop_is_split_minus_unsplit_over_added_hops() -> None:
    runs = bench.with_per_hop([
        result(SYSTEM_MLX_LM, 1, 9.0, DEPLOY_IN_PROCESS),
        result(SYSTEM_LAYERLINK, 1, 10.0),
        result(SYSTEM_LAYERLINK, 2, 10.5),
        result(SYSTEM_LAYERLINK, 3, 12.0),
        result(SYSTEM_LLAMA, 1, 1.0, DEPLOY_IN_PROCESS),
        result(SYSTEM_LLAMA, 1, 2.0),
        result(SYSTEM_LLAMA, 3, 5.0),
        result(SYSTEM_LAYERLINK, 2, 11.0, "LAN 1 GbE"),
    ])  # fmt: skip
    hop = {(r.spec.system, r.spec.stages, r.spec.deployment): r.per_hop_ms for r in runs}
    assert hop[(SYSTEM_LAYERLINK, 1, DEPLOY_LOOPBACK)] is None
    assert hop[(SYSTEM_LAYERLINK, 2, DEPLOY_LOOPBACK)] == pytest.approx(0.5)
    assert hop[(SYSTEM_LAYERLINK, 3, DEPLOY_LOOPBACK)] == pytest.approx(1.0)
    # llama.cpp's reference is one RPC server, never the in-process engine.
    assert hop[(SYSTEM_LLAMA, 3, DEPLOY_LOOPBACK)] == pytest.approx(1.5)
    # A LAN row without a 1-stage LAN row falls back to the loopback 1-stage row.
    assert hop[(SYSTEM_LAYERLINK, 2, "LAN 1 GbE")] == pytest.approx(1.0)
    r = runs[2]
    assert r.ms_per_token == pytest.approx(10.5)
    assert r.decode_tps == pytest.approx(1000 / 10.5)
    assert r.prefill_tps == pytest.approx(320.0)


def test_failed_run_has_no_numbers_and_no_per_hop() -> None:
    failed = RunResult(RunSpec("tiny", SYSTEM_LLAMA, DEPLOY_LOOPBACK, 2, (4, 4)), error="gone")
    runs = bench.with_per_hop([result(SYSTEM_LLAMA, 1, 2.0), failed])
    j = runs[1].to_json()
    assert j["error"] == "gone" and j["decode_tps"] is None and j["per_hop_ms"] is None
    assert RunResult.from_json(j) == runs[1]


def test_suite_checks_compute_issue_9_ratios() -> None:
    runs = bench.with_per_hop([
        result(SYSTEM_MLX_LM, 1, 10.0, DEPLOY_IN_PROCESS, "small"),
        result(SYSTEM_LAYERLINK, 1, 10.2, model="small"),
        result(SYSTEM_LAYERLINK, 1, 20.0),
        result(SYSTEM_LAYERLINK, 3, 20.4),
        result(SYSTEM_LLAMA, 1, 2.0),
        result(SYSTEM_LLAMA, 3, 6.0),
    ])  # fmt: skip
    checks = {c.name: c for c in bench.suite_checks(runs, rtt_us=100.0)}
    c = checks["small: LayerLink 1 stage / mlx_lm, ms per token"]
    assert c.value == pytest.approx(1.02) and c.met
    c = checks["tiny: LayerLink 3 stages, per hop / raw socket RTT"]
    assert c.value == pytest.approx(2.0) and c.met  # 0.2 ms per hop vs 100 us
    c = checks["tiny: LayerLink / llama.cpp RPC per hop, 3 stages"]
    assert c.value == pytest.approx(0.1) and c.met
    c = checks["tiny: LayerLink 3 stages / 1 stage, tokens per s"]
    assert c.value == pytest.approx(20.0 / 20.4) and c.met


def test_checks_compare_layerlink_with_the_floor() -> None:
    runs = bench.with_per_hop([
        result(SYSTEM_LAYERLINK, 1, 10.0),
        result(SYSTEM_LAYERLINK, 3, 13.0),
        result(SYSTEM_FLOOR, 3, 12.4),
    ])  # fmt: skip
    checks = {c.name: c for c in bench.suite_checks(runs, rtt_us=100.0)}
    c = checks["tiny: LayerLink 3 stages above the floor, ms per hop"]
    assert c.value == pytest.approx(0.2) and c.met is None  # 0.6 ms over 3 hops
    c = checks["tiny: floor 3 stages / LayerLink 1 stage, tokens per s"]
    assert c.value == pytest.approx(10.0 / 12.4)


@pytest.mark.parametrize(
    ("dtype", "layers"), [("float32", (3, 3, 2)), ("bfloat16", (3, 3, 2)), ("float32", (8,))]
)
def test_floor_ring_generates_what_the_unsplit_model_does(
    model_factory: ModelFactory, dtype: str, layers: tuple[int, ...]
) -> None:
    """The floor (a bare ring of worker processes) runs the real split: its greedy tokens
    are mlx_lm's own (bfloat16 activations travel as their bit patterns); so are those of a
    ring of one, which looks ahead."""
    model = model_factory("tiny", "llama", dtype=dtype)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    prompt = bench.prompt_ids(vocab, 8)
    spec = bench.RunSpec("tiny", SYSTEM_FLOOR, DEPLOY_LOOPBACK, len(layers), layers)
    runner = bench.FloorRunner(spec, model, prompt, 6)

    async def run() -> bench.Sample:
        await runner.setup()
        try:
            return await runner.sample()
        finally:
            await runner.close()

    sample = asyncio.run(run())
    want, _ = reference_generate(model, prompt, 6)
    assert runner.last_ids == want
    assert sample.tokens == 6 and sample.decode_s > 0


def test_settings_are_checked() -> None:
    s = bench.BenchSettings(model_dir=Path("."), stages=3)
    assert s.check(8) == (3, 3, 2)
    for bad in ({"stages": 9}, {"stages": 0}, {"gen_tokens": 1}, {"repeats": 0},
                {"stages": 2, "layer_counts": (3, 3)}):  # fmt: skip
        with pytest.raises(ValueError):
            bench.BenchSettings(model_dir=Path("."), **bad).check(8)  # type: ignore[arg-type]


def test_raw_socket_rtt_is_measured() -> None:
    rtt = bench.raw_socket_rtt(message_bytes=8192, rounds=200, warmup=20)
    assert rtt.message_bytes == 8192 and rtt.rounds == 200
    assert 0 < rtt.p10_us <= rtt.median_us <= rtt.p90_us < 1e6


def test_machine_info_names_the_machine() -> None:
    m = bench.end_load(bench.machine_info())
    assert m["logical_cpus"] and m["cpu"] and m["python"] and m["mlx"]
    assert "loadavg_start" in m and "loadavg_end" in m


# ----- the command ---------------------------------------------------------------------------


def test_bench_json_on_local_nodes(
    model_factory: ModelFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coordinator bench --system both --stages 2 --json` starts its own nodes and RPC
    servers, reports both systems on the same split, with the layers where they were asked."""
    model = model_factory("tiny", "llama", gguf=True)
    code = main(["bench", "--model", str(model), "--system", "both", "--stages", "2",
                 "--repeats", "1", "--gen-tokens", "6", "--prompt-tokens", "8", "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0, out
    assert {"runs", "machine"} <= out.keys()
    assert out["machine"]["logical_cpus"] >= 1
    runs = {(r["system"], r["deployment"], r["stages"]): r for r in out["runs"]}
    for r in out["runs"]:
        assert {"system", "stages", "layers", "decode_tps", "prefill_tps", "ttft_s",
                "per_hop_ms"} <= r.keys()  # fmt: skip
        assert r["error"] is None, r["error"]
        assert r["repeats"] == 1 and r["decode_tps"] > 0 and r["ttft_s"] > 0
        assert sum(r["layers"]) == 8
    ll2 = runs[(SYSTEM_LAYERLINK, DEPLOY_LOOPBACK, 2)]
    assert ll2["layers"] == [4, 4]
    assert [p["layers"] for p in ll2["placement"]] == [[0, 4], [4, 8]]
    assert ll2["per_hop_ms"] is not None
    assert runs[(SYSTEM_LAYERLINK, DEPLOY_LOOPBACK, 1)]["per_hop_ms"] is None
    if not HAVE_LLAMA:
        (row,) = [r for r in out["runs"] if r["system"] == SYSTEM_LLAMA]
        assert "not installed" in row["error"] or "unavailable" in row["error"]
        return
    rpc2 = runs[(SYSTEM_LLAMA, DEPLOY_LOOPBACK, 2)]
    assert rpc2["layers"] == ll2["layers"]
    # Checked against llama.cpp's own load log: each RPC server holds its half.
    assert [p["layers"] for p in rpc2["placement"]] == [[0, 4], [4, 8]]
    endpoints = [p["where"] for p in rpc2["placement"]]
    assert len(set(endpoints)) == 2 and all(e.startswith("127.0.0.1:") for e in endpoints)
    assert rpc2["per_hop_ms"] is not None
    assert runs[(SYSTEM_LLAMA, DEPLOY_IN_PROCESS, 1)]["placement"][0]["where"] == "client"


def test_bench_without_baseline_says_so(
    model_factory: ModelFactory, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        bench, "baseline_unavailable", lambda: "llama.cpp baseline not installed: test"
    )
    model = model_factory("tiny", "llama")
    code = main(["bench", "--model", str(model), "--system", "llama-rpc", "--repeats", "1",
                 "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    (row,) = out["runs"]
    assert row["system"] == SYSTEM_LLAMA and "not installed" in row["error"]
    assert any("not installed" in n for n in out["notes"])


def test_bench_rejects_bad_arguments(
    model_factory: ModelFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    model = model_factory("tiny", "llama")
    assert main(["bench", "--model", str(model), "--stages", "9"]) == 2
    assert "--stages" in capsys.readouterr().err
    assert main(["bench", "--model", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----- a server killed mid-benchmark ---------------------------------------------------------


@pytest.mark.skipif(not HAVE_LLAMA, reason="llama.cpp baseline not installed")
def test_killed_rpc_server_is_a_clear_error_not_a_hang(model_factory: ModelFactory) -> None:
    from node.llama_rpc import LlamaRpcServer

    model_dir = model_factory("tiny", "llama", gguf=True)
    a = LlamaRpcServer("127.0.0.1", 0, threads=1).start()
    b = LlamaRpcServer("127.0.0.1", 0, threads=1).start()
    events: list[str] = []

    def kill_b_once_loaded(event: str) -> None:
        events.append(event)
        if event.endswith(": loaded") and b.running():
            b.kill()

    prompt = bench.prompt_ids(512, 8)
    spec2 = RunSpec("tiny", SYSTEM_LLAMA, DEPLOY_LOOPBACK, 2, (4, 4))
    spec1 = RunSpec("tiny", SYSTEM_LLAMA, DEPLOY_LOOPBACK, 1, (8,))
    gguf = model_dir / "model.gguf"
    try:
        runners: list[bench.Runner] = [
            bench.LlamaRunner(spec1, gguf, [a.endpoint], prompt, 8, 1, 30.0),
            # Long enough that the kill lands while it decodes; a second repeat would find
            # the server gone at once.
            bench.LlamaRunner(
                spec2, gguf, [a.endpoint, b.endpoint], prompt, 1500, 1, 30.0, kill_b_once_loaded
            ),  # fmt: skip
        ]
        start = time.monotonic()
        results = asyncio.run(bench.measure(runners, repeats=2, sample_timeout_s=30.0))
        elapsed = time.monotonic() - start
    finally:
        a.stop()
        b.stop()
    assert elapsed < 60
    ok, failed = results
    assert ok.ok and len(ok.samples) == 2
    assert not failed.ok and failed.error
    assert b.endpoint in failed.error and "llama.cpp 2-stage run" in failed.error
    assert "not answering" in failed.error or "died" in failed.error
    row = failed.to_json()
    assert row["error"] == failed.error and row["per_hop_ms"] is None
    assert any(e.endswith(": loaded") for e in events)


def test_negative_per_hop_is_noise_not_a_pass() -> None:
    runs = bench.with_per_hop([result(SYSTEM_LAYERLINK, 1, 10.0), result(SYSTEM_LAYERLINK, 2, 9.0),
                               result(SYSTEM_LLAMA, 1, 2.0), result(SYSTEM_LLAMA, 2, 3.0)])  # fmt: skip
    checks = bench.suite_checks(runs, rtt_us=50.0)
    assert checks and all(c.met is None for c in checks)
    assert all("noise" in c.detail for c in checks)


def test_suite_checks_judge_the_real_models_predictions_and_floor_ratio() -> None:
    """From the runs alone: each LayerLink run's own prediction against its measured speed
    (a target on the real model, a report elsewhere), and its 3/1 ratio against the floor's."""
    from dataclasses import replace

    real = bench.REAL_MODEL
    runs = bench.with_per_hop([
        replace(result(SYSTEM_LAYERLINK, 1, 100.0, model=real), predicted_tps=8.0),  # 10 tok/s
        replace(result(SYSTEM_LAYERLINK, 3, 125.0, model=real), predicted_tps=5.0),  # 8 tok/s
        result(SYSTEM_FLOOR, 1, 100.0, model=real),
        result(SYSTEM_FLOOR, 3, 110.0, model=real),
        replace(result(SYSTEM_LAYERLINK, 1, 10.0), predicted_tps=50.0),
    ])  # fmt: skip
    checks = {c.name: c for c in bench.suite_checks(runs, rtt_us=100.0)}
    c = checks[f"{real}: LayerLink 1 stages, predicted vs measured tokens per s"]
    assert c.value == pytest.approx(0.2) and c.met is True
    c = checks[f"{real}: LayerLink 3 stages, predicted vs measured tokens per s"]
    assert c.value == pytest.approx(0.375) and c.met is False
    c = checks["tiny: LayerLink 1 stages, predicted vs measured tokens per s"]
    assert c.value == pytest.approx(0.5) and c.met is None
    c = checks[f"{real}: LayerLink 3/1 stages minus the floor's 3/1 stages, tokens per s"]
    assert c.value == pytest.approx(0.8 - 100 / 110) and c.met is False
