"""`coordinator token`: the cluster's secret and the command that joins a machine to it."""

from __future__ import annotations

import argparse
import os

from coordinator import console
from coordinator.secret import create_secret, join_command, secret_path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "token",
        help="print the command that joins a machine to the cluster (makes the secret if needed)",
    )
    p.add_argument(
        "--cluster",
        default=os.environ.get("LAYERLINK_CLUSTER", "default"),
        help="cluster name (default: $LAYERLINK_CLUSTER or 'default')",
    )
    p.add_argument(
        "--rotate",
        action="store_true",
        help="replace the secret with a new one (every node must be restarted with it)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = secret_path(args.cluster)
    if args.rotate and path.exists():
        path.unlink()
        console.info(f"removed the old secret of cluster {args.cluster!r}")
    token, created = create_secret(args.cluster)
    if created:
        console.info(f"created the secret of cluster {args.cluster!r} in {path}")
    # One line on stdout, never wrapped: it is meant to be copied (or used in a script).
    console.console.print(
        join_command(args.cluster, token), soft_wrap=True, markup=False, highlight=False
    )
    return 0
