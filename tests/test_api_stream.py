"""Streaming over raw HTTP against `coordinator up` on the session's three nodes: the SSE
framing, error bodies, many concurrent streams, client disconnects, and throughput with
concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.lab.localcluster import CoordinatorProcess
from coordinator.nodeclient import NodeClient
from coordinator.pipeline import GenerationParams, Pipeline
from coordinator.session import fixed_plan, read_model


@pytest.fixture(scope="module")
def server(
    local_cluster: Any, tiny_llama: Path, tmp_path_factory: Any
) -> Iterator[CoordinatorProcess]:
    log = tmp_path_factory.mktemp("coordinator-stream") / "coordinator.log"
    # Three stages, one per node: the memory split puts the 8 layers over all of them (the
    # planner would keep them on one CPU node).
    proc = CoordinatorProcess(tiny_llama, local_cluster.nodes, log, ["--placement", "memory"])
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def plan(server: CoordinatorProcess) -> dict[str, Any]:
    p: dict[str, Any] = httpx.get(server.url + "/api/state").json()["plan"]
    assert len(p["stages"]) == 3
    return p


def sse_events(raw: bytes) -> list[str]:
    """Split an SSE body into its data payloads, checking the framing on the way."""
    text = raw.decode()
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), f"unexpected SSE block {block!r}"
        assert "\n" not in block, "one data line per event"
        events.append(block[len("data: ") :])
    return events


def test_chat_sse_framing(server: CoordinatorProcess, tiny_llama: Path) -> None:
    body = {
        "model": tiny_llama.name,
        "messages": [{"role": "user", "content": "frame it"}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["model"] == tiny_llama.name for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *content, last, usage = chunks
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert all(c["usage"] is None for c in content + [last])
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["choices"][0]["delta"] == {}
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 12
    whole = httpx.post(
        server.url + "/v1/chat/completions", json={**body, "stream": False, "stream_options": None}
    )
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    assert text == whole.json()["choices"][0]["message"]["content"]


def test_completion_sse_without_usage(server: CoordinatorProcess, tiny_llama: Path) -> None:
    body = {"model": tiny_llama.name, "prompt": "abc", "max_tokens": 5, "stream": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/chat/completions", {"model": "tiny-llama"}, 400, "messages"),
        ("/v1/chat/completions", {"model": "tiny-llama", "messages": []}, 400, "messages"),
        (
            "/v1/chat/completions",
            {"model": "tiny-llama", "messages": [{"role": "x", "content": "a"}]},
            400,
            "messages.0.role",
        ),
        (
            "/v1/chat/completions",
            {"model": "gpt-4", "messages": [{"role": "user", "content": "a"}]},
            404,
            "model",
        ),
        (
            "/v1/chat/completions",
            {"model": "tiny-llama", "n": 3, "messages": [{"role": "user", "content": "a"}]},
            400,
            "n",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "tiny-llama",
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": "a"}],
            },
            400,
            "stream_options",
        ),
        (
            "/v1/completions",
            {"model": "tiny-llama", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]},
            400,
            "stop",
        ),
        (
            "/v1/completions",
            {"model": "tiny-llama", "prompt": "a", "temperature": 3},
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            {"model": "tiny-llama", "prompt": "a", "max_tokens": 0},
            400,
            "max_tokens",
        ),
        ("/v1/completions", {"model": "tiny-llama", "prompt": [1, 999999]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny-llama", "prompt": ["a", "b"]}, 400, "prompt"),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "a", "logprobs": 2}, 400, "logprobs"),
    ],
)
def test_error_bodies(
    server: CoordinatorProcess, path: str, body: Any, status: int, param: str | None
) -> None:
    if isinstance(body, bytes):
        r = httpx.post(
            server.url + path, content=body, headers={"content-type": "application/json"}
        )
    else:
        r = httpx.post(server.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and isinstance(err["message"], str)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_unknown_route_is_openai_error(server: CoordinatorProcess) -> None:
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404
    assert "error" in r.json()


async def stream_chat(
    client: httpx.AsyncClient, model: str, content: str, max_tokens: int
) -> tuple[str, int, float, float]:
    """One streaming chat: (text, completion tokens, first-token time, end time)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    parts: list[str] = []
    tokens = 0
    first = 0.0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for ch in chunk["choices"]:
                if ch["delta"].get("content"):
                    first = first or time.perf_counter()
                    parts.append(ch["delta"]["content"])
    return "".join(parts), tokens, first, time.perf_counter()


def test_eight_concurrent_streams_match_their_solo_runs(
    server: CoordinatorProcess, tiny_llama: Path, plan: dict[str, Any]
) -> None:
    """Greedy answers do not depend on what else runs, though the stages batch the decode
    steps of requests that reach them together (counted by the nodes)."""
    prompts = [f"Request number {i}: tell me about {w}" for i, w in enumerate("abcdefgh")]
    addresses = [s["address"] for s in plan["stages"]]

    async def batched() -> list[int]:
        out = []
        for a in addresses:
            async with NodeClient(a) as c:
                info = await c.get_info()
            out += [s.batched_steps for s in info.stages if s.plan_id == plan["plan_id"]]
        return out

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            alone = [await stream_chat(c, tiny_llama.name, p, 20) for p in prompts]
            before = await batched()
            together = await asyncio.gather(
                *(stream_chat(c, tiny_llama.name, p, 20) for p in prompts)
            )
            after = await batched()
        assert len({a[0] for a in alone}) == len(prompts), "prompts should give distinct answers"
        for i, (a, b) in enumerate(zip(alone, together, strict=True)):
            assert b[1] == a[1] == 20, f"request {i} token counts {a[1]} vs {b[1]}"
            assert b[0] == a[0], f"request {i} differs when run with 7 others"
        return [y - x for x, y in zip(before, after, strict=True)]

    gained = asyncio.run(scenario())
    assert len(gained) == 3 and sum(gained) > 0, f"no decode step was batched: {gained}"


async def active_requests(addresses: list[str], plan_id: str) -> list[int]:
    out = []
    for a in addresses:
        async with NodeClient(a) as c:
            info = await c.get_info(timeout=5)
        out.append(sum(s.active_requests for s in info.stages if s.plan_id == plan_id))
    return out


async def poll_until(check: Any, timeout: float, interval: float = 0.1) -> Any:
    """Call check() until it returns (True, value); fail with its last value after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, last = await check()
        if done:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in time (last: {last})")
        await asyncio.sleep(interval)


def test_client_disconnect_frees_every_kv_cache(
    server: CoordinatorProcess, tiny_llama: Path, plan: dict[str, Any]
) -> None:
    addresses = [s["address"] for s in plan["stages"]]

    async def scenario() -> None:
        assert await active_requests(addresses, plan["plan_id"]) == [0, 0, 0]
        body = {
            "model": tiny_llama.name,
            "prompt": "a long story",
            "max_tokens": 1500,
            "temperature": 0,
            "stream": True,
        }
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            assert r.status_code == 200
            # Read a few events but keep the line iterator alive: abandoning it would
            # close the connection already.
            lines = r.aiter_lines()
            seen = 0
            while seen < 5:
                seen += (await lines.__anext__()).startswith("data: ")

            async def all_hold_one() -> tuple[bool, list[int]]:
                got = await active_requests(addresses, plan["plan_id"])
                return got == [1, 1, 1], got

            await poll_until(all_hold_one, 10)
        # Leaving the block closes the connection mid-generation.

        async def all_free() -> tuple[bool, list[int]]:
            got = await active_requests(addresses, plan["plan_id"])
            return got == [0, 0, 0], got

        t0 = time.monotonic()
        await poll_until(all_free, 10)
        freed_after = time.monotonic() - t0
        assert freed_after < 5, f"KV caches freed only after {freed_after:.1f}s"
        metrics = httpx.get(server.url + "/metrics").text
        assert (
            'layerlink_requests_total{endpoint="completions",finish_reason="cancelled"} 1'
            in metrics
        )
        state = httpx.get(server.url + "/api/state").json()
        assert state["live"]["in_flight"] == 0
        assert state["recent"][0]["finish_reason"] == "cancelled"
        assert state["recent"][0]["completion_tokens"] < 1500

    asyncio.run(scenario())


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    # Busy time of all CPUs together: user + nice + system + irq + softirq + steal.
    cpu = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in cpu[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def test_aggregate_decode_rate_rises_with_concurrency(
    server: CoordinatorProcess,
    local_cluster: Any,
    tiny_llama: Path,
    plan: dict[str, Any],
    tmp_path: Path,
) -> None:
    """Aggregate decode tokens/s at concurrency 4 vs 1 on a 3-stage pipeline over the local
    nodes: rounds of each, interleaved, median per level, after a warm-up round.

    The 1.5x check is on the cluster's own rate, driven by the coordinator's `Pipeline` in
    this process. The same rounds over HTTP (`coordinator up`, SSE, an httpx client) are
    measured and reported too, and must still gain: on two cores the HTTP client and server
    take ~1 ms of CPU per token from the cores the three nodes need (docs/api.md). CPU taken
    by processes outside the test makes either figure meaningless: then the test skips and
    says how busy the machine was."""
    max_tokens = 64
    ours = [server.proc.pid, os.getpid(), *(n.pid for n in local_cluster.nodes)]
    model = read_model(tiny_llama)
    nodes = sorted(local_cluster.nodes, key=lambda n: n.name)

    async def pipeline_round(pipe: Pipeline, n: int) -> float:
        async def one(i: int) -> tuple[int, float, float]:
            count, first, last = 0, 0.0, 0.0
            prompt = [5 + i, 9, 33, 71 + i]
            async for _ in pipe.stream(prompt, GenerationParams(max_tokens=max_tokens)):
                count += 1
                last = time.perf_counter()
                first = first or last
            return count, first, last

        runs = await asyncio.gather(*(one(i) for i in range(n)))
        return sum(c - 1 for c, _, _ in runs) / (max(r[2] for r in runs) - min(r[1] for r in runs))

    async def http_round(c: httpx.AsyncClient, n: int) -> float:
        runs = await asyncio.gather(
            *(stream_chat(c, tiny_llama.name, f"throughput {i}", max_tokens) for i in range(n))
        )
        decoded = sum(tokens - 1 for _, tokens, _, _ in runs)
        span = max(end for *_, end in runs) - min(first for _, _, first, _ in runs)
        return decoded / span

    async def scenario() -> dict[str, dict[int, list[float]]]:
        # Its own plan id (a new version), beside the plan `coordinator up` serves (the same
        # id would be refused: another owner's stages, in use).
        mine = replace(fixed_plan(model, nodes, [3, 3, 2]), version=1000, plan_id="")
        assert mine.plan_id != plan["plan_id"]
        pipe = Pipeline(mine, str(model.path))
        await pipe.load()
        await pipe.open()
        rates: dict[str, dict[int, list[float]]] = {
            "cluster": {1: [], 4: []},
            "http": {1: [], 4: []},
        }
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                await pipeline_round(pipe, 4)
                await http_round(c, 4)
                for _ in range(3):
                    for n in (1, 4):
                        rates["cluster"][n].append(await pipeline_round(pipe, n))
                        rates["http"][n].append(await http_round(c, n))
        finally:
            await pipe.close()
        return rates

    t0, busy0 = time.monotonic(), _machine_busy_seconds()
    ours0 = sum(_cpu_seconds(p) for p in ours)
    rounds = asyncio.run(scenario())
    wall = time.monotonic() - t0
    others = (_machine_busy_seconds() - busy0 - (sum(_cpu_seconds(p) for p in ours) - ours0)) / wall
    rates = {k: {n: statistics.median(r) for n, r in v.items()} for k, v in rounds.items()}
    ratio = {k: v[4] / v[1] for k, v in rates.items()}
    report = {
        "tokens_per_s": rates,
        "rounds": rounds,
        "ratio_4_vs_1": ratio,
        "other_processes_cpu_cores": others,
        "cpus": os.cpu_count(),
    }
    (tmp_path / "concurrency.json").write_text(json.dumps(report, indent=2))
    print(
        "aggregate decode tokens/s, "
        + "; ".join(
            f"{k}: c=1 {v[1]:.1f}, c=4 {v[4]:.1f}, ratio {ratio[k]:.2f}" for k, v in rates.items()
        )
        + f"; other processes used {others:.2f} cores"
    )
    if (ratio["cluster"] < 1.5 or ratio["http"] < 1.2) and others > 0.25:
        pytest.skip(
            f"ratios {ratio} measured while other processes used {others:.2f} CPU cores; "
            "run on a quiet machine to check the 1.5x target"
        )
    assert ratio["cluster"] >= 1.5, f"cluster: {rates['cluster']}, ratio {ratio['cluster']:.2f}"
    assert ratio["http"] >= 1.2, f"over HTTP: {rates['http']}, ratio {ratio['http']:.2f}"


def test_abandoned_nonstreaming_request_is_cancelled(
    server: CoordinatorProcess, tiny_llama: Path, plan: dict[str, Any]
) -> None:
    addresses = [s["address"] for s in plan["stages"]]
    body = {"model": tiny_llama.name, "prompt": "never mind", "max_tokens": 1500, "temperature": 0}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url) as c:
            call = asyncio.create_task(c.post("/v1/completions", json=body, timeout=60))

            async def all_hold_one() -> tuple[bool, list[int]]:
                got = await active_requests(addresses, plan["plan_id"])
                return got == [1, 1, 1], got

            await poll_until(all_hold_one, 10)
            call.cancel()  # closes the connection without reading an answer
            with contextlib.suppress(asyncio.CancelledError):
                await call

        async def all_free() -> tuple[bool, list[int]]:
            got = await active_requests(addresses, plan["plan_id"])
            return got == [0, 0, 0], got

        await poll_until(all_free, 5)
        recent = httpx.get(server.url + "/api/state").json()["recent"][0]
        assert recent["finish_reason"] == "cancelled" and recent["completion_tokens"] < 1500

    asyncio.run(scenario())


def _samples(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric in Prometheus text."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out


def test_metrics_report_each_stage_and_the_hops(
    server: CoordinatorProcess, plan: dict[str, Any], tiny_llama: Path
) -> None:
    """Per-stage compute (the nodes' counters) and per-hop time in /metrics. The counters
    cover every decode step, and the stages' compute per token over a window of only these
    requests fits inside the time per token the client saw."""
    names = [s["node"] for s in plan["stages"]]
    keys = [f'{{stage="{i}",node="{n}"}}' for i, n in enumerate(names)]

    def counters() -> tuple[dict[str, float], dict[str, float], str]:
        text = httpx.get(server.url + "/metrics").text
        steps = _samples(text, "layerlink_stage_decode_steps_total")
        return steps, _samples(text, "layerlink_stage_decode_seconds_total"), text

    def settled() -> tuple[dict[str, float], dict[str, float], str]:
        """The counters from a node-monitor poll sent after this call: /metrics mirrors the
        monitor's last GetInfo of each node (coordinator/api.py), and /api/state says when
        each was answered (`checked_at`). Two rounds of polls answered after now: the second
        round was sent after the first had been answered, so after now."""
        mark = time.time()
        deadline = time.monotonic() + 60
        for _ in range(2):
            while True:
                done = [
                    n["checked_at"] for n in httpx.get(server.url + "/api/state").json()["nodes"]
                ]
                if done and min(done) > mark:
                    break
                assert time.monotonic() < deadline, f"no node-monitor poll after {mark}: {done}"
                time.sleep(0.1)
            mark = max(done)
        got = counters()
        assert all(k in got[0] for k in keys), got[0]
        return got

    steps0, seconds0, _ = settled()
    body = {"model": tiny_llama.name, "prompt": "count", "max_tokens": 48, "temperature": 0}
    decoded = 0
    for _ in range(3):
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        r.raise_for_status()
        out = r.json()
        # The first token comes from prefill; an end-of-sequence token is computed but not
        # counted in the usage.
        decoded += out["usage"]["completion_tokens"] - 1
        decoded += out["choices"][0]["finish_reason"] == "stop"
    steps1, seconds1, text = settled()
    state = httpx.get(server.url + "/api/state").json()
    per_token = []
    for k in keys:
        n = steps1[k] - steps0[k]
        assert n == decoded, (k, n, decoded)  # every decode step of the 3 requests, nothing else
        per_token.append((seconds1[k] - seconds0[k]) / n)
    compute = _samples(text, "layerlink_stage_compute_seconds")
    hop = _samples(text, "layerlink_hop_seconds")
    assert sorted(compute) == sorted(keys) and all(v > 0 for v in compute.values()), text
    assert list(hop) == [""] and hop[""] >= 0
    recent = [r for r in state["recent"][:3] if r["completion_tokens"] >= 8]
    token_s = 1 / statistics.median(r["tokens_per_s"] for r in recent)
    assert sum(per_token) < token_s, (per_token, token_s)
