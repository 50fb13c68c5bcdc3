"""`coordinator experiment split-penalty` on the tiny model: every output file, every row, and
(as root) the namespace-LAN rows with llama.cpp's layers on servers inside the namespaces."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.lab import bench, experiment
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
    )
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
