"""Cluster authentication: every gRPC call to a node proves knowledge of the cluster secret.

Trust boundary: anything that reaches a node's port is untrusted until its proof checks out.
The threat model and what this does not protect against are in docs/security.md.

The cluster token (`coordinator up` makes one; `cluster-node up --token`) never crosses the
network. Keys derived from it do the work:

    mac key     = HMAC-SHA256(token, "layerlink mac key v1")
    cluster id  = HMAC-SHA256(token, "layerlink cluster id v1")[:8], hex (public: mDNS TXT `cid`)

A proof over `payload` is

    mac = HMAC-SHA256(mac key, "layerlink-proof-v1" 0 ts_ms 0 nonce 0 payload)

with `ts_ms` the sender's clock in milliseconds and `nonce` 16 random bytes (hex). Written as
`v1.<ts_ms>.<nonce>.<mac>`. A receiver accepts a proof once (`ReplayGuard`: a nonce cache),
within `WINDOW_S` of its own clock, and not from before its own start (its nonce cache is
empty then). On gRPC the payload is `grpc ` + the full method name, and the proof travels in
the `x-layerlink-auth` metadata entry of the call (`secure_channel` adds it, the server
interceptor checks it). Other transports (the raw-TCP data path's handshake) use `make_proof`
and `verify` with a payload of their own that starts with a different label.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

TOKEN_ENV = "LAYERLINK_TOKEN"
TOKEN_PREFIX = "llt1_"
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 256
METADATA_KEY = "x-layerlink-auth"
# A caller's challenge, and the node's answer (initial metadata of a unary call): the node
# proves it holds the secret too, so a machine that merely copies a cluster's mDNS record
# cannot join it.
CHALLENGE_KEY = "x-layerlink-challenge"
ANSWER_KEY = "x-layerlink-answer"
# A proof is accepted this far from the receiver's clock, either way. Replays inside the
# window are caught by the nonce cache, so the window only has to cover clock differences.
WINDOW_S = float(os.environ.get("LAYERLINK_AUTH_WINDOW_S", "120"))
# Accepted proofs remembered at most (the cache only holds proofs that verified, so only
# holders of the secret can fill it; a full cache refuses new calls rather than forget).
MAX_NONCES = 200_000
MAX_PROOF_CHARS = 128
# Methods anyone may call: the standard health check says only "serving", as a TCP connect would.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
REJECT_LOG_EVERY_S = 10.0

_LABEL = b"layerlink-proof-v1"
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")  # printable ASCII, no spaces
_PROOF_RE = re.compile(r"v1\.([0-9]{1,15})\.([0-9a-f]{32})\.([0-9a-f]{64})")
_CID_RE = re.compile(r"[0-9a-f]{16}")
_CHALLENGE_RE = re.compile(r"[0-9a-f]{32,64}")


class AuthError(Exception):
    """A proof that does not check out; the message says why, for the log and the caller."""


class TokenError(ValueError):
    """A token (or the way the node was told to run without one) that cannot be used."""


# ----- tokens and keys ---------------------------------------------------------------------


def generate_token() -> str:
    """A fresh cluster token: 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ClusterKey:
    """The keys derived from one cluster token."""

    mac_key: bytes = field(repr=False)
    cluster_id: str

    @classmethod
    def from_token(cls, token: str) -> ClusterKey:
        token = token.strip()
        if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            raise TokenError(
                f"a cluster token has {MIN_TOKEN_CHARS}-{MAX_TOKEN_CHARS} characters, "
                f"this one {len(token)}"
            )
        if not _TOKEN_RE.fullmatch(token):
            raise TokenError("a cluster token is printable ASCII without spaces")
        raw = token.encode()
        mac_key = hmac.new(raw, b"layerlink mac key v1", hashlib.sha256).digest()
        cid = hmac.new(raw, b"layerlink cluster id v1", hashlib.sha256).digest()[:8].hex()
        return cls(mac_key=mac_key, cluster_id=cid)


def is_cluster_id(text: str) -> bool:
    return bool(_CID_RE.fullmatch(text))


def read_token_file(path: Path) -> str:
    """The token in `path` (first line); warns when others may read the file."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"cannot read the token file {path}: {e}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s can be read by other users: chmod 600 %s", path, path)
    return text.splitlines()[0] if text else ""


def token_from(
    token: str | None, token_file: Path | None, env: dict[str, str] | None = None
) -> str | None:
    """The token named by --token, else --token-file, else $LAYERLINK_TOKEN; None if none."""
    if token:
        return token
    if token_file is not None:
        return read_token_file(token_file)
    value = (env if env is not None else dict(os.environ)).get(TOKEN_ENV, "").strip()
    return value or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def node_key(token: str | None, host: str, insecure: bool) -> ClusterKey | None:
    """The key a node serving on `host` checks calls with; None runs it open, which is only
    allowed on loopback or when asked for (--insecure). Raises TokenError."""
    if token:
        return ClusterKey.from_token(token)
    if not is_loopback(host) and not insecure:
        raise TokenError(
            f"no cluster token: a node on {host} would let anyone on the network drive it. "
            f"Pass --token (or --token-file, or ${TOKEN_ENV}) with the token `coordinator up` "
            "prints, or --insecure to run open anyway"
        )
    return None


# The key this process's own outgoing calls carry (the composition root sets it once:
# `cluster-node up` for node-to-node calls, the coordinator's commands for theirs).
_process_key: list[ClusterKey | None] = [None]


def use_key(key: ClusterKey | None) -> None:
    _process_key[0] = key


def current_key() -> ClusterKey | None:
    return _process_key[0]


# ----- proofs ------------------------------------------------------------------------------


def sign(key: ClusterKey, payload: bytes, ts_ms: int, nonce: str) -> str:
    """The MAC (hex) of `payload` at time `ts_ms` (ms since the epoch) with `nonce`."""
    msg = b"\0".join((_LABEL, str(ts_ms).encode(), nonce.encode(), payload))
    return hmac.new(key.mac_key, msg, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Proof:
    ts_ms: int
    nonce: str
    mac: str

    def encode(self) -> str:
        return f"v1.{self.ts_ms}.{self.nonce}.{self.mac}"

    @classmethod
    def parse(cls, text: str) -> Proof:
        if len(text) > MAX_PROOF_CHARS:
            raise AuthError(f"malformed cluster proof ({len(text)} characters)")
        m = _PROOF_RE.fullmatch(text)
        if m is None:
            raise AuthError("malformed cluster proof (expected v1.<ts_ms>.<nonce>.<mac>)")
        return cls(ts_ms=int(m.group(1)), nonce=m.group(2), mac=m.group(3))


def make_proof(key: ClusterKey, payload: bytes, now: float | None = None) -> Proof:
    ts_ms = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_hex(16)
    return Proof(ts_ms=ts_ms, nonce=nonce, mac=sign(key, payload, ts_ms, nonce))


class ReplayGuard:
    """Which proofs were accepted: each is accepted once, within `window_s` of this clock,
    and none from before the guard existed (its memory starts then)."""

    def __init__(
        self,
        window_s: float = WINDOW_S,
        max_entries: int = MAX_NONCES,
        clock: Callable[[], float] = time.time,
        started_ms: int | None = None,
    ) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self.clock = clock
        self.started_ms = int(clock() * 1000) if started_ms is None else started_ms
        self._seen: OrderedDict[str, int] = OrderedDict()  # nonce -> expiry (ms), oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def check_time(self, proof: Proof, now_ms: int) -> None:
        skew_s = (proof.ts_ms - now_ms) / 1000
        if abs(skew_s) > self.window_s:
            raise AuthError(
                f"cluster proof is {skew_s:+.1f} s from this node's clock (allowed "
                f"±{self.window_s:.0f} s): synchronise the machines' clocks (NTP)"
            )
        if proof.ts_ms < self.started_ms:
            raise AuthError(
                "cluster proof predates this node's start: a replayed call, or a clock "
                f"{(self.started_ms - proof.ts_ms) / 1000:.1f} s behind this node's"
            )

    def remember(self, proof: Proof, now_ms: int) -> None:
        window_ms = int(self.window_s * 1000)
        while self._seen and next(iter(self._seen.values())) < now_ms:
            self._seen.popitem(last=False)
        if proof.nonce in self._seen:
            raise AuthError("cluster proof was already used (a replayed call)")
        if len(self._seen) >= self.max_entries:
            raise AuthError(
                f"more than {self.max_entries} calls within {self.window_s:.0f} s: "
                "refusing until older proofs expire"
            )
        # Kept until no clock within the window could still accept it.
        self._seen[proof.nonce] = max(proof.ts_ms, now_ms) + window_ms
        # Expiries are not quite in insertion order (ts differs per sender); a late expiry
        # near the front only delays the pruning of those behind it, never a replay check.


def verify(
    key: ClusterKey, payload: bytes, proof: Proof, guard: ReplayGuard, now: float | None = None
) -> None:
    """Accept `proof` for `payload` once, or raise AuthError saying why not."""
    now_ms = int((guard.clock() if now is None else now) * 1000)
    guard.check_time(proof, now_ms)
    if not hmac.compare_digest(sign(key, payload, proof.ts_ms, proof.nonce), proof.mac):
        raise AuthError(
            "cluster proof does not match this node's secret: a wrong token, or a caller "
            "of another cluster"
        )
    guard.remember(proof, now_ms)


def answer_payload(challenge: str) -> bytes:
    return b"answer " + challenge.encode()


def new_challenge() -> str:
    return secrets.token_hex(16)


def data_payload(challenge: str) -> bytes:
    """What a data-path client signs: the node's per-connection challenge (node/datapath.py)."""
    return b"data " + challenge.encode()


def check_answer(
    key: ClusterKey,
    challenge: str,
    answer: str,
    now: float | None = None,
    payload: Callable[[str], bytes] = answer_payload,
) -> None:
    """Raise AuthError unless `answer` proves `key` for our fresh `challenge` (each challenge
    is used once, so no nonce cache is needed on this side)."""
    verify(key, payload(challenge), Proof.parse(answer), ReplayGuard(started_ms=0), now)


# ----- gRPC: the client side ---------------------------------------------------------------


def grpc_payload(method: str | bytes) -> bytes:
    name = method if isinstance(method, bytes) else method.encode()
    return b"grpc " + name


def _with_proof(key: ClusterKey, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    proof = make_proof(key, grpc_payload(details.method))
    md = grpc.aio.Metadata(*(details.metadata or ()))
    md.add(METADATA_KEY, proof.encode())
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=md,
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _SignUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, key: ClusterKey) -> None:
        self.key = key

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_with_proof(self.key, client_call_details), request)


class _SignUnaryStream(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, key: ClusterKey) -> None:
        self.key = key

    async def intercept_unary_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(_with_proof(self.key, client_call_details), request)


class _SignStreamUnary(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, key: ClusterKey) -> None:
        self.key = key

    async def intercept_stream_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_with_proof(self.key, client_call_details), request_iterator)


class _SignStreamStream(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, key: ClusterKey) -> None:
        self.key = key

    async def intercept_stream_stream(
        self, continuation: Callable[..., Any], client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_with_proof(self.key, client_call_details), request_iterator)


def client_interceptors(key: ClusterKey) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add a fresh proof to every call of a channel (all four kinds)."""
    return [
        _SignUnaryUnary(key),
        _SignUnaryStream(key),
        _SignStreamUnary(key),
        _SignStreamStream(key),
    ]


def secure_channel(
    address: str, options: Sequence[tuple[str, Any]] = (), key: ClusterKey | None = None
) -> grpc.aio.Channel:
    """A channel to a node whose every call carries a proof of `key` (default: this
    process's key, `use_key`). "Secure" means authenticated, not encrypted: no TLS.
    With no key at all, a plain channel (for nodes that run open)."""
    key = key if key is not None else current_key()
    if key is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.insecure_channel(
        address, options=list(options), interceptors=client_interceptors(key)
    )


# ----- gRPC: the server side ---------------------------------------------------------------


class RejectLog:
    """Logs each kind of rejection per peer host at most once per REJECT_LOG_EVERY_S, with
    the count of those not logged in between."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self.total = 0

    def record(self, peer: str, method: str, reason: str) -> None:
        self.total += 1
        host = peer.rpartition(":")[0] or peer
        kind = reason.split(":")[0][:60]
        now = self.clock()
        last, quiet = self._last.get((host, kind), (-1e18, 0))
        if now - last < REJECT_LOG_EVERY_S:
            self._last[(host, kind)] = (last, quiet + 1)
            return
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[(host, kind)] = (now, 0)
        more = f" ({quiet} more like it since the last report)" if quiet else ""
        log.warning("refused %s from %s: %s%s", method, peer, reason, more)


def _denied(
    reason: str, method: str, rejects: RejectLog
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]:
    async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        rejects.record(context.peer(), method, reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    return deny


def _denied_stream(
    reason: str, method: str, rejects: RejectLog
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[None]]:
    async def deny(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[None]:
        rejects.record(context.peer(), method, reason)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
        yield  # pragma: no cover - abort raised

    return deny


class ProofCheck(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc is untyped
    """Refuses (UNAUTHENTICATED, logged) every call without a valid, fresh, unused proof of
    the cluster key. A refused call's request is never deserialized or handed to the
    servicer."""

    def __init__(self, key: ClusterKey, guard: ReplayGuard | None = None) -> None:
        self.key = key
        self.guard = guard or ReplayGuard()
        self.rejects = RejectLog()

    def check(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        """Raise AuthError unless the call's metadata holds a valid proof for `method`."""
        values = [v for k, v in (metadata or ()) if k == METADATA_KEY]
        if not values:
            raise AuthError(
                "no cluster proof: this node belongs to a cluster with a secret; call it with "
                f"the cluster's token (--token, --token-file or ${TOKEN_ENV}; `coordinator up` "
                "prints the join command)"
            )
        if len(values) > 1:
            raise AuthError("more than one cluster proof in the call")
        raw = values[0]
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
        verify(self.key, grpc_payload(method), Proof.parse(text), self.guard)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)
        if method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata
        try:
            self.check(method, metadata)
        except AuthError as e:
            return self._deny_handler(await continuation(handler_call_details), method, str(e))
        handler = await continuation(handler_call_details)
        challenge = next((str(v) for k, v in (metadata or ()) if k == CHALLENGE_KEY), "")
        if challenge and _CHALLENGE_RE.fullmatch(challenge) and _is_unary(handler):
            return self._answering(handler, challenge)
        return handler

    def _answering(self, handler: grpc.RpcMethodHandler, challenge: str) -> grpc.RpcMethodHandler:
        """The handler, sending first the answer to the caller's challenge."""
        answer = make_proof(self.key, answer_payload(challenge)).encode()
        behavior = handler.unary_unary

        async def answered(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.send_initial_metadata(((ANSWER_KEY, answer),))
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            answered,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _deny_handler(
        self, handler: grpc.RpcMethodHandler | None, method: str, reason: str
    ) -> grpc.RpcMethodHandler:
        """A handler of the same kind as the method's that aborts; requests stay raw bytes."""
        streaming_in = bool(handler is not None and handler.request_streaming)
        streaming_out = bool(handler is not None and handler.response_streaming)
        if streaming_out:
            stream = _denied_stream(reason, method, self.rejects)
            if streaming_in:
                return grpc.stream_stream_rpc_method_handler(stream)
            return grpc.unary_stream_rpc_method_handler(stream)
        unary = _denied(reason, method, self.rejects)
        if streaming_in:
            return grpc.stream_unary_rpc_method_handler(unary)
        return grpc.unary_unary_rpc_method_handler(unary)


def _is_unary(handler: grpc.RpcMethodHandler | None) -> bool:
    return bool(
        handler is not None
        and not handler.request_streaming
        and not handler.response_streaming
        and handler.unary_unary is not None
    )


def server_interceptors(key: ClusterKey | None) -> list[grpc.aio.ServerInterceptor]:
    """What a node's gRPC server runs calls through: a ProofCheck when it has a key."""
    return [ProofCheck(key)] if key is not None else []
