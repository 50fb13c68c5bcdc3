"""Keep a running coordinator's measurements current: re-probe when the membership changes.

`coordinator up` serves while this watches mDNS (coordinator.discovery.Browser). Each change
(a node joins, leaves or re-announces) only marks the membership dirty; after `debounce_s`
without further changes, and only if the set of node ids differs from the one measured last,
the whole cluster is probed again (coordinator.probe.probe_cluster: links and devices) and the
result is handed to `on_result` (the API state's `probe`, the dashboard's link matrix).

The members are the browser's nodes plus the nodes measured before that it does not list but
that still answer GetInfo: an mDNS record that failed to resolve (a busy machine, a lost
packet) must not make a live node look gone, while a node that left stops answering.

Serving is never blocked: the probe is a task on the event loop whose every step is a network
call to the nodes (the nodes measure, not the coordinator); one probe runs at a time, and
changes that arrive during a probe cause one more probe after it. A failed probe is logged and
the last good result kept. The nodes do the measuring, so a probe does load them for a few
seconds (device benchmarks): a change of membership is rare, and that is the price of fresh
figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from node.mdns import NodeRecord

log = logging.getLogger(__name__)

ProbeFn = Callable[[Sequence[NodeRecord]], Awaitable[Any]]  # -> an object with .to_json()
AliveFn = Callable[[Sequence[NodeRecord]], Awaitable[set[str]]]  # -> ids of those answering


async def answering(records: Sequence[NodeRecord], timeout_s: float = 2.0) -> set[str]:
    """Ids of the nodes that answer GetInfo within timeout_s (concurrently)."""
    from coordinator.nodeclient import NodeClient

    async def one(r: NodeRecord) -> str | None:
        async with NodeClient(r.address) as c:
            try:
                await c.get_info(timeout=timeout_s)
            except grpc.aio.AioRpcError:
                return None
        return r.node_id

    return {i for i in await asyncio.gather(*(one(r) for r in records)) if i is not None}


class Membership(Protocol):
    """What the prober needs of a node browser (coordinator.discovery.Browser has it)."""

    on_change: Callable[[], None] | None

    async def start(self) -> None: ...

    def snapshot(self) -> list[NodeRecord]: ...

    async def close(self) -> None: ...


class MembershipProber:
    """Re-probes the cluster when its membership changes and keeps the last result."""

    def __init__(
        self,
        browser: Membership,
        probe: ProbeFn,
        on_result: Callable[[dict[str, Any]], None],
        known: Sequence[NodeRecord] = (),
        debounce_s: float = 2.0,
        alive: AliveFn = answering,
    ) -> None:
        """`known`: the nodes already measured (the probe the plan was made from)."""
        self.browser = browser
        self.probe = probe
        self.on_result = on_result
        self.debounce_s = debounce_s
        self.alive = alive
        self.members: dict[str, NodeRecord] = {r.node_id: r for r in known}
        self.measured_ids: frozenset[str] = frozenset(self.members)
        self.last: dict[str, Any] | None = None
        self.probes = 0  # completed probes
        self._dirty = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        browser.on_change = self._dirty.set

    async def start(self) -> None:
        await self.browser.start()
        self._task = asyncio.create_task(self._run(), name="membership-prober")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.browser.close()

    async def _settle(self) -> None:
        """Return once no change has arrived for debounce_s."""
        while True:
            self._dirty.clear()
            try:
                async with asyncio.timeout(self.debounce_s):
                    await self._dirty.wait()
            except TimeoutError:
                return

    async def _membership(self) -> dict[str, NodeRecord]:
        """The browser's nodes, plus earlier members it does not list that still answer."""
        seen = {r.node_id: r for r in self.browser.snapshot()}
        unlisted = [r for i, r in self.members.items() if i not in seen]
        still = await self.alive(unlisted) if unlisted else set()
        return {**{r.node_id: r for r in unlisted if r.node_id in still}, **seen}

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            await self._settle()
            members = await self._membership()
            self.members = members
            ids = frozenset(members)
            if ids == self.measured_ids or not members:
                continue
            records = sorted(members.values(), key=lambda r: (r.name, r.node_id))
            joined = sorted(r.name for r in records if r.node_id not in self.measured_ids)
            log.info(
                "membership changed (%d nodes; new: %s): probing again",
                len(records), ", ".join(joined) or "none",
            )  # fmt: skip
            try:
                result = await self.probe(records)
            except (grpc.aio.AioRpcError, OSError, RuntimeError, ValueError) as e:
                log.warning("re-probe after a membership change failed: %s", e)
                continue
            doc: dict[str, Any] = {**result.to_json(), "measured_at": time.time()}
            # Nodes that did not answer the probe are not members any more.
            self.measured_ids = frozenset(str(n["id"]) for n in doc.get("nodes", []))
            self.members = {i: r for i, r in members.items() if i in self.measured_ids}
            self.last = doc
            self.probes += 1
            self.on_result(doc)
