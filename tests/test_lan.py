"""Acceptance of the cluster probe on a LAN in network namespaces (root only; see
coordinator/lab/lan.py).

- One node's link shaped to 100 Mbit/s: every link touching it measures within 15% of that,
  the others at least 5x faster, and the probe names exactly those links the slowest.
- A 4-node cluster's links are probed in under 10 s.
- Same-host pairs are flagged same_host and measure a lower latency than pairs that cross
  the (emulated) wire.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from coordinator.lab import lan as lanlib
from coordinator.lab.lan import RATE_100MBIT, Lan

REPO = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((REPO / "coordinator/schemas/probe.schema.json").read_text())
SHAPED_GBS = RATE_100MBIT / 8 / 1e9  # 0.0125 GB/s


def probe(lan: Lan, addresses: list[str], *extra: str) -> dict[str, Any]:
    """`coordinator probe --json` run from the hub namespace (the coordinator's seat)."""
    # The namespace nodes run open (coordinator/lab/lan.py): --insecure lets the coordinator
    # use them.
    argv = [
        sys.executable,
        "-m",
        "coordinator.main",
        "probe",
        "--json",
        "--wait",
        "0",
        "--insecure",
    ]
    argv += [a for addr in addresses for a in ("--node", addr)]
    done = subprocess.run(lan.hub_cmd([*argv, *extra]), capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    jsonschema.validate(doc, SCHEMA)
    return doc


@pytest.mark.netns
def test_shaped_node_links_are_measured_and_named_slowest(lan_factory: Any) -> None:
    lan = lan_factory(3)
    lan.shape(0, RATE_100MBIT)
    nodes = [lan.start_node(k) for k in range(3)] + [lan.start_node(2, "ns2b", port=50152)]
    lan.wait_ready(nodes)
    doc = probe(lan, [n.address for n in nodes], "--dtype", "float32", "--buffer-mib", "32")
    ids = {n.node_id: n.name for n in nodes}
    assert {n["id"] for n in doc["nodes"]} == set(ids)
    assert len(doc["links"]) == 12, doc["errors"]
    shaped_id = nodes[0].node_id
    touching = [lk for lk in doc["links"] if shaped_id in (lk["src"], lk["dst"])]
    others = [lk for lk in doc["links"] if shaped_id not in (lk["src"], lk["dst"])]
    for lk in touching:
        assert lk["bandwidth_gbs"] == pytest.approx(SHAPED_GBS, rel=0.15), lk
    for lk in others:
        assert lk["bandwidth_gbs"] >= 5 * SHAPED_GBS, lk
    assert {(lk["src"], lk["dst"]) for lk in doc["links"] if lk["slowest"]} == {
        (lk["src"], lk["dst"]) for lk in touching
    }
    assert shaped_id in (doc["slowest"]["src"], doc["slowest"]["dst"])
    for node in doc["nodes"]:
        (device,) = node["devices"]
        assert device["stream_gbs"] > 0
    # ns2 and ns2b share a namespace (one "machine"); every other pair crosses the bridge.
    same = {(lk["src"], lk["dst"]) for lk in doc["links"] if lk["same_host"]}
    assert same == {(nodes[2].node_id, nodes[3].node_id), (nodes[3].node_id, nodes[2].node_id)}

    # Unshaped, the same 4-node cluster's 12 links take under 10 s.
    lan.unshape(0)
    doc = probe(lan, [n.address for n in nodes], "--no-devices")
    assert len(doc["links"]) == 12
    assert doc["seconds"] < 10.0
    assert min(lk["bandwidth_gbs"] for lk in doc["links"]) >= 5 * SHAPED_GBS


WIRE_DELAY_US = 500.0


@pytest.mark.netns
def test_same_host_links_have_lower_latency_than_links_across_the_wire(lan_factory: Any) -> None:
    # Namespaces alone differ from loopback by ~10 us, below the probe's jitter: relays in
    # front of each node add WIRE_DELAY_US one-way to traffic from other namespaces only.
    # The probe measures the data path, so the nodes listen on loopback in their namespace
    # and a relay on the LAN address stands in front of each of their two ports (gRPC, and
    # data at the same number GetInfo gives).
    lan = lan_factory(2)
    local = "127.0.0.1"
    nodes = [lan.start_node(0, host=local), lan.start_node(1, host=local),
             lan.start_node(1, "ns1b", port=50152, host=local)]  # fmt: skip
    wires = [lan.start_wire(0, 50151, 50151, WIRE_DELAY_US, local),
             lan.start_wire(1, 50151, 50151, WIRE_DELAY_US, local),
             lan.start_wire(1, 50152, 50152, WIRE_DELAY_US, local)]  # fmt: skip
    data_wires = [
        lan.start_wire(k, p + lanlib.DATA_PORT_OFFSET, p + lanlib.DATA_PORT_OFFSET,
                       WIRE_DELAY_US, local)
        for k, p in ((0, 50151), (1, 50151), (1, 50152))
    ]  # fmt: skip
    lan.wait_ready(nodes + wires + data_wires)
    doc = probe(lan, [w.address for w in wires], "--no-devices")
    assert len(doc["links"]) == 6
    same = [lk for lk in doc["links"] if lk["same_host"]]
    across = [lk for lk in doc["links"] if not lk["same_host"]]
    local = {nodes[1].node_id, nodes[2].node_id}
    assert {(lk["src"], lk["dst"]) for lk in same} == {
        (nodes[1].node_id, nodes[2].node_id),
        (nodes[2].node_id, nodes[1].node_id),
    }
    assert all({lk["src"], lk["dst"]} != local for lk in across)
    worst_same = max(lk["latency_us"] for lk in same)
    best_across = min(lk["latency_us"] for lk in across)
    print(f"one-way latency: same host {sorted(round(lk['latency_us']) for lk in same)} us, "
          f"across the wire {sorted(round(lk['latency_us']) for lk in across)} us")  # fmt: skip
    assert worst_same < best_across
    # And the probe resolves the wire's delay itself, not just an ordering.
    extra = sum(lk["latency_us"] for lk in across) / len(across) - sum(
        lk["latency_us"] for lk in same
    ) / len(same)
    assert 0.7 * WIRE_DELAY_US < extra < 1.5 * WIRE_DELAY_US


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.netns
def test_teardown_runs_when_the_body_fails() -> None:
    reason = lanlib.unavailable_reason()
    if reason:
        pytest.skip(reason)
    lan = Lan(2)
    with pytest.raises(RuntimeError, match="test body failed"), lan:
        made = {n.netns for n in lan.nodes} | {lan.hub}
        assert made <= namespaces()
        proc = lan.start(0, ["sleep", "60"], "sleeper", 1).process
        raise RuntimeError("test body failed")
    assert not (made & namespaces())
    assert proc.poll() is not None


def test_skips_with_a_reason_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lanlib.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(lanlib.sys, "platform", "linux")
    assert "root" in lanlib.unavailable_reason()
