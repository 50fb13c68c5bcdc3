"""Re-probing on membership changes (coordinator/reprobe.py): debounced, only when the set of
nodes changed, never stuck on a failed probe; and end to end, `coordinator up` over mDNS
measures a node that joins after it started serving."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.reprobe import MembershipProber
from node.mdns import NodeRecord


def rec(i: int) -> NodeRecord:
    return NodeRecord(
        node_id=f"id{i}", name=f"n{i}", host="127.0.0.1", port=5000 + i, protocol_version=1,
        backend="cpu", device_count=1, mem_bytes=1, cluster="c",
    )  # fmt: skip


class FakeBrowser:
    def __init__(self) -> None:
        self.on_change: Callable[[], None] | None = None
        self.nodes: list[NodeRecord] = []
        self.closed = False

    async def start(self) -> None:
        pass

    def snapshot(self) -> list[NodeRecord]:
        return list(self.nodes)

    async def close(self) -> None:
        self.closed = True

    def set(self, nodes: list[NodeRecord]) -> None:
        self.nodes = nodes
        assert self.on_change is not None
        self.on_change()


class FakeResult:
    def __init__(self, nodes: Sequence[NodeRecord]) -> None:
        self.nodes = list(nodes)

    def to_json(self) -> dict[str, Any]:
        return {"nodes": [{"id": n.node_id, "name": n.name} for n in self.nodes], "links": []}


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_prober_debounces_skips_unchanged_membership_and_survives_failures() -> None:
    async def body() -> None:
        browser = FakeBrowser()
        calls: list[list[str]] = []
        results: list[dict[str, Any]] = []
        fail = {"next": False}

        async def probe(nodes: Sequence[NodeRecord]) -> FakeResult:
            calls.append([n.name for n in nodes])
            if fail["next"]:
                fail["next"] = False
                raise OSError("node went away mid-probe")
            return FakeResult(nodes)

        up = {"id0", "id1", "id2", "id3"}

        async def alive(nodes: Sequence[NodeRecord]) -> set[str]:
            return {n.node_id for n in nodes} & up

        prober = MembershipProber(
            browser, probe, results.append, known=[rec(0), rec(1)], debounce_s=0.1, alive=alive
        )
        await prober.start()
        try:
            # The browser announcing the nodes already measured: nothing to do.
            browser.set([rec(0), rec(1)])
            await asyncio.sleep(0.3)
            assert calls == []
            # A burst of changes ends in one probe of the final membership.
            browser.set([rec(0), rec(1), rec(2)])
            browser.set([rec(0), rec(1), rec(2), rec(3)])
            await until(lambda: len(results) == 1)
            assert calls == [["n0", "n1", "n2", "n3"]]
            assert [n["name"] for n in results[0]["nodes"]] == ["n0", "n1", "n2", "n3"]
            assert "measured_at" in results[0]
            # n2 and n3 leave (they stop answering); the probe of the rest fails: the last
            # result is kept, and the next change tries again.
            up -= {"id2", "id3"}
            fail["next"] = True
            browser.set([rec(0), rec(1)])
            await until(lambda: len(calls) == 2)
            await asyncio.sleep(0.2)
            assert len(results) == 1 and prober.last == results[0]
            browser.set([rec(0), rec(1)])
            await until(lambda: len(results) == 2)
            assert [n["name"] for n in results[1]["nodes"]] == ["n0", "n1"]
        finally:
            await prober.close()
        assert browser.closed

    asyncio.run(body())


def test_prober_keeps_a_live_node_whose_record_did_not_resolve() -> None:
    async def body() -> None:
        browser = FakeBrowser()
        probed: list[list[str]] = []

        async def probe(nodes: Sequence[NodeRecord]) -> FakeResult:
            probed.append([n.name for n in nodes])
            return FakeResult(nodes)

        async def alive(nodes: Sequence[NodeRecord]) -> set[str]:
            return {n.node_id for n in nodes}  # n0 answers GetInfo

        done: list[dict[str, Any]] = []
        prober = MembershipProber(
            browser, probe, done.append, known=[rec(0), rec(1)], debounce_s=0.05, alive=alive
        )
        await prober.start()
        try:
            browser.set([rec(1), rec(2)])  # n0's mDNS record did not resolve; n2 joined
            await until(lambda: len(done) == 1)
            assert probed == [["n0", "n1", "n2"]]
        finally:
            await prober.close()

    asyncio.run(body())


def test_prober_never_blocks_the_event_loop_while_probing() -> None:
    async def body() -> None:
        browser = FakeBrowser()
        release = asyncio.Event()

        async def probe(nodes: Sequence[NodeRecord]) -> FakeResult:
            await release.wait()  # a slow probe: the nodes are measuring
            return FakeResult(nodes)

        done: list[dict[str, Any]] = []
        prober = MembershipProber(browser, probe, done.append, debounce_s=0.05)
        await prober.start()
        try:
            browser.set([rec(0)])
            await asyncio.sleep(0.2)
            ticks = 0
            for _ in range(10):  # the loop keeps serving while the probe is in flight
                await asyncio.sleep(0.01)
                ticks += 1
            assert ticks == 10 and not done
            release.set()
            await until(lambda: len(done) == 1)
        finally:
            await prober.close()

    asyncio.run(body())


# ----- end to end ----------------------------------------------------------------------------


@pytest.mark.slow
def test_up_reprobes_when_a_node_joins(tiny_llama: Path, tmp_path: Path) -> None:
    """`coordinator up` plans from a probe of two mDNS nodes; a third node joins while it
    serves; /api/state's probe then includes it (and its links), without a restart."""
    from coordinator.lab.localcluster import CoordinatorProcess, LocalCluster

    cluster_name = f"rp{os.getpid()}{int(time.time() * 1000) % 100000}"
    logs = tmp_path / "logs"
    logs.mkdir()
    with LocalCluster(2, cluster_name, log_dir=logs, name_prefix="rp") as cluster:
        proc = CoordinatorProcess(
            tiny_llama,
            [],
            tmp_path / "coordinator.log",
            [
                "--cluster",
                cluster_name,
                "--nodes",
                "2",
                "--wait",
                "20",
                "--reprobe-debounce",
                "0.5",
            ],
        )
        try:
            state = httpx.get(proc.url + "/api/state").json()
            assert state["plan"]["predicted"]["decode_tps"] > 0
            assert sorted(state["probe"]["nodes"]) == ["rp0", "rp1"]
            first_at = state["probe"]["measured_at"]
            # Serving goes on while the new node is measured.
            body = {"model": tiny_llama.name, "prompt": "hello", "max_tokens": 4}
            httpx.post(proc.url + "/v1/completions", json=body, timeout=60).raise_for_status()
            cluster.start_node("rp2")
            deadline = time.monotonic() + 90
            while True:
                state = httpx.get(proc.url + "/api/state").json()
                if "rp2" in state["probe"]["nodes"]:
                    break
                assert time.monotonic() < deadline, f"no re-probe: {state['probe']}"
                httpx.post(proc.url + "/v1/completions", json=body, timeout=60).raise_for_status()
                time.sleep(0.5)
            assert state["probe"]["measured_at"] > first_at
            assert sorted(state["probe"]["nodes"]) == ["rp0", "rp1", "rp2"]
            pairs = {(lk["src"], lk["dst"]) for lk in state["links"]}
            assert ("rp2", "rp0") in pairs and ("rp0", "rp2") in pairs
        finally:
            proc.stop()
    log = (tmp_path / "coordinator.log").read_text()
    assert "re-probed the cluster after a membership change" in log
