"""`coordinator nodes`: list the nodes mDNS (or --node) shows."""

from __future__ import annotations

import argparse
import asyncio

from coordinator import console
from coordinator.commands._common import add_discovery_args, discover


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("nodes", help="list the nodes of the cluster")
    add_discovery_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run, wait=2.0)


def run(args: argparse.Namespace) -> int:
    records = asyncio.run(discover(args, allow_empty=True))
    rows = [
        {
            "node_id": r.node_id,
            "name": r.name,
            "address": r.address,
            "backend": r.backend,
            "devices": r.device_count,
            "mem_bytes": r.mem_bytes,
            "cluster": r.cluster,
            "protocol": r.protocol_version,
            "llama_rpc_port": r.llama_rpc_port,
            "llama_rpc_version": r.llama_rpc_version,
        }
        for r in records
    ]
    if args.json:
        console.print_json({"nodes": rows})
    else:
        console.table(
            f"nodes of cluster {args.cluster!r}",
            ["name", "address", "backend", "devices", "memory", "id"],
            [
                [
                    r["name"],
                    r["address"],
                    r["backend"],
                    r["devices"],
                    f"{r['mem_bytes'] / 2**30:.1f} GiB",  # type: ignore[operator]
                    str(r["node_id"])[:8],
                ]
                for r in rows
            ],
        )
    return 0
