"""Input validation at the node and in discovery: model paths confined to --model-dir (no
'..', no symlink escapes, on a real node too), addresses, the per-stage request cap, and
malformed or oversized mDNS records ignored with a log line."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from zeroconf import ServiceInfo

from coordinator.lab.localcluster import LocalCluster
from coordinator.nodeclient import NodeClient
from node import inputs, stage
from node._proto.layerlink.v1 import node_pb2 as pb
from node.mdns import SERVICE_TYPE, make_zeroconf
from node.stage import ErrorKind, StageError


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> tuple[Path, Path]:
    """(a --model-dir root holding a copy of the tiny model and links, a folder outside it)."""
    base = tmp_path_factory.mktemp("confine")
    root, outside = base / "models", base / "outside"
    shutil.copytree(tiny_llama, root / "tiny")
    shutil.copytree(tiny_llama, outside / "tiny")
    (root / "escape").symlink_to(outside / "tiny")  # a folder link out of the root
    leaky = root / "leaky"
    leaky.mkdir()
    for f in (root / "tiny").iterdir():
        (leaky / f.name).symlink_to(outside / "tiny" / f.name if f.suffix == ".safetensors" else f)
    (root / "alias").symlink_to(root / "tiny")  # a link that stays inside: fine
    return root, outside


def refusal(raw: str, root: Path) -> str:
    with pytest.raises(StageError) as ei:
        inputs.confine_model_path(raw, [root])
    assert ei.value.kind == ErrorKind.INVALID_ARGUMENT
    return str(ei.value)


def test_model_paths_stay_inside_the_model_directories(roots: tuple[Path, Path]) -> None:
    root, outside = roots
    assert inputs.confine_model_path(str(root / "tiny"), [root]) == (root / "tiny").resolve()
    assert inputs.confine_model_path("tiny", [root]) == (root / "tiny").resolve()
    assert inputs.confine_model_path(str(root / "alias"), [root]) == (root / "tiny").resolve()
    assert "outside" in refusal(str(outside / "tiny"), root)
    assert "'..'" in refusal(str(root / "tiny" / ".." / "tiny"), root)
    assert "'..'" in refusal("../outside/tiny", root)
    assert "outside" in refusal(str(root / "escape"), root)
    assert "links outside" in refusal(str(root / "leaky"), root)
    for raw in ("", "a\x00b", "x" * 5000):
        refusal(raw, root)
    # Without roots (no --model-dir), any folder: the node's owner chose that.
    assert inputs.confine_model_path(str(outside / "tiny"), []) == (outside / "tiny").resolve()


def test_addresses_are_host_and_port() -> None:
    for ok in ("", "127.0.0.1:5", "node-a.local:50151", "[::1]:80"):
        inputs.check_address(ok, "next_address")
    for bad in ("host", "host:", ":80", "host:0", "host:65536", "host:８０", "a b:1", "h:1:2x",
                "x" * 300 + ":1"):  # fmt: skip
        with pytest.raises(StageError, match="next_address"):
            inputs.check_address(bad, "next_address")


def test_a_stage_holds_at_most_max_requests(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = stage.StageSpec(plan_id="cap", model_path=tiny_llama, start=0, end=8, stage_index=0,
                           stage_count=1)  # fmt: skip
    s = stage.ModelStage(spec)
    monkeypatch.setattr(stage, "MAX_REQUESTS", 2)
    for rid in ("a", "b"):
        s.step(rid, 0, True, stage.Sampling(), [1, 2], None, False, False)
    with pytest.raises(StageError) as ei:
        s.step("c", 0, True, stage.Sampling(), [1, 2], None, False, False)
    assert ei.value.kind == ErrorKind.RESOURCE_EXHAUSTED
    s.release("a")
    s.step("c", 0, True, stage.Sampling(), [1, 2], None, False, False)  # room again


@pytest.fixture(scope="module")
def confined_node(roots: tuple[Path, Path], session_dir: Path) -> Iterator[str]:
    logs = session_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with LocalCluster(1, "confine-" + os.urandom(3).hex(), log_dir=logs, name_prefix="confine",
                      extra_args=["--no-advertise", "--model-dir", str(roots[0])]) as c:  # fmt: skip
        yield c.nodes[0].address


def test_a_node_loads_only_inside_its_model_directories(
    confined_node: str, roots: tuple[Path, Path]
) -> None:
    root, outside = roots

    async def load(model_path: str, **kw: str) -> tuple[grpc.StatusCode, str]:
        async with NodeClient(confined_node) as c:
            req = pb.LoadStageRequest(plan_id="p", model_path=model_path, start=0, end=8,
                                      stage_count=1, **kw)  # type: ignore[arg-type]  # fmt: skip
            try:
                await c.load_stage(req)
            except grpc.aio.AioRpcError as e:
                return e.code(), e.details() or ""
            await c.unload_stage("p")
            return grpc.StatusCode.OK, ""

    async def go() -> dict[str, tuple[grpc.StatusCode, str]]:
        out = {}
        for name, raw in [("escape", str(root / "escape")), ("leaky", str(root / "leaky")),
                          ("dotdot", str(root / "tiny" / ".." / "escape")),
                          ("outside", str(outside / "tiny")), ("inside", "tiny")]:  # fmt: skip
            out[name] = await load(raw)
        out["address"] = await load("tiny", next_data_address="nowhere")
        async with NodeClient(confined_node) as c:
            assert not (await c.get_info()).stages  # nothing was left loaded
        return out

    res = asyncio.run(go())
    assert res["inside"] == (grpc.StatusCode.OK, "")
    for name in ("escape", "leaky", "dotdot", "outside", "address"):
        assert res[name][0] == grpc.StatusCode.INVALID_ARGUMENT, (name, res[name])
    assert "links outside" in res["leaky"][1] and "next_data_address" in res["address"][1]


def test_malformed_and_oversized_mdns_records_are_logged_and_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from coordinator.discovery import Browser

    cluster = "mdns-" + os.urandom(3).hex()
    good = {"id": "c" * 32, "name": "fine", "proto": "1", "backend": "cpu", "devices": "1",
            "mem": "1", "port": "1234", "cluster": cluster}  # fmt: skip
    bad = {
        "oversized": {**good, "id": "d" * 32, **{f"pad{i}": "x" * 200 for i in range(6)}},
        "bad-cid": {**good, "id": "e" * 32, "cid": "not-hex"},
        "binary": {**good, "id": "f" * 32, "name": b"\xff\xfe"},
    }

    async def go() -> list[str]:
        zc = make_zeroconf(["127.0.0.1"])
        infos = [
            ServiceInfo(
                SERVICE_TYPE,
                f"{n}-x.{SERVICE_TYPE}",
                addresses=[bytes([127, 0, 0, 1])],
                port=1234,
                properties=props,
                server=f"{n}-x.local.",
            )  # fmt: skip
            for n, props in [("fine", good), *bad.items()]
        ]
        await asyncio.gather(*[await zc.async_register_service(info) for info in infos])
        browser = Browser(cluster, ["127.0.0.1"], cluster_id="")
        await browser.start()
        try:
            await browser.wait_for(1, 5.0)
            for _ in range(100):  # until every bad record was seen and refused
                if sum("ignoring malformed mDNS record" in r.message for r in caplog.records) >= 3:
                    break
                await asyncio.sleep(0.05)
            return sorted(r.name for r in browser.snapshot())
        finally:
            await browser.close()
            await asyncio.gather(*[await zc.async_unregister_service(info) for info in infos])
            await zc.async_close()

    with caplog.at_level(logging.WARNING, logger="coordinator.discovery"):
        names = asyncio.run(go())
    assert names == ["fine"]
    logged = [r.message for r in caplog.records if "ignoring malformed mDNS record" in r.message]
    assert any("oversized-x" in m and "exceeds" in m for m in logged), logged
    assert any("bad-cid-x" in m and "cid" in m for m in logged), logged
    assert any("binary-x" in m for m in logged), logged
