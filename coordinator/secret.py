"""The cluster secret on the coordinator's side: where it is kept, which one a command uses,
and checking that the nodes accept it.

`coordinator up` creates the secret of its cluster name on first start (a file readable by
its owner only, under node.identity.config_dir()) and prints the join command for nodes.
Every command that talks to nodes proves the token from --token, else --token-file, else
$LAYERLINK_TOKEN, else the stored secret of its --cluster (docs/security.md).
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import logging
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.errors import UserError
from node import auth
from node._proto.layerlink.v1 import node_pb2 as pb
from node.identity import config_dir
from node.mdns import NodeRecord

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 5.0


def secret_path(cluster: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", cluster)[:64] or "default"
    return config_dir() / "clusters" / f"{safe}.token"


def load_secret(cluster: str) -> str | None:
    """The stored token of `cluster`, or None when there is none."""
    path = secret_path(cluster)
    if not path.exists():
        return None
    try:
        return auth.read_token_file(path) or None
    except auth.TokenError as e:
        raise UserError(str(e)) from None


def create_secret(cluster: str) -> tuple[str, bool]:
    """The stored token of `cluster`, made now (mode 0600) if there is none; and whether it
    was made now. Two processes racing here end up with the same token."""
    existing = load_secret(cluster)
    if existing:
        return existing, False
    path = secret_path(cluster)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = auth.generate_token()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return create_secret(cluster)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("created the secret of cluster %r in %s", cluster, path)
    return token, True


def join_command(cluster: str, token: str) -> str:
    """The command that joins a machine to this cluster."""
    cluster_arg = "" if cluster == "default" else f" --cluster {shlex.quote(cluster)}"
    return f"{auth.TOKEN_ENV}={shlex.quote(token)} cluster-node up{cluster_arg}"


def add_token_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("authentication")
    g.add_argument(
        "--token",
        default=None,
        help="the cluster token every call to a node proves (default: --token-file, else "
        f"${auth.TOKEN_ENV}, else the secret `coordinator up` stored for --cluster)",
    )
    g.add_argument(
        "--token-file", type=Path, default=None, metavar="FILE", help="read the token from FILE"
    )
    g.add_argument(
        "--insecure",
        action="store_true",
        help="also use nodes on other machines that run without a token (by default only "
        "nodes that prove the cluster secret, and open nodes on this machine, are used)",
    )


def resolve_token(args: argparse.Namespace, create: bool = False) -> tuple[str | None, bool]:
    """The token a command uses, and whether it was created now (only with `create`, when
    none is given and none is stored)."""
    try:
        token = auth.token_from(getattr(args, "token", None), getattr(args, "token_file", None))
    except auth.TokenError as e:
        raise UserError(str(e)) from None
    if token:
        return token, False
    if create:
        return create_secret(args.cluster)
    return load_secret(args.cluster), False


# Whether this process uses nodes on other machines that run without a token (--insecure).
_allow_open: list[bool] = [False]


def allow_open_nodes() -> bool:
    return _allow_open[0]


def use_cluster_key(args: argparse.Namespace, create: bool = False) -> auth.ClusterKey | None:
    """Resolve the command's token and make it this process's key (node.auth.use_key).
    With `create` (coordinator up), a cluster without a secret gets one."""
    _allow_open[0] = bool(getattr(args, "insecure", False))
    token, created = resolve_token(args, create)
    if token is None:
        auth.use_key(None)
        return None
    try:
        key = auth.ClusterKey.from_token(token)
    except auth.TokenError as e:
        raise UserError(f"unusable cluster token: {e}") from None
    auth.use_key(key)
    if create:
        from coordinator import console

        where = secret_path(args.cluster)
        if created:
            console.info(f"created the secret of cluster {args.cluster!r} in {where}")
        # One line, never wrapped: it is meant to be copied.
        console.err_console.print(
            f"join a machine to this cluster: {join_command(args.cluster, token)}",
            soft_wrap=True,
            markup=False,
            highlight=False,
        )
    return key


class Membership(enum.Enum):
    MEMBER = "proved the cluster secret"
    OPEN = "runs without a token"
    REFUSED = "refused our credentials"
    IMPOSTOR = "answered with a wrong proof"
    UNREACHABLE = "did not answer"


@dataclass(frozen=True)
class Verdict:
    membership: Membership
    detail: str = ""


async def prove_membership(
    address: str, key: auth.ClusterKey | None, timeout: float = CHECK_TIMEOUT_S
) -> Verdict:
    """Ask a node for its info with `key` and a fresh challenge: does it accept our proof,
    and does it prove the secret back (node/auth.py)?"""
    from coordinator.nodeclient import NodeClient

    challenge = auth.new_challenge()
    async with NodeClient(address, key) as client:
        call = client.stub.GetInfo(
            pb.GetInfoRequest(), timeout=timeout, metadata=((auth.CHALLENGE_KEY, challenge),)
        )
        try:
            await call
            metadata = await call.initial_metadata()
        except grpc.aio.AioRpcError as e:
            kind = (
                Membership.REFUSED
                if e.code() == grpc.StatusCode.UNAUTHENTICATED
                else Membership.UNREACHABLE
            )
            return Verdict(kind, f"{e.code().name}: {e.details()}")
    answers = [str(v) for k, v in (metadata or ()) if k == auth.ANSWER_KEY]
    if not answers:
        return Verdict(Membership.OPEN)
    if key is None:
        return Verdict(Membership.MEMBER, "answered a challenge we cannot check (no token)")
    try:
        auth.check_answer(key, challenge, answers[0])
    except auth.AuthError as e:
        return Verdict(Membership.IMPOSTOR, str(e))
    return Verdict(Membership.MEMBER)


def refusal(rec: NodeRecord, verdict: Verdict, key: auth.ClusterKey | None) -> str | None:
    """Why `rec` may not be used, or None. With a key, a node must prove the secret, unless
    it runs open on this machine (loopback) or --insecure allows open nodes anywhere."""
    m = verdict.membership
    if m is Membership.REFUSED:
        return f"{rec.name} ({rec.address}) refused our cluster credentials: {verdict.detail}"
    if key is None or m in (Membership.MEMBER, Membership.UNREACHABLE):
        return None
    if m is Membership.IMPOSTOR:
        return f"{rec.name} ({rec.address}) does not hold the cluster secret: {verdict.detail}"
    if auth.is_loopback(rec.host) or allow_open_nodes():
        return None
    return (
        f"{rec.name} ({rec.address}) runs without a token, so anyone can drive it (and it "
        "could be anyone's machine): start it with the cluster's token, or pass --insecure"
    )


async def check_access(records: Sequence[NodeRecord], key: auth.ClusterKey | None) -> None:
    """Check every node both ways (prove_membership); raise UserError naming the problem when
    any refuses our credentials or cannot be trusted with the cluster's work. Nodes that do
    not answer at all are left to the caller."""
    verdicts = await asyncio.gather(*(prove_membership(r.address, key) for r in records))
    problems = [p for r, v in zip(records, verdicts, strict=True) if (p := refusal(r, v, key))]
    for r, v in zip(records, verdicts, strict=True):
        if v.membership is Membership.OPEN and key is not None and not problems:
            log.warning("node %s (%s) runs without a cluster token", r.name, r.address)
    if problems:
        refused = any(v.membership is Membership.REFUSED for v in verdicts)
        raise UserError(
            f"{len(problems)} node(s) cannot be used: "
            + "; ".join(problems)
            + (f". {refusal_hint(key)}" if refused else "")
        )


def refusal_hint(key: auth.ClusterKey | None) -> str:
    """What to do when nodes refuse the credentials we sent (`key`, or none)."""
    if key is None:
        return (
            "Pass the cluster's token with --token or --token-file (the join command "
            "`coordinator up` printed has it)"
        )
    return "This token is not the cluster's: pass the right one with --token or --token-file"
