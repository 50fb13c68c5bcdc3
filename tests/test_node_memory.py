"""A node holding layers [a, b) materializes only those layers' weights."""

from __future__ import annotations

import asyncio
import json
import re
import struct
from pathlib import Path

from coordinator.lab.localcluster import LocalCluster
from coordinator.nodeclient import NodeClient
from node._proto.layerlink.v1 import node_pb2 as pb


def tensor_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes per tensor, read from the safetensors header (independent of the node's code)."""
    sizes: dict[str, int] = {}
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                sizes[name] = meta["data_offsets"][1] - meta["data_offsets"][0]
    return sizes


def expected_bytes(sizes: dict[str, int], start: int, end: int, first: bool, last: bool) -> int:
    total = 0
    for name, n in sizes.items():
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            total += n if start <= int(m.group(1)) < end else 0
        elif name.startswith("model.embed_tokens"):
            total += n if first else 0
        elif name.startswith(("model.norm", "lm_head")):
            total += n if last else 0
    return total


async def active_after_load(address: str, path: Path, start: int, end: int, last: bool) -> tuple[int, int]:
    async with NodeClient(address) as c:
        before = (await c.get_info()).mlx_active_bytes
        await c.load_stage(pb.LoadStageRequest(
            plan_id="mem", model_path=str(path), start=start, end=end,
            next_address="" if last else "127.0.0.1:9", stage_index=0, stage_count=2,
        ))
        after = (await c.get_info()).mlx_active_bytes
        await c.unload_stage("mem")
        return before, after


def test_stage_holds_only_its_layers(model_factory, session_dir: Path) -> None:
    path = model_factory("small", "llama")
    sizes = tensor_bytes(path)
    whole = sum(sizes.values())
    with LocalCluster(1, "memtest", log_dir=session_dir, name_prefix="mem") as cluster:
        addr = cluster.nodes[0].address
        for start, end, last in [(3, 7, False), (0, 4, False), (8, 12, True)]:
            before, after = asyncio.run(active_after_load(addr, path, start, end, last))
            want = expected_bytes(sizes, start, end, first=start == 0, last=last)
            grew = after - before
            assert want < whole / 2
            # The stage holds its own layers (+ embedding / head), not the whole model.
            assert abs(grew - want) <= 0.05 * want + (1 << 20), (
                f"layers [{start}, {end}): active memory grew by {grew} bytes, expected {want} "
                f"(whole model {whole})"
            )
