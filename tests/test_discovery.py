"""Real mDNS on loopback: nodes appear when they start and vanish when they stop."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from zeroconf import ServiceInfo

from coordinator.discovery import Browser
from coordinator.lab.localcluster import LocalCluster
from node import hardware
from node.mdns import SERVICE_TYPE, make_zeroconf
from tests.helpers import wait_until

# Quiet, a node appears in about 1 s and a stopped one is gone in under 1 s (its goodbye
# packet). The deadline is generous so that a busy CI machine cannot fail the test: what is
# checked is that both events happen, through real mDNS, not how fast (a timing, not a test).
DEADLINE_S = 30.0


def test_node_appears_and_disappears(session_dir: Path) -> None:
    cluster_name = "disc-" + os.urandom(3).hex()

    async def go() -> tuple[float, float]:
        browser = Browser(cluster_name, ["127.0.0.1"])
        await browser.start()
        cluster = LocalCluster(0, cluster_name, log_dir=session_dir, name_prefix="disc")
        try:
            await asyncio.sleep(0.5)  # the coordinator is up first
            node = await asyncio.to_thread(cluster.start_node, "late")

            def listed() -> bool:
                return any(r.node_id == node.node_id for r in browser.snapshot())

            found = await wait_until(listed, DEADLINE_S, "the new node listed")
            await asyncio.to_thread(cluster.stop_node, "late")
            gone = await wait_until(lambda: not listed(), DEADLINE_S, "the stopped node gone")
            return found, gone
        finally:
            cluster.stop()
            await browser.close()

    found, gone = asyncio.run(go())
    print(f"found after {found:.2f} s, gone after {gone:.2f} s")


def nodes_json(cluster_name: str) -> list[dict[str, object]]:
    out = subprocess.run(
        [sys.executable, "-m", "coordinator.main", "nodes", "--json", "--wait", "1.5", "--cluster", cluster_name],
        capture_output=True, text=True, timeout=60, check=True,
    )
    nodes: list[dict[str, object]] = json.loads(out.stdout)["nodes"]
    return nodes


def test_coordinator_nodes_command(session_dir: Path) -> None:
    cluster_name = "cli-" + os.urandom(3).hex()
    with LocalCluster(2, cluster_name, log_dir=session_dir, name_prefix="cli") as cluster:
        listed = nodes_json(cluster_name)
        assert sorted(n["name"] for n in listed) == ["cli0", "cli1"]
        assert all(n["backend"] == hardware.mlx_backend() and n["address"] for n in listed)
        cluster.stop_node("cli1")  # its mDNS goodbye goes out before it exits
        listed = nodes_json(cluster_name)
        assert [n["name"] for n in listed] == ["cli0"]


def test_malformed_and_foreign_records_are_ignored(local_cluster) -> None:
    cluster_name = os.environ["LAYERLINK_CLUSTER"]

    async def go() -> list[str]:
        zc = make_zeroconf(["127.0.0.1"])
        bad = [
            {"id": "not-hex", "name": "evil", "proto": "1", "backend": "cpu", "devices": "1", "mem": "1",
             "port": "1234", "cluster": cluster_name},
            {"id": "a" * 32, "name": "big", "proto": "1", "backend": "cpu", "devices": "999999", "mem": "1",
             "port": "1234", "cluster": cluster_name},
            {"id": "b" * 32, "name": "other", "proto": "1", "backend": "cpu", "devices": "1", "mem": "1",
             "port": "1234", "cluster": "someone-else"},
        ]
        infos = [ServiceInfo(SERVICE_TYPE, f"bad{i}.{SERVICE_TYPE}", addresses=[bytes([127, 0, 0, 1])],
                             port=1234, properties=p, server=f"bad{i}.local.") for i, p in enumerate(bad)]
        for info in infos:
            await (await zc.async_register_service(info))
        browser = Browser(cluster_name, ["127.0.0.1"])
        await browser.start()
        try:
            await browser.wait_for(3, 3.0)
            await asyncio.sleep(1.0)
            return sorted(r.name for r in browser.snapshot())
        finally:
            await browser.close()
            for info in infos:
                await (await zc.async_unregister_service(info))
            await zc.async_close()

    names = asyncio.run(go())
    assert names == ["shared0", "shared1", "shared2"]


def test_node_serves_llama_rpc_on_request(session_dir: Path) -> None:
    import pytest

    pytest.importorskip("llama_cpp", reason="llama-cpp-python (baseline extra) is not installed")
    import socket

    cluster_name = "rpc-" + os.urandom(3).hex()
    with LocalCluster(0, cluster_name, log_dir=session_dir) as cluster:
        cluster.start_node("rpc0", extra_args=["--llama-rpc"])
        cluster.start_node("plain0")
        listed = {n["name"]: n for n in nodes_json(cluster_name)}
        assert listed["plain0"]["llama_rpc_port"] == 0
        port = int(listed["rpc0"]["llama_rpc_port"])  # type: ignore[call-overload]
        assert port > 0 and listed["rpc0"]["llama_rpc_version"] == 7
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the ggml RPC server accepts connections
        cluster.stop_node("rpc0")
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
