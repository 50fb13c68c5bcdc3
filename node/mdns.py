"""mDNS records: what a node announces (`_layerlink._tcp.local.`) and how a record is read.

Records from the network are untrusted: `parse_record` checks every field and raises
`RecordError` for anything malformed or oversized; callers log and ignore such records.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_layerlink._tcp.local."
MAX_TXT_BYTES = 1024
_ID_RE = re.compile(r"[0-9a-f]{32}")
_NAME_RE = re.compile(r"[A-Za-z0-9_.\- ]{1,63}")
_CID_RE = re.compile(r"[0-9a-f]{16}")


class RecordError(ValueError):
    """A malformed mDNS record."""


@dataclass(frozen=True)
class NodeRecord:
    """A node as announced over mDNS (or named statically with --node)."""

    node_id: str
    name: str
    host: str
    port: int
    protocol_version: int
    backend: str
    device_count: int
    mem_bytes: int
    cluster: str
    llama_rpc_port: int = 0
    llama_rpc_version: int = 0
    # Derived from the cluster token (node/auth.py); empty when the node runs without one.
    cluster_id: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def mdns_interfaces(host: str | None = None) -> list[str] | None:
    """Interfaces zeroconf should use: LAYERLINK_MDNS_INTERFACES (comma separated), else the
    node's own bind address when it is a specific one, else all (None)."""
    env = os.environ.get("LAYERLINK_MDNS_INTERFACES", "").strip()
    if env:
        return [x.strip() for x in env.split(",") if x.strip()]
    if host and host not in ("0.0.0.0", "::", ""):
        return [host]
    return None


def make_zeroconf(interfaces: list[str] | None) -> AsyncZeroconf:
    if interfaces:
        return AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
    return AsyncZeroconf(ip_version=IPVersion.V4Only)


def encode_txt(rec: NodeRecord) -> dict[str, str]:
    txt = {
        "id": rec.node_id,
        "name": rec.name,
        "proto": str(rec.protocol_version),
        "backend": rec.backend,
        "devices": str(rec.device_count),
        "mem": str(rec.mem_bytes),
        "port": str(rec.port),
        "cluster": rec.cluster,
        "rpc_port": str(rec.llama_rpc_port),
        "rpc_ver": str(rec.llama_rpc_version),
    }
    if rec.cluster_id:
        txt["cid"] = rec.cluster_id
    return txt


def _int(props: dict[str, str], key: str, lo: int, hi: int) -> int:
    raw = props.get(key)
    if raw is None:
        raise RecordError(f"TXT key {key!r} missing")
    if not raw.isdigit():
        raise RecordError(f"TXT key {key!r} is not a number: {raw[:20]!r}")
    v = int(raw)
    if not lo <= v <= hi:
        raise RecordError(f"TXT key {key!r}={v} outside [{lo}, {hi}]")
    return v


def parse_record(info: ServiceInfo) -> NodeRecord:
    """Validate a resolved ServiceInfo and turn it into a NodeRecord."""
    if info.text is not None and len(info.text) > MAX_TXT_BYTES:
        raise RecordError(f"TXT record of {len(info.text)} bytes exceeds {MAX_TXT_BYTES}")
    props: dict[str, str] = {}
    for k, v in (info.properties or {}).items():
        try:
            key = k.decode("ascii") if isinstance(k, bytes) else str(k)
            val = v.decode("utf-8") if isinstance(v, bytes) else ("" if v is None else str(v))
        except UnicodeDecodeError as e:
            raise RecordError(f"TXT entry is not text: {e}") from None
        props[key] = val
    node_id = props.get("id", "")
    if not _ID_RE.fullmatch(node_id):
        raise RecordError(f"TXT id {node_id[:40]!r} is not a 32-hex-digit node id")
    name = props.get("name", "")
    if not _NAME_RE.fullmatch(name):
        raise RecordError(f"TXT name {name[:40]!r} is not a valid node name")
    backend = props.get("backend", "")
    if backend not in ("metal", "cuda", "cpu"):
        raise RecordError(f"TXT backend {backend[:20]!r} unknown")
    cluster = props.get("cluster", "")
    if not _NAME_RE.fullmatch(cluster):
        raise RecordError(f"TXT cluster {cluster[:40]!r} is not a valid cluster name")
    addresses = info.parsed_addresses(IPVersion.V4Only)
    if not addresses:
        raise RecordError("record has no IPv4 address")
    cluster_id = props.get("cid", "")
    if cluster_id and not _CID_RE.fullmatch(cluster_id):
        raise RecordError(f"TXT cid {cluster_id[:40]!r} is not a 16-hex-digit cluster id")
    port = _int(props, "port", 1, 65535)
    if info.port and info.port != port:
        raise RecordError(f"SRV port {info.port} disagrees with TXT port {port}")
    return NodeRecord(
        node_id=node_id,
        name=name,
        host=addresses[0],
        port=port,
        protocol_version=_int(props, "proto", 0, 1000),
        backend=backend,
        device_count=_int(props, "devices", 0, 64),
        mem_bytes=_int(props, "mem", 0, 1 << 50),
        cluster=cluster,
        llama_rpc_port=_int(props, "rpc_port", 0, 65535) if "rpc_port" in props else 0,
        llama_rpc_version=_int(props, "rpc_ver", 0, 1000) if "rpc_ver" in props else 0,
        cluster_id=cluster_id,
    )


class Advertiser:
    """Registers this node's record; unregisters (sends goodbye packets) on close."""

    def __init__(self, record: NodeRecord, interfaces: list[str] | None) -> None:
        self.record = record
        self.interfaces = interfaces
        self._zc: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None

    async def start(self) -> None:
        self._zc = make_zeroconf(self.interfaces)
        instance = f"{self.record.name}-{self.record.node_id[:8]}"
        self._info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(self.record.host)],
            port=self.record.port,
            properties=encode_txt(self.record),
            server=f"{instance}.local.",
        )
        # The async API returns a task that announces the record; wait for it to finish.
        await (await self._zc.async_register_service(self._info, allow_name_change=True))
        log.info("advertising %s on mDNS as %s", self.record.address, instance)

    async def close(self) -> None:
        if self._zc is None:
            return
        if self._info is not None:
            # Wait for the goodbye packets to go out before closing the socket.
            await (await self._zc.async_unregister_service(self._info))
        await self._zc.async_close()
        self._zc = None
