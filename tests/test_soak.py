"""Soak (issue 7): 200 requests from 16 concurrent clients through `coordinator up`'s HTTP API
over a 3-node authenticated cluster on loopback. Every request completes; afterwards every
stage holds no request and each node's MLX active memory is back at its idle level (no KV
cache left behind). LAYERLINK_SOAK_OUT=FILE keeps the latency summary (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from coordinator.lab.localcluster import CoordinatorProcess, LocalCluster
from coordinator.nodeclient import NodeClient
from node import auth
from tests.soak import soak, summary

REQUESTS = 200
CLIENTS = 16


async def node_state(addresses: list[str], key: auth.ClusterKey) -> list[tuple[int, int]]:
    """(requests held by its stages, MLX active bytes) per node."""
    out = []
    for a in addresses:
        async with NodeClient(a, key) as c:
            info = await c.get_info()
        out.append((sum(s.active_requests for s in info.stages), info.mlx_active_bytes))
    return out


async def settled(
    addresses: list[str], key: auth.ClusterKey, timeout: float = 15.0
) -> list[tuple[int, int]]:
    """The node states once no stage holds a request (released asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        state = await node_state(addresses, key)
        if all(n == 0 for n, _ in state) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.1)


def test_soak_every_request_completes_and_no_kv_memory_is_left(
    tiny_llama: Path, session_dir: Path, tmp_path: Path
) -> None:
    token = auth.generate_token()
    key = auth.ClusterKey.from_token(token)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    cluster_name = "soak-" + os.urandom(3).hex()
    logs = session_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with LocalCluster(
        3, cluster_name, log_dir=logs, name_prefix="soak", env={auth.TOKEN_ENV: token}
    ) as cluster:
        addresses = [n.address for n in cluster.nodes]
        server = CoordinatorProcess(tiny_llama, cluster.nodes, logs / "soak-coordinator.log", extra_args=[
            "--cluster", cluster_name, "--token-file", str(token_file), "--placement", "even",
            "--check-tokens", "0", "--max-concurrent", str(CLIENTS), "--max-queue", "64",
            "--context", "256"])  # fmt: skip
        try:
            idle = asyncio.run(settled(addresses, key))
            assert all(n == 0 for n, _ in idle), idle
            outcomes, wall = asyncio.run(soak(server.url, REQUESTS, CLIENTS))
            after = asyncio.run(settled(addresses, key))
        finally:
            server.stop()
    doc = summary(outcomes, wall, CLIENTS)
    doc["idle_mlx_active_bytes"] = [b for _, b in idle]
    doc["after_mlx_active_bytes"] = [b for _, b in after]
    out = os.environ.get("LAYERLINK_SOAK_OUT")
    if out:
        Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    assert doc["completed"] == REQUESTS, doc["failed"][:5]
    assert all(o.finish_reason in ("length", "stop") for o in outcomes)
    assert [n for n, _ in after] == [0, 0, 0], after
    # Every KV cache was freed: active memory is exactly the idle level (weights and such).
    assert [b for _, b in after] == [b for _, b in idle], (idle, after)
