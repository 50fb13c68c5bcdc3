"""Options shared by the commands that talk to a cluster, and the discovery step they share."""

from __future__ import annotations

import argparse
import os

from coordinator.discovery import find_nodes
from coordinator.errors import UserError
from coordinator.secret import add_token_args, check_access, use_cluster_key
from node.mdns import NodeRecord


def add_discovery_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("discovery")
    g.add_argument(
        "--nodes",
        type=int,
        default=0,
        metavar="N",
        help="wait until N nodes are found (default: use what is found within --wait)",
    )
    g.add_argument(
        "--wait",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for nodes (default: 5)",
    )
    g.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="use this node instead of mDNS (repeatable; for networks that block multicast)",
    )
    g.add_argument(
        "--cluster",
        default=os.environ.get("LAYERLINK_CLUSTER", "default"),
        help="cluster name to look for (default: $LAYERLINK_CLUSTER or 'default')",
    )
    g.add_argument(
        "--mdns-interface",
        action="append",
        default=None,
        metavar="IP",
        help="interface address for mDNS (repeatable; default: $LAYERLINK_MDNS_INTERFACES or all)",
    )
    add_token_args(parser)


def add_model_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--model",
        required=required,
        metavar="PATH|FILE.gguf|ollama:NAME|ORG/NAME",
        help="model folder (HF/MLX safetensors layout), GGUF file, ollama:NAME[:TAG] from "
        "Ollama's store, or Hugging Face repo id (org/name[@rev], fetched into the HF cache "
        "here); nodes that lack it receive their stages' tensors",
    )


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("placement")
    g.add_argument(
        "--placement",
        choices=("planned", "memory", "even"),
        default="planned",
        help="planned: measure devices and links, then plan (default); memory: split by "
        "free memory (exo's way); even: equal layer counts (mlx-lm's way)",
    )
    g.add_argument(
        "--objective",
        choices=("latency", "throughput"),
        default="latency",
        help="what the planner optimises (default: single-stream latency)",
    )
    g.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="M",
        help="requests in flight the throughput objective plans for (default: 1)",
    )


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    """--replicas and --min-tps: serve with several pipelines (coordinator/replicas.py)."""
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="R",
        help="serve with exactly R pipelines (replicas), each holding the whole model on "
        "devices of its own (default: with --objective throughput the planner chooses R)",
    )
    parser.add_argument(
        "--min-tps",
        type=float,
        default=None,
        metavar="X",
        help="with replicas: choose the best aggregate that keeps every request at >= X "
        "decode tokens/s",
    )


def serving_mode(args: argparse.Namespace) -> bool:
    """Whether to plan replicas: the throughput objective, or --replicas / --min-tps given."""
    if args.replicas is not None and args.replicas < 1:
        raise UserError("--replicas must be at least 1")
    if args.min_tps is not None and not args.min_tps > 0:
        raise UserError("--min-tps must be positive")
    return bool(
        args.objective == "throughput" or args.replicas is not None or args.min_tps is not None
    )


async def discover(
    args: argparse.Namespace, allow_empty: bool = False, create_secret: bool = False
) -> list[NodeRecord]:
    """The nodes of the cluster, after checking they accept our cluster token (--token, or
    the stored secret; `create_secret`: make one if the cluster has none)."""
    key = use_cluster_key(args, create=create_secret)
    if args.nodes < 0:
        raise UserError("--nodes must be >= 0")
    if not 0 <= args.wait < float("inf"):  # NaN fails too
        raise UserError("--wait must be a number of seconds >= 0")
    try:
        records = await find_nodes(
            args.nodes, args.wait, args.node, args.cluster, args.mdns_interface
        )
    except (ValueError, ConnectionError) as e:
        raise UserError(str(e)) from None
    if not records and not allow_empty:
        raise UserError(
            f"no nodes of cluster {args.cluster!r} found within {args.wait:.0f}s: start `cluster-node up` "
            "on each machine, or name nodes with --node HOST:PORT"
        )
    if args.nodes and len(records) < args.nodes:
        raise UserError(
            f"found {len(records)} node(s) of cluster {args.cluster!r}, waited for {args.nodes}: "
            + ", ".join(f"{r.name} ({r.address})" for r in records)
        )
    records = records[: args.nodes] if args.nodes else records
    await check_access(records, key)
    return records
