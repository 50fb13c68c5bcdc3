"""The OpenAI-compatible API: text handling and admission in-process, then the official
`openai` client and `coordinator chat` against `coordinator up` run as a real subprocess over
the session's node processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from coordinator.api import (
    Admission,
    ApiState,
    IncrementalDetokenizer,
    QueueFull,
    StopMatcher,
    create_app,
)
from coordinator.lab.localcluster import CoordinatorProcess
from coordinator.metrics import ServingMetrics
from coordinator.pipeline import GenerationParams, TokenEvent

# ----- a `coordinator up` subprocess, shared by the API, stream and dashboard tests ----------


@pytest.fixture(scope="module")
def server(
    local_cluster: Any, tiny_llama: Path, tmp_path_factory: Any
) -> Iterator[CoordinatorProcess]:
    log = tmp_path_factory.mktemp("coordinator") / "coordinator.log"
    proc = CoordinatorProcess(tiny_llama, local_cluster.nodes, log)
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path) -> Any:
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def client(server: CoordinatorProcess) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


# ----- text: incremental detokenizer and stop strings ----------------------------------------


def test_incremental_detokenizer_never_splits_a_character(tokenizer: Any) -> None:
    text = "héllo — 世界 🙂 naïve façade"
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    assert len(ids) > len(text.split()), "the text should span many byte-level tokens"
    detok = IncrementalDetokenizer(tokenizer.decode)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces), pieces
    # A lone decode of one of these tokens is an incomplete character: the wrapper held it.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)


def test_incremental_detokenizer_flushes_an_incomplete_character(tokenizer: Any) -> None:
    ids = list(tokenizer.encode("a世", add_special_tokens=False))
    detok = IncrementalDetokenizer(tokenizer.decode)
    out = "".join(detok.add(t) for t in ids[:-1])
    assert out == "a"
    assert detok.flush() == tokenizer.decode(ids[:-1])[1:]


def run_stops(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    m = StopMatcher(stops)
    out: list[str] = []
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            return out, True
    out.append(m.flush())
    return out, False


def test_stop_string_is_cut_exactly_across_pieces() -> None:
    out, hit = run_stops(["END"], ["abc E", "N", "D tail"])
    assert hit
    assert "".join(out) == "abc "
    assert out == ["abc ", "", ""], "text that may start the stop string is held back"


def test_stop_string_held_back_text_is_released_when_it_is_not_a_stop() -> None:
    out, hit = run_stops(["END"], ["abc E", "Nx", " more"])
    assert not hit
    assert out == ["abc ", "ENx", " more", ""]
    out, hit = run_stops(["END"], ["abc E"])
    assert not hit and "".join(out) == "abc E"


def test_earliest_of_several_stop_strings_wins() -> None:
    out, hit = run_stops(["cd", "b"], ["abcd"])
    assert hit and "".join(out) == "a"
    out, hit = run_stops(["xyz", "yy"], ["axy", "yz"])
    assert hit and "".join(out) == "ax"


def test_admission_bounds_running_and_waiting() -> None:
    async def scenario() -> None:
        adm = Admission(max_running=2, max_waiting=1)
        await adm.acquire()
        await adm.acquire()
        waiter = asyncio.create_task(adm.acquire())
        await asyncio.sleep(0)
        assert adm.waiting == 1 and not waiter.done()
        with pytest.raises(QueueFull):
            await adm.acquire()
        adm.release()
        await asyncio.wait_for(waiter, 5)
        assert adm.running == 2 and adm.waiting == 0

    asyncio.run(scenario())


# ----- in-process app with a scripted pipeline ----------------------------------------------


class ScriptedPipeline:
    """Yields fixed tokens, each after `gate` is set (if given); records releases."""

    def __init__(self, tokens: list[int], gate: asyncio.Event | None = None) -> None:
        self.tokens = tokens
        self.gate = gate
        self.released: list[str] = []
        self.plan = None
        self.failed: str | None = None

    async def stream(
        self, prompt: list[int], params: GenerationParams, request_id: str | None = None
    ) -> AsyncIterator[TokenEvent]:
        try:
            for i, t in enumerate(self.tokens[: params.max_tokens]):
                if self.gate is not None:
                    await self.gate.wait()
                yield TokenEvent(token=t, step=i)
                if t in params.stop_token_ids:
                    return
        finally:
            self.released.append(request_id or "")


def app_client(state: ApiState) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(state)), base_url="http://t"
    )


def test_queue_full_is_429_and_no_plan_is_503(tokenizer: Any) -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        pipe = ScriptedPipeline([65, 66, 67], gate)
        state = ApiState("m", tokenizer, pipe, admission=Admission(1, 1))  # type: ignore[arg-type]
        body = {"model": "m", "prompt": "hi", "max_tokens": 3, "temperature": 0}
        async with app_client(state) as c:
            first = asyncio.create_task(c.post("/v1/completions", json=body))
            second = asyncio.create_task(c.post("/v1/completions", json=body))
            while state.admission.running + state.admission.waiting < 2:
                await asyncio.sleep(0.01)
            third = await c.post("/v1/completions", json=body)
            assert third.status_code == 429
            assert third.headers["retry-after"] == "1"
            err = third.json()["error"]
            assert err["code"] == "queue_full" and "busy" in err["message"]
            gate.set()
            r1, r2 = await asyncio.gather(first, second)
            assert r1.status_code == r2.status_code == 200
            assert r1.json()["usage"]["completion_tokens"] == 3
            assert len(pipe.released) == 2
            assert state.admission.running == 0
            metrics = (await c.get("/metrics")).text
            assert 'layerlink_requests_rejected_total{reason="queue_full"} 1' in metrics
            state.pipeline = None
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 503
            assert r.json()["error"]["type"] == "service_unavailable"

    asyncio.run(scenario())


def test_eos_ends_with_stop_and_is_not_counted(tokenizer: Any) -> None:
    eos = next(iter(tokenizer.eos_token_ids))
    a, b = tokenizer.encode("ab", add_special_tokens=False)

    async def scenario() -> None:
        pipe = ScriptedPipeline([a, b, eos, a])
        state = ApiState("m", tokenizer, pipe)  # type: ignore[arg-type]
        async with app_client(state) as c:
            r = await c.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 9})
        body = r.json()
        assert body["choices"][0]["text"] == "ab"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 2

    asyncio.run(scenario())


def test_api_key_is_required_when_set(tokenizer: Any) -> None:
    async def scenario() -> None:
        state = ApiState("m", tokenizer, None, api_key="sesame")
        async with app_client(state) as c:
            assert (await c.get("/v1/models")).status_code == 401
            bad = await c.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
            ok = await c.get("/v1/models", headers={"Authorization": "Bearer sesame"})
            assert ok.status_code == 200

    asyncio.run(scenario())


def test_health_and_models_follow_readiness(tokenizer: Any) -> None:
    """GET /health: 503 naming the phase while loading, 200 once serving, 503 once the model
    can no longer be served; /v1/models lists the model only while it can be served."""

    async def scenario() -> None:
        state = ApiState("m", tokenizer, None, phase="loading stages", api_key="k")
        key = {"Authorization": "Bearer k"}
        async with app_client(state) as c:
            h = await c.get("/health")  # no key needed
            assert h.status_code == 503
            assert h.json()["phase"] == "loading stages" and h.json()["status"] == "unavailable"
            assert (await c.get("/v1/models", headers=key)).json()["data"] == []
            pipe = ScriptedPipeline([65])
            state.pipeline = pipe  # type: ignore[assignment]
            h = await c.get("/health")
            assert h.status_code == 200 and h.json() == {"status": "ok", "phase": "serving", "model": "m"}
            assert [m["id"] for m in (await c.get("/v1/models", headers=key)).json()["data"]] == ["m"]
            pipe.failed = "stage 1 on b lost its next hop"
            h = await c.get("/health")
            assert h.status_code == 503 and h.json()["phase"] == "failed"
            assert "lost its next hop" in h.json()["reason"]
            assert (await c.get("/v1/models", headers=key)).json()["data"] == []

    asyncio.run(scenario())


def test_up_is_ready_only_once_loaded(local_cluster: Any, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`coordinator up`, in-process, with the stages' load held at a gate: meanwhile /health
    answers 503 naming the phase, /v1/models lists nothing and completions get 503; once the
    gate opens, /health turns 200, the model is listed and answers."""
    import socket

    from coordinator.commands.up import serve
    from coordinator.main import build_parser
    from coordinator.pipeline import Pipeline

    reached, gate = asyncio.Event(), asyncio.Event()
    real_load = Pipeline.load

    async def gated_load(self: Pipeline, *args: Any, **kw: Any) -> None:
        reached.set()
        await gate.wait()
        await real_load(self, *args, **kw)

    monkeypatch.setattr(Pipeline, "load", gated_load)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Two of the session's nodes: a plan of its own, apart from the module's coordinator.
    argv = ["up", "--model", str(tiny_llama), "--port", str(port), "--placement", "even", "--check-tokens", "0"]
    for n in local_cluster.nodes[:2]:
        argv += ["--node", n.address]
    args = build_parser().parse_args(argv)
    body = {"model": tiny_llama.name, "prompt": "hi", "max_tokens": 2, "temperature": 0}

    async def scenario() -> None:
        up = asyncio.create_task(serve(args))
        waiting = asyncio.create_task(reached.wait())
        await asyncio.wait({up, waiting}, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        assert reached.is_set(), f"the load never started: {up.exception() if up.done() else 'timeout'}"
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
                h = await c.get("/health")
                assert h.status_code == 503 and h.json()["phase"] == "loading stages", h.text
                assert (await c.get("/v1/models")).json()["data"] == []
                assert (await c.post("/v1/completions", json=body)).status_code == 503
                gate.set()
                async with asyncio.timeout(120):  # a deadline against a hang, not a timing
                    while (h := await c.get("/health")).status_code != 200:
                        assert h.status_code == 503 and not up.done(), h.text
                        await asyncio.sleep(0.05)
                assert h.json()["phase"] == "serving"
                assert [m["id"] for m in (await c.get("/v1/models")).json()["data"]] == [tiny_llama.name]
                r = await c.post("/v1/completions", json=body)
                assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        finally:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)

    asyncio.run(scenario())


def test_metrics_text_format(tokenizer: Any) -> None:
    m = ServingMetrics()
    t = m.start("r1", "chat")
    t.admit(5)
    for _ in range(3):
        t.token()
    t.finish("length")
    text = m.render()
    lines = text.splitlines()
    for line in lines:
        if line.startswith("#"):
            assert line.startswith(("# HELP layerlink_", "# TYPE layerlink_"))
        else:
            name, value = line.rsplit(" ", 1)
            float(value.replace("+Inf", "inf"))
            assert name.startswith("layerlink_")
    assert 'layerlink_requests_total{endpoint="chat",finish_reason="length"} 1' in lines
    assert "layerlink_completion_tokens_total 3" in lines
    assert "layerlink_token_latency_seconds_count 2" in lines
    assert "layerlink_time_to_first_token_seconds_count 1" in lines
    assert 'layerlink_token_latency_seconds_bucket{le="+Inf"} 2' in lines
    assert m.in_flight == 0 and m.queued == 0


# ----- the official client against the real coordinator -------------------------------------


def test_models(client: openai.OpenAI, tiny_llama: Path) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_llama.name]


def test_chat_nonstreaming_and_streaming_agree(
    client: openai.OpenAI, tiny_llama: Path, tokenizer: Any
) -> None:
    messages: Any = [{"role": "user", "content": "Tell me about pipelines."}]
    whole = client.chat.completions.create(
        model=tiny_llama.name, messages=messages, max_tokens=24, temperature=0
    )
    choice = whole.choices[0]
    assert choice.finish_reason == "length"
    assert whole.usage is not None
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert whole.usage.prompt_tokens == len(prompt_ids)
    assert whole.usage.completion_tokens == 24
    assert whole.usage.total_tokens == len(prompt_ids) + 24

    stream = client.chat.completions.create(
        model=tiny_llama.name,
        messages=messages,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_usage_matches_the_tokenizer(
    client: openai.OpenAI, tiny_llama: Path, tokenizer: Any
) -> None:
    prompt = "The machines in the lab"
    r = client.completions.create(
        model=tiny_llama.name, prompt=prompt, max_tokens=10, temperature=0
    )
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 10
    assert r.choices[0].finish_reason == "length"
    streamed = client.completions.create(
        model=tiny_llama.name, prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    # Token ids are a prompt too.
    ids = list(tokenizer.encode(prompt))
    r2 = client.completions.create(model=tiny_llama.name, prompt=ids, max_tokens=10, temperature=0)
    assert r2.choices[0].text == r.choices[0].text


def test_stop_strings_cut_exactly_and_never_leak(client: openai.OpenAI, tiny_llama: Path) -> None:
    prompt = "Stop words are"
    kw: Any = {"model": tiny_llama.name, "prompt": prompt, "max_tokens": 40, "temperature": 0}
    pieces = [c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices]
    pieces = [p for p in pieces if p]
    full = "".join(pieces)
    # A stop string that straddles two streamed pieces, somewhere in the middle.
    cut_at = None
    for i in range(2, len(pieces) - 1):
        if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2:
            cut_at = i
            break
    assert cut_at is not None, f"no two long pieces in a row: {pieces}"
    stop = pieces[cut_at][-2:] + pieces[cut_at + 1][:2]
    expected = full[: full.index(stop)]

    r = client.completions.create(**kw, stop=[stop, "\x00never"])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens < 40

    chunks = list(client.completions.create(**kw, stop=stop, stream=True))
    streamed = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(streamed) == expected
    assert all(stop not in s for s in streamed)
    assert chunks[-1].choices[0].finish_reason == "stop"

    chat = client.chat.completions.create(
        model=tiny_llama.name,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=30,
        temperature=0,
    )
    content = chat.choices[0].message.content or ""
    stop2 = content[8:11]
    chat_stopped = client.chat.completions.create(
        model=tiny_llama.name,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=30,
        temperature=0,
        stop=stop2,
    )
    assert chat_stopped.choices[0].message.content == content[: content.index(stop2)]
    assert chat_stopped.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI, tiny_llama: Path) -> None:
    kw: Any = {
        "model": tiny_llama.name,
        "prompt": "Random",
        "max_tokens": 16,
        "temperature": 1.0,
        "top_p": 0.9,
    }
    a = client.completions.create(**kw, seed=7).choices[0].text
    b = client.completions.create(**kw, seed=7).choices[0].text
    c = client.completions.create(**kw, seed=8).choices[0].text
    greedy = client.completions.create(**{**kw, "temperature": 0}).choices[0].text
    assert a == b
    assert len({a, c, greedy}) > 1


def test_client_errors(client: openai.OpenAI, tiny_llama: Path) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as br:
        client.completions.create(model=tiny_llama.name, prompt="x", max_tokens=2, n=2)
    assert "n=1" in str(br.value)
    with pytest.raises(openai.BadRequestError) as ctx:
        client.completions.create(model=tiny_llama.name, prompt="x", max_tokens=100_000)
    assert ctx.value.code == "context_length_exceeded"


def test_chat_command_streams_an_answer(
    server: CoordinatorProcess, client: openai.OpenAI, tiny_llama: Path
) -> None:
    expected = client.chat.completions.create(
        model=tiny_llama.name,
        messages=[{"role": "user", "content": "hi there"}],
        max_tokens=12,
        temperature=0,
    )
    second = client.chat.completions.create(
        model=tiny_llama.name,
        messages=[
            {"role": "user", "content": "hi there"},
            {"role": "assistant", "content": expected.choices[0].message.content or ""},
            {"role": "user", "content": "and then?"},
        ],
        max_tokens=12,
        temperature=0,
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.main",
            "chat",
            "--url",
            server.url,
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        ],
        input="hi there\nand then?\n",
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "10000"},
    )
    assert out.returncode == 0, out.stderr
    assert expected.choices[0].message.content in out.stdout
    assert second.choices[0].message.content in out.stdout, "the conversation carries over"
    assert "12 tokens" in out.stderr


def test_chat_command_reports_an_unreachable_coordinator() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "coordinator.main", "chat", "--url", "http://127.0.0.1:9"],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "cannot reach the coordinator" in out.stderr


def test_speed_alert_when_three_times_slower_than_predicted() -> None:
    from types import SimpleNamespace

    from coordinator.dashboard.state import speed_alerts
    from coordinator.plan import Plan, Prediction, Stage

    plan = Plan(model="m", num_layers=2, stages=(Stage("a", "a", "h:1", 0, 2),),
                predicted=Prediction(decode_tps=90.0, ttft_s=0.1, throughput_tps=90.0))  # fmt: skip

    def rec(tps: float, n: int = 20) -> object:
        return SimpleNamespace(decode_tps=tps, completion_tokens=n)

    assert speed_alerts(plan, [rec(80.0), rec(85.0)]) == []
    assert speed_alerts(plan, [rec(29.0), rec(25.0), rec(28.0)])[0].startswith("decoding at 28.0")
    assert speed_alerts(plan, [rec(5.0, n=3)]) == []  # too short to time
    assert speed_alerts(None, [rec(1.0)]) == []
