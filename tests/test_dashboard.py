"""The dashboard: its state document and node monitor, and the page itself in headless
Chromium (Debian's `chromium`, driven by Playwright) while a generation runs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.api import ApiState, create_app
from coordinator.dashboard.state import NodeMonitor, NodeTarget, build_state, links_of
from coordinator.lab.localcluster import CoordinatorProcess
from coordinator.metrics import ServingMetrics
from node import hardware

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def synthetic_probe(nodes: list[Any]) -> dict[str, Any]:
    """A probe result in `ProbeResult.to_json()` shape; the last pair is the slowest."""
    links = []
    for a in nodes:
        for b in nodes:
            if a is not b:
                links.append(
                    {
                        "src": a.node_id,
                        "dst": b.node_id,
                        "latency_us": 80.0,
                        "bandwidth_gbs": 2.0,
                        "same_host": True,
                        "slowest": False,
                    }
                )
    links[-1].update(bandwidth_gbs=0.5, slowest=True)
    return {"nodes": [{"id": n.node_id, "name": n.name} for n in nodes], "links": links}


# ----- state document ------------------------------------------------------------------------


def test_links_of_reads_probe_results() -> None:
    assert links_of(None) is None
    probe = {
        "nodes": [{"id": "a1", "name": "alpha"}, {"id": "b2", "name": "beta"}],
        "links": [
            {"src": "a1", "dst": "b2", "latency_us": 50, "bandwidth_gbs": 1.1, "same_host": False},
            {
                "src": "b2",
                "dst": "a1",
                "src_name": "B",
                "dst_name": "A",
                "latency_us": 60,
                "bandwidth_gbs": 0.9,
                "slowest": True,
            },
            {"src": "a1", "dst": "b2", "latency_us": "fast"},
            "garbage",
        ],
    }
    links = links_of(probe)
    assert links is not None and len(links) == 2
    assert (links[0].src, links[0].dst, links[0].latency_us) == ("alpha", "beta", 50.0)
    assert (links[1].src, links[1].dst, links[1].slowest) == ("B", "A", True)


def test_state_and_static_files_without_a_plan(tokenizer_path: Path) -> None:
    from mlx_lm.utils import load_tokenizer

    probe = {"nodes": [], "links": [{"src": "x", "dst": "y", "latency_us": 1, "bandwidth_gbs": 2}]}
    state = ApiState("m", load_tokenizer(tokenizer_path), None, probe=probe)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            page = await c.get("/")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            assert '<script src="/static/dashboard.js">' in page.text
            js = await c.get("/static/dashboard.js")
            assert js.status_code == 200 and "/api/state" in js.text
            assert (await c.get("/static/dashboard.css")).status_code == 200
            doc = (await c.get("/api/state")).json()
        assert doc["plan"] is None and doc["nodes"] == [] and doc["model"] == "m"
        assert doc["links"] == [
            {
                "src": "x",
                "dst": "y",
                "latency_us": 1.0,
                "bandwidth_gbs": 2.0,
                "same_host": False,
                "slowest": False,
            }
        ]
        assert doc["live"]["in_flight"] == 0

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def tokenizer_path(tiny_llama: Path) -> Path:
    return tiny_llama


def test_node_monitor_sees_live_and_dead_nodes(local_cluster: Any) -> None:
    metrics = ServingMetrics()
    targets = [NodeTarget(n.name, n.address) for n in local_cluster.nodes]
    targets.append(NodeTarget("ghost", "127.0.0.1:9"))

    async def scenario() -> None:
        monitor = NodeMonitor(targets, period_s=0.2, timeout_s=1.0, metrics=metrics)
        await monitor.start()
        try:
            views = monitor.views()
        finally:
            await monitor.close()
        live, dead = views[:-1], views[-1]
        assert [v.name for v in live] == [n.name for n in local_cluster.nodes]
        assert all(v.reachable and v.devices and v.mem_total_bytes > 0 for v in live)
        assert all(v.backend == hardware.mlx_backend() for v in live)
        assert all(sum(d.runs_stages for d in v.devices) == 1 for v in live)
        assert not dead.reachable and dead.error
        state = build_state("m", None, metrics, views)
        assert [n["reachable"] for n in state["nodes"]] == [True, True, True, False]  # type: ignore[index]
        text = metrics.render()
        assert 'layerlink_node_up{node="ghost"} 0' in text
        assert f'layerlink_node_up{{node="{local_cluster.nodes[0].name}"}} 1' in text

    asyncio.run(scenario())


# ----- the page in a browser -----------------------------------------------------------------


def probe_for(nodes: list[Any]) -> dict[str, Any]:
    """A real link probe (`coordinator probe --json --no-devices`) when that command exists
    and succeeds, else a synthetic one: the dashboard renders either the same way."""
    cmd = [sys.executable, "-m", "coordinator.main", "probe", "--json", "--no-devices"]
    for n in nodes:
        cmd += ["--node", n.address]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        doc = json.loads(out.stdout) if out.returncode == 0 else None
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        doc = None
    if isinstance(doc, dict) and doc.get("links"):
        return doc
    return synthetic_probe(nodes)


@pytest.fixture(scope="module")
def dashboard_server(
    local_cluster: Any, tiny_llama: Path, tmp_path_factory: Any
) -> Iterator[CoordinatorProcess]:
    d = tmp_path_factory.mktemp("dashboard")
    probe_path = d / "probe.json"
    probe_path.write_text(json.dumps(probe_for(local_cluster.nodes)))
    proc = CoordinatorProcess(
        tiny_llama, local_cluster.nodes, d / "coordinator.log", ["--probe-json", str(probe_path)]
    )
    try:
        yield proc
    finally:
        proc.stop()


def test_dashboard_in_chromium(
    dashboard_server: CoordinatorProcess, local_cluster: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `make test-deps` installs Debian's chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    url = dashboard_server.url
    state = httpx.get(url + "/api/state").json()
    stages = state["plan"]["stages"]
    # A few finished requests, so the table of recent requests has rows.
    for i in range(3):
        httpx.post(
            url + "/v1/completions",
            json={"model": tiny_llama.name, "prompt": f"warm {i}", "max_tokens": 16 * (i + 1)},
            timeout=60,
        ).raise_for_status()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/")
            expect = sync_api.expect
            expect(page.locator(".node")).to_have_count(len(local_cluster.nodes), timeout=15_000)
            for n in local_cluster.nodes:
                card = page.locator(f'.node[data-node="{n.name}"]')
                expect(card).to_be_visible()
                expect(card).to_contain_text(n.address)
                expect(card).to_contain_text(hardware.mlx_backend())
                expect(card).to_contain_text("free")
            segments = page.locator(".plan-seg")
            expect(segments).to_have_count(len(stages))
            for i, s in enumerate(stages):
                a, b = s["layers"]
                expect(segments.nth(i)).to_have_text(f"{s['node']} [{a}, {b})")
            expect(page.locator("#plan-id")).to_contain_text(state["plan"]["plan_id"])
            expect(page.locator("#links-section")).to_be_visible()
            slowest = sum(1 for lk in state["links"] if lk["slowest"]) or 1
            expect(page.locator("#links td.slowest")).to_have_count(slowest)
            expect(page.locator("#links tr")).to_have_count(len(local_cluster.nodes) + 1)
            expect(page.locator("#recent tr")).to_have_count(3)
            # The weights panel: one finished bar per stage (these nodes hold the model
            # folder, so each loads its own copy).
            bars = state["shipping"]["stages"]
            assert len(bars) == len(stages) and all(b["done"] for b in bars)
            expect(page.locator("#weights-section")).to_be_visible()
            expect(page.locator("#weights .what")).to_have_count(len(stages))
            for i, b in enumerate(bars):
                want = "own copy" if b["source"] == "own copy" else "sent"
                expect(page.locator("#weights .what").nth(i)).to_contain_text(want)

            expect(page.locator("#tps")).not_to_have_text("–")
            before = page.locator("#tps").text_content()
            # Load that lasts as long as the checks need it: long requests back to back until
            # the picture is taken (one request alone may finish before the chart has history).
            body = {
                "model": tiny_llama.name,
                "prompt": "a long answer",
                "max_tokens": 1500,
                "temperature": 0,
            }
            done = threading.Event()
            finished: list[int] = []

            def load() -> None:
                while not done.is_set():
                    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
                    finished.append(r.status_code)

            gen = threading.Thread(target=load)
            gen.start()
            try:
                page.wait_for_function(
                    "(before) => { const t = document.getElementById('tps').textContent;"
                    " return t !== before && parseFloat(t) > 0; }",
                    arg=before,
                    timeout=20_000,
                )
                expect(page.locator("#in-flight")).to_have_text("1", timeout=10_000)
                # A few seconds of history in the chart before the picture.
                n0 = page.evaluate("tpsHistory.length")
                page.wait_for_function("(n) => tpsHistory.length >= n + 4", arg=n0, timeout=15_000)
                expect(page.locator("#in-flight")).to_have_text("1", timeout=10_000)
                expect(page.locator(".node .active").first).to_contain_text("1 active")
                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                target = os.environ.get("LAYERLINK_DASHBOARD_SCREENSHOT")
                if target:
                    shutil.copyfile(shot, target)
            finally:
                done.set()
                gen.join(120)
            assert finished and all(code == 200 for code in finished), finished
            expect(page.locator("#in-flight")).to_have_text("0", timeout=10_000)
            expect(page.locator("#recent tr")).to_have_count(
                min(3 + len(finished), 25), timeout=10_000
            )
        finally:
            browser.close()


def test_dashboard_answers_while_the_coordinator_is_still_loading(
    local_cluster: Any, tiny_llama: Path, tmp_path: Path
) -> None:
    """`coordinator up` serves /api/state (and the page) before its plan is loaded, so the
    weights can be watched arriving; the API answers 503 until then. A long speed check
    after loading holds it in that state long enough to look."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Even placement: three stages, so never the module's dashboard_server's plan (which may
    # be the planner's one-stage plan on the same node: the node would refuse to replace a
    # plan another live coordinator uses).
    # 500 tokens over three stages: several seconds between the last weight bar and the plan
    # (1500 held it 20 s or more, all of which the test then waited out before serving).
    cmd = [sys.executable, "-m", "coordinator.main", "up", "--model", str(tiny_llama),
           "--port", str(port), "--check-tokens", "500", "--placement", "even"]  # fmt: skip
    for n in local_cluster.nodes:
        cmd += ["--node", n.address]
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "up.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
        try:
            early: dict[str, Any] | None = None
            refused = None
            deadline = time.monotonic() + 120
            while (early is None or refused is None) and time.monotonic() < deadline:
                assert proc.poll() is None, (tmp_path / "up.log").read_text()[-2000:]
                try:
                    state = httpx.get(url + "/api/state", timeout=5).json()
                    if state["plan"] is not None:
                        break  # loaded already: too late to look
                    bars = (state["shipping"] or {}).get("stages") or []
                    if bars and all(b["done"] for b in bars):
                        early = state
                        refused = httpx.post(url + "/v1/completions", timeout=5, json={
                            "model": tiny_llama.name, "prompt": "hi", "max_tokens": 2})  # fmt: skip
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            assert early is not None, "no state with finished weight bars before the plan loaded"
            assert refused is not None and refused.status_code == 503, refused
            assert "no plan is loaded yet" in refused.text
            page = httpx.get(url + "/", timeout=5)
            assert page.status_code == 200 and "weights-section" in page.text
            # ... and once loaded it serves.
            while time.monotonic() < deadline:
                r = httpx.post(url + "/v1/completions", timeout=60, json={
                    "model": tiny_llama.name, "prompt": "hi", "max_tokens": 2})  # fmt: skip
                if r.status_code == 200:
                    break
                time.sleep(0.2)
            assert r.status_code == 200, r.text
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
