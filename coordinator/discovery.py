"""Finding nodes: mDNS browsing of `_layerlink._tcp.local.`, or a static --node list.

Records come from the network and are untrusted: malformed ones are logged and ignored,
and only records of our cluster name and protocol version are kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from node import PROTOCOL_VERSION, auth
from node.mdns import (
    SERVICE_TYPE,
    NodeRecord,
    RecordError,
    make_zeroconf,
    mdns_interfaces,
    parse_record,
)

log = logging.getLogger(__name__)


class Browser:
    """Keeps the live set of nodes announced over mDNS for one cluster."""

    def __init__(
        self,
        cluster: str,
        interfaces: list[str] | None = None,
        on_change: Callable[[], None] | None = None,
        cluster_id: str | None = None,
    ) -> None:
        self.cluster = cluster
        # Records of another cluster secret are ignored (default: this process's key's id;
        # "" keeps them all). With this process's key, a node is kept only once it proved
        # the secret back, or runs open where that is allowed (coordinator/secret.py).
        key = auth.current_key() if cluster_id is None else None
        self.key = key
        self.cluster_id = cluster_id if cluster_id is not None else (key.cluster_id if key else "")
        self.foreign: set[str] = set()
        self._gone: set[str] = set()  # services removed since they were last announced
        self.interfaces = interfaces if interfaces is not None else mdns_interfaces()
        self.on_change = on_change
        self.nodes: dict[str, NodeRecord] = {}  # service name -> record
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self._zc = make_zeroconf(self.interfaces)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_state_change]
        )

    def _on_state_change(
        self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            self._gone.add(name)
            if self.nodes.pop(name, None) is not None:
                log.info("node %s left", name)
                self._notify()
            return
        self._gone.discard(name)
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, 3000):
            log.info("could not resolve %s", name)
            return
        try:
            rec = parse_record(info)
        except RecordError as e:
            log.warning("ignoring malformed mDNS record %s: %s", name, e)
            return
        if rec.cluster != self.cluster:
            log.debug("ignoring %s of cluster %r", name, rec.cluster)
            return
        if self.cluster_id and rec.cluster_id and rec.cluster_id != self.cluster_id:
            if name not in self.foreign:
                self.foreign.add(name)
                log.warning(
                    "ignoring node %s (%s): it belongs to another cluster secret (id %s, ours %s)",
                    rec.name,
                    rec.address,
                    rec.cluster_id,
                    self.cluster_id,
                )
            return
        if rec.protocol_version != PROTOCOL_VERSION:
            log.warning(
                "ignoring %s: protocol %d, we speak %d",
                name,
                rec.protocol_version,
                PROTOCOL_VERSION,
            )
            return
        if self.nodes.get(name) != rec:
            if self.key is not None and (not await self._trusted(name, rec) or name in self._gone):
                return  # not trusted, or it left while we asked
            self.nodes[name] = rec
            log.info("node %s at %s", rec.name, rec.address)
            self._notify()

    async def _trusted(self, name: str, rec: NodeRecord) -> bool:
        from coordinator.secret import Membership, prove_membership, refusal

        verdict = await prove_membership(rec.address, self.key)
        problem = refusal(rec, verdict, self.key)
        if problem is not None:
            if name not in self.foreign:
                self.foreign.add(name)
                log.warning("ignoring node %s", problem)
            return False
        if verdict.membership is Membership.OPEN:
            log.warning("node %s (%s) runs without a cluster token", rec.name, rec.address)
        return True

    def _notify(self) -> None:
        self.changed.set()
        if self.on_change is not None:
            self.on_change()

    def snapshot(self) -> list[NodeRecord]:
        return sorted(self.nodes.values(), key=lambda r: (r.name, r.node_id))

    async def wait_for(self, count: int, timeout: float) -> list[NodeRecord]:
        deadline = time.monotonic() + timeout
        while len(self.nodes) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.changed.clear()
            try:
                async with asyncio.timeout(left):
                    await self.changed.wait()
            except TimeoutError:
                break
        return self.snapshot()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None:
            await self._zc.async_close()
        self._zc = None


def parse_static(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--node {spec!r} is not HOST:PORT")
    return host, int(port)


async def resolve_static(specs: list[str], timeout: float = 5.0) -> list[NodeRecord]:
    """Ask each statically named node for its info (the fallback when multicast is blocked)."""
    from coordinator.nodeclient import NodeClient

    out = []
    for spec in specs:
        host, port = parse_static(spec)
        async with NodeClient(f"{host}:{port}") as client:
            try:
                info = await client.get_info(timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    from coordinator.secret import refusal_hint

                    raise ConnectionError(
                        f"node {spec} refused our cluster credentials: {e.details()}. "
                        + refusal_hint(auth.current_key())
                    ) from None
                raise ConnectionError(
                    f"node {spec} did not answer: {e.code().name} {e.details()}"
                ) from None
        out.append(
            NodeRecord(
                node_id=info.node_id,
                name=info.name,
                host=host,
                port=port,
                protocol_version=info.protocol_version,
                backend=info.backend,
                device_count=len(info.devices),
                mem_bytes=sum(d.mem_total_bytes for d in info.devices),
                cluster=info.cluster,
                llama_rpc_port=info.llama_rpc_port,
                llama_rpc_version=info.llama_rpc_version,
            )
        )
    return out


async def find_nodes(
    count: int, wait_s: float, static: list[str], cluster: str, interfaces: list[str] | None = None
) -> list[NodeRecord]:
    """Nodes named statically, or found over mDNS: wait up to wait_s for `count` of them
    (count 0: whatever shows up within wait_s)."""
    if static:
        return await resolve_static(static)
    browser = Browser(cluster, interfaces)
    await browser.start()
    try:
        if count > 0:
            return await browser.wait_for(count, wait_s)
        await asyncio.sleep(wait_s)
        return browser.snapshot()
    finally:
        await browser.close()
