"""`coordinator experiment split-penalty` on the tiny model: every output file, every row, and
(as root) the namespace-LAN rows with llama.cpp's layers on servers inside the namespaces."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.lab import bench, experiment, latency
from coordinator.main import main
from coordinator.session import read_model

ModelFactory = Callable[..., Path]
HAVE_LLAMA = bench.baseline_unavailable() == ""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_split_penalty_writes_every_file(
    model_factory: ModelFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = model_factory("tiny", "llama", gguf=True)
    out = tmp_path / "exp"
    code = main(["experiment", "split-penalty", "--model", str(model), "--out", str(out),
                 "--stages", "2", "--repeats", "1", "--gen-tokens", "4", "--prompt-tokens", "8",
                 "--no-netns"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    for name in ("results.json", "results.csv", "decode.png", "ttft.png", "report.md"):
        assert (out / name).is_file(), name
    for name in ("decode.png", "ttft.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["condition"], r["system"]): r for r in doc["rows"]}
    systems = [bench.SYSTEM_LAYERLINK] + ([bench.SYSTEM_LLAMA] if HAVE_LLAMA else [])
    for system in systems:
        one, split = rows[("1 stage", system)], rows[("one host", system)]
        assert one["error"] is None and split["error"] is None
        assert one["layers"] == [8] and split["layers"] == [4, 4]
        assert one["per_hop_ms"] is None and split["per_hop_ms"] is not None
        assert split["decode_tps"] > 0 and split["ttft_s"] > 0
    assert rows[("one process", bench.SYSTEM_MLX_LM)]["error"] is None
    assert not any(r["condition"].startswith("LAN") for r in doc["rows"])
    assert any("namespace-LAN rows skipped" in n for n in doc["notes"])
    assert doc["machine"]["logical_cpus"] >= 1 and doc["command"].startswith("coordinator ")
    with (out / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(doc["rows"]) and {"condition", "per_hop_ms"} <= table[0].keys()
    report = (out / "report.md").read_text()
    assert "| condition | system |" in report and "## Machine" in report
    assert "coordinator experiment split-penalty" in report and "(decode.png)" in report
    assert "namespace-LAN rows skipped" in report


def test_links_are_validated(model_factory: ModelFactory, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    model = model_factory("tiny", "llama")
    code = main(["experiment", "split-penalty", "--model", str(model), "--out",
                 str(tmp_path), "--links", "lan,100gbe"])  # fmt: skip
    assert code == 2 and "100gbe" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--stages"):
        experiment.split_penalty(
            experiment.ExperimentSettings(model_dir=model, out_dir=tmp_path, stages=1)
        )


@pytest.mark.netns
@pytest.mark.skipif(experiment.netns_unavailable() != "", reason=experiment.netns_unavailable())
def test_namespace_rows_cross_the_bridge(model_factory: ModelFactory, tmp_path: Path) -> None:
    """One shaped condition (1 GbE): nodes and RPC servers inside the namespaces, the
    measuring process in the hub namespace."""
    model_dir = model_factory("tiny", "llama", gguf=True)
    model = read_model(model_dir)
    settings = experiment.ExperimentSettings(
        model_dir=model_dir, out_dir=tmp_path, stages=2, repeats=1, gen_tokens=4,
        prompt_tokens=8, links=("1gbe",),
    )  # fmt: skip
    systems = (
        (bench.SYSTEM_LAYERLINK, bench.SYSTEM_LLAMA) if HAVE_LLAMA else (bench.SYSTEM_LAYERLINK,)
    )
    gguf = model_dir / "model.gguf" if HAVE_LLAMA else None
    rows = experiment.netns_rows(
        settings, model, gguf, systems, experiment.select_links(("1gbe",)), lambda _m: None
    ).rows
    assert {(r.spec.system, r.spec.stages) for r in rows} == {
        (s, k) for s in systems for k in (1, 2)
    }
    for r in rows:
        assert r.ok, r.error
    ones = [r for r in rows if r.spec.stages == 1]
    assert all([(p.start, p.end) for p in r.placement] == [(0, 8)] for r in ones)
    rows = [r for r in rows if r.spec.stages == 2]
    assert all(r.per_hop_ms is not None for r in experiment.bench.with_per_hop([*ones, *rows])
               if r.spec.stages == 2)  # fmt: skip
    for r in rows:
        assert r.ok, r.error
        assert r.spec.deployment == "LAN 1 GbE" and r.spec.layers == (4, 4)
        assert [(p.start, p.end) for p in r.placement] == [(0, 4), (4, 8)]
    ll = next(r for r in rows if r.spec.system == bench.SYSTEM_LAYERLINK)
    assert [p.where for p in ll.placement] == ["exp0", "exp1"]
    if HAVE_LLAMA:
        lc = next(r for r in rows if r.spec.system == bench.SYSTEM_LLAMA)
        # llama.cpp's own load log puts the layers on the servers inside the namespaces.
        assert [p.where for p in lc.placement] == [
            f"10.213.0.1:{experiment.RPC_PORT}",
            f"10.213.0.2:{experiment.RPC_PORT}",
        ]


@pytest.mark.netns
@pytest.mark.skipif(experiment.netns_unavailable() != "", reason=experiment.netns_unavailable())
def test_latency_rows_rise_with_the_emulated_delay(model_factory: ModelFactory,
                                                   tmp_path: Path) -> None:  # fmt: skip
    """The relay at 0 ms and at 1 ms one-way: both systems' rows, per-hop ms clearly higher
    at 1 ms (a 2 ms round trip per hop is far above this machine's noise), the probe sees
    the delay, LayerLink's rows carry the cost model's prediction from that probe, and the
    report has the latency chart and paragraph."""
    model_dir = model_factory("tiny", "llama", gguf=True)
    out = tmp_path / "exp"
    settings = experiment.ExperimentSettings(
        model_dir=model_dir, out_dir=out, stages=2, repeats=2, gen_tokens=8,
        prompt_tokens=8, links=("relay0", "busy"),
    )  # fmt: skip
    result = experiment.split_penalty(settings)
    systems = [bench.SYSTEM_LAYERLINK] + ([bench.SYSTEM_LLAMA] if HAVE_LLAMA else [])
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["condition"], r["system"], r["stages"]): r for r in doc["rows"]}
    for system in systems:
        zero = rows[("LAN relay 0 ms", system, 2)]
        one = rows[("LAN 1 ms", system, 2)]
        for r in (zero, one, rows[("LAN 1 ms", system, 1)]):
            assert r["error"] is None, r["error"]
        assert zero["one_way_ms"] == 0.0 and one["one_way_ms"] == 1.0
        assert one["per_hop_ms"] > zero["per_hop_ms"] + 0.5, (system, zero, one)
    links = {f["condition"]: f for f in doc["links"]}
    assert set(links) == {"LAN relay 0 ms", "LAN 1 ms"}
    # The probe measured the data path through the relays: ~1 ms more one-way at 1 ms.
    extra_us = links["LAN 1 ms"]["probe_latency_us"] - links["LAN relay 0 ms"]["probe_latency_us"]
    assert 700 < extra_us < 1500, links
    for cond in links:
        for k in (1, 2):
            ll = rows[(cond, bench.SYSTEM_LAYERLINK, k)]
            assert ll["predicted_tps"] is not None and ll["predicted_tps"] > 0, ll
            assert ll["prediction_error"] == pytest.approx(
                ll["predicted_tps"] / ll["decode_tps"] - 1, abs=1e-3
            )
    lat = doc["latency"]
    assert lat["slopes"][bench.SYSTEM_LAYERLINK]["per_hop_ms_per_ms_rtt"] > 0
    if HAVE_LLAMA:
        assert lat["slopes"][bench.SYSTEM_LLAMA]["per_hop_ms_per_ms_rtt"] > 0
    assert lat["prediction"]["rows"] == 2 and lat["prediction"]["median_abs_error"] is not None
    assert "per ms of RTT" in lat["paragraph"]
    assert (out / "latency.png").read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "## Latency" in report and "(latency.png)" in report and lat["paragraph"] in report
    assert any(f.name == "latency.png" for f in result.files)


def test_latency_analysis_reads_slopes_crossing_and_overhead() -> None:
    """The paragraph's numbers come from the rows: a slope per ms of RTT per system, a
    crossing between two measured delays, the relay's cost against the direct link."""
    ll, lc = bench.SYSTEM_LAYERLINK, bench.SYSTEM_LLAMA

    def row(cond: str, system: str, one_way: float | None, tps: float, hop: float) -> dict:  # type: ignore[type-arg]
        return {"condition": cond, "system": system, "stages": 3, "one_way_ms": one_way,
                "link_gbit_s": None, "decode_tps": tps, "ms_per_token": 1e3 / tps,
                "per_hop_ms": hop, "error": None, "probe_latency_us": None,
                "prediction_error": 0.1 if system == ll and one_way is not None else None,
                "predicted_tps": None}  # fmt: skip

    # LayerLink: 1 ms + 0.75 ms per ms RTT per hop; llama.cpp: 0.5 ms + 3 ms per ms RTT.
    rows = [row("LAN", ll, None, 50.0, 1.0), row("LAN", lc, None, 200.0, 0.5)]
    for d in (0.0, 0.25, 1.0, 3.0):
        rtt = 2 * d
        rows.append(row(f"LAN {d} ms", ll, d, 1e3 / (20 + 1.5 * (1 + 0.75 * rtt)), 1 + 0.75 * rtt))
        rows.append(row(f"LAN {d} ms", lc, d, 1e3 / (5 + 1.5 * (0.5 + 3 * rtt)), 0.5 + 3 * rtt))
    rows[2]["per_hop_ms"] += 0.02  # the relay's own cost on LayerLink's 0 ms row
    a = latency.analyse(rows)
    assert a["slopes"][lc]["per_hop_ms_per_ms_rtt"] == pytest.approx(3.0, abs=1e-3)
    assert a["slopes"][ll]["per_hop_ms_per_ms_rtt"] == pytest.approx(0.75, abs=0.01)
    assert a["crossing"]["kind"] == "measured" and a["crossing"]["faster_at_low_latency"] == lc
    # 21.5 + 1.125 r = 5.75 + 4.5 r at r = 4.67 ms RTT, between the 2 and 6 ms rows.
    assert a["crossing"]["rtt_ms"] == pytest.approx(4.667, abs=0.01)
    assert a["overhead"][ll]["per_hop_ms"] == pytest.approx(0.02, abs=1e-6)
    assert a["prediction"]["median_abs_error"] == pytest.approx(0.1) and a["prediction"]["met"]
    assert "cross at about" in a["paragraph"] and "llama.cpp RPC pays 4.0x" in a["paragraph"]
    # ms/token slopes: LayerLink 1.125 per ms RTT, llama.cpp 4.5 = 1.5 round trips x 3 servers.
    assert "1.5 ms per token per ms of RTT expected, 1.12 ± 0.00 measured" in a["paragraph"]
    assert "about 1.5 round trips per token" in a["paragraph"]


def test_real_nodes_rows(local_cluster, model_factory: ModelFactory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """--node: rows measured on nodes named by address (the real-LAN mode), LayerLink only
    when no llama.cpp RPC servers are named."""
    import asyncio

    model = model_factory("tiny", "llama")
    nodes = asyncio.run(experiment.resolve_nodes([n.address for n in local_cluster.nodes[:2]]))
    assert [n.name for n in nodes] == [n.name for n in local_cluster.nodes[:2]]
    settings = experiment.ExperimentSettings(
        model_dir=model, out_dir=tmp_path, stages=2, repeats=1, gen_tokens=4, prompt_tokens=8,
        netns=False, lan_nodes=nodes,
    )  # fmt: skip
    result = experiment.split_penalty(settings, (bench.SYSTEM_LAYERLINK, bench.SYSTEM_LLAMA))
    cluster = [r for r in result.rows if r.spec.deployment == experiment.DEPLOY_CLUSTER]
    assert [(r.spec.system, r.spec.stages) for r in cluster] == [
        (bench.SYSTEM_LAYERLINK, 1),
        (bench.SYSTEM_LAYERLINK, 2),
    ]
    assert all(r.ok for r in cluster) and cluster[1].per_hop_ms is not None
    assert [p.where for p in cluster[1].placement] == [n.name for n in nodes]
    assert cluster[1].predicted_tps is None  # this machine's figures do not predict others
    assert any("no llama.cpp RPC servers named" in n for n in result.notes)
    with pytest.raises(ValueError, match="--node must be given 2 times"):
        experiment.split_penalty(replace_nodes(settings, nodes[:1]))


def replace_nodes(
    settings: experiment.ExperimentSettings, nodes: tuple[bench.NodeRef, ...]
) -> experiment.ExperimentSettings:
    from dataclasses import replace

    return replace(settings, lan_nodes=nodes)
