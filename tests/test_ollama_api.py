"""Ollama's API: the official `ollama` Python client against `coordinator up` run as a real
subprocess over the session's node processes (chat and generate, whole and streamed, options,
model listing, Ollama-shaped errors, cancellation), and the key check in-process."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from coordinator.api import ApiState, create_app
from coordinator.lab.localcluster import CoordinatorProcess
from coordinator.pipeline import GenerationParams, PipelineError, TokenEvent
from tests.test_api import ScriptedPipeline, server, tokenizer
from tests.test_api_stream import active_requests

__all__ = ["server", "tokenizer"]  # module-scoped fixtures shared with test_api

GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def client(server: CoordinatorProcess) -> ollama.Client:
    return ollama.Client(host=server.url)


@pytest.fixture(scope="module")
def oai(server: CoordinatorProcess) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    yield c
    c.close()


def chat_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def check_final(part: Any, reason: str, eval_count: int, prompt_tokens: int) -> None:
    assert part.done is True and part.done_reason == reason
    assert part.eval_count == eval_count and part.prompt_eval_count == prompt_tokens
    for name in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(part[name], int) and part[name] > 0, name
    assert part.total_duration >= part.prompt_eval_duration + part.eval_duration
    assert part.load_duration == 0


# ----- generation ----------------------------------------------------------------------------


def test_chat_whole_and_streamed_equal_the_openai_answer(
    client: ollama.Client, oai: openai.OpenAI, tiny_llama: Path, tokenizer: Any
) -> None:
    messages = chat_messages("Tell me about pipelines.")
    prompt_tokens = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    opts = {**GREEDY, "num_predict": 24}
    whole = client.chat(model=tiny_llama.name, messages=messages, options=opts, stream=False)
    assert whole.model == tiny_llama.name and whole.created_at
    assert whole.message.role == "assistant" and whole.message.content
    check_final(whole, "length", 24, prompt_tokens)

    parts = list(client.chat(model=tiny_llama.name, messages=messages, options=opts, stream=True))
    assert len(parts) > 2
    assert all(p.done is False for p in parts[:-1]) and parts[-1].message.content == ""
    assert all(p.message.role == "assistant" for p in parts)
    check_final(parts[-1], "length", 24, prompt_tokens)
    assert "".join(p.message.content or "" for p in parts) == whole.message.content

    reference = oai.chat.completions.create(
        model=tiny_llama.name,
        messages=messages,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    assert reference.choices[0].message.content == whole.message.content


def test_generate_applies_the_chat_template_unless_raw(
    client: ollama.Client, oai: openai.OpenAI, tiny_llama: Path, tokenizer: Any
) -> None:
    prompt, system = "Why are the nodes slow?", "You answer in one line."
    opts = {**GREEDY, "num_predict": 16}
    templated = client.generate(model=tiny_llama.name, prompt=prompt, options=opts)
    chat = oai.chat.completions.create(
        model=tiny_llama.name,
        messages=chat_messages(prompt),
        max_tokens=16,
        temperature=0,  # type: ignore[arg-type]
    )
    assert templated.response == chat.choices[0].message.content
    check_final(templated, "length", 16, chat.usage.prompt_tokens if chat.usage else -1)
    streamed = list(
        client.generate(model=tiny_llama.name, prompt=prompt, options=opts, stream=True)
    )
    assert "".join(p.response or "" for p in streamed) == templated.response
    assert streamed[-1].done and streamed[-1].eval_count == 16

    with_system = client.generate(model=tiny_llama.name, prompt=prompt, system=system, options=opts)
    chat_system = oai.chat.completions.create(
        model=tiny_llama.name,
        messages=[{"role": "system", "content": system}, *chat_messages(prompt)],  # type: ignore[list-item]
        max_tokens=16,
        temperature=0,
    )
    assert with_system.response == chat_system.choices[0].message.content

    raw = client.generate(model=tiny_llama.name, prompt=prompt, raw=True, options=opts)
    completion = oai.completions.create(
        model=tiny_llama.name, prompt=prompt, max_tokens=16, temperature=0
    )
    assert raw.response == completion.choices[0].text
    assert raw.prompt_eval_count == len(tokenizer.encode(prompt))
    assert raw.response != templated.response, "raw must skip the chat template"


def test_num_predict_and_stop(client: ollama.Client, tiny_llama: Path) -> None:
    messages = chat_messages("hello")
    short = client.chat(
        model=tiny_llama.name, messages=messages, options={**GREEDY, "num_predict": 5}
    )
    assert short.eval_count == 5 and short.done_reason == "length"
    full = client.chat(
        model=tiny_llama.name, messages=messages, options={**GREEDY, "num_predict": 30}
    )
    content = full.message.content or ""
    stop = content[8:11]
    expected = content[: content.index(stop)]
    opts = {**GREEDY, "num_predict": 30, "stop": [stop, "\x00never"]}
    cut = client.chat(model=tiny_llama.name, messages=messages, options=opts)
    assert cut.message.content == expected
    assert cut.done_reason == "stop" and (cut.eval_count or 0) < 30
    parts = list(client.chat(model=tiny_llama.name, messages=messages, options=opts, stream=True))
    texts = [p.message.content or "" for p in parts]
    assert "".join(texts) == expected and all(stop not in t for t in texts)
    assert parts[-1].done_reason == "stop"
    assert short.message.content == (full.message.content or "")[: len(short.message.content or "")]


def test_seed_makes_sampling_reproducible(client: ollama.Client, tiny_llama: Path) -> None:
    def run(**opts: Any) -> str:
        opts = {"num_predict": 16, "temperature": 1.0, "top_p": 0.9, **opts}
        return client.generate(
            model=tiny_llama.name, prompt="Random", raw=True, options=opts
        ).response

    a, b, c = run(seed=7), run(seed=7), run(seed=8)
    greedy = run(temperature=0)
    assert a == b
    assert len({a, c, greedy}) > 1


def test_an_empty_conversation_only_answers_that_the_model_is_loaded(
    client: ollama.Client, tiny_llama: Path
) -> None:
    r = client.chat(model=tiny_llama.name, messages=[])
    assert r.done and r.done_reason == "load" and r.message.content == ""
    g = client.generate(model=tiny_llama.name + ":latest")
    assert g.done and g.done_reason == "load" and g.response == ""


# ----- model listing -------------------------------------------------------------------------


def test_tags_show_ps_version(
    client: ollama.Client, server: CoordinatorProcess, tiny_llama: Path, tokenizer: Any
) -> None:
    config = json.loads((tiny_llama / "config.json").read_text())
    listed = client.list().models
    assert len(listed) == 1
    m = listed[0]
    assert m.model == f"{tiny_llama.name}:latest"
    assert m.size == sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
    assert re.fullmatch(r"[0-9a-f]{64}", m.digest or "")
    assert m.details is not None
    assert m.details.family == config["model_type"] and m.details.format == "safetensors"
    assert m.details.quantization_level == "F32"  # the synthetic model is stored in float32
    assert re.fullmatch(r"\d+\.\d[KMB]", m.details.parameter_size or "")

    shown = client.show(f"{tiny_llama.name}:latest")
    assert shown.template == tokenizer.chat_template
    assert shown.details == m.details
    info = shown.modelinfo or {}
    arch = config["model_type"]
    assert info["general.architecture"] == arch
    assert info[f"{arch}.block_count"] == config["num_hidden_layers"]
    assert info[f"{arch}.embedding_length"] == config["hidden_size"]
    assert info[f"{arch}.vocab_size"] == config["vocab_size"]
    assert shown.capabilities == ["completion"]
    assert "num_ctx" in (shown.parameters or "") and "TEMPLATE" in (shown.modelfile or "")

    ps = client.ps().models
    assert [p.model for p in ps] == [m.model] and ps[0].context_length == 2048
    assert ps[0].digest == m.digest and ps[0].size == m.size

    version = httpx.get(server.url + "/api/version").json()
    assert set(version) == {"version"} and re.fullmatch(r"\d+\.\d+\.\d+", version["version"])


# ----- errors --------------------------------------------------------------------------------


def ollama_shaped(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return str(body["error"])


def test_bad_requests_get_ollama_errors_and_the_server_keeps_serving(
    client: ollama.Client, server: CoordinatorProcess, tiny_llama: Path
) -> None:
    name = tiny_llama.name
    msgs = chat_messages("hi")
    with pytest.raises(ollama.ResponseError) as bad_type:
        client.chat(model=name, messages=msgs, options={"temperature": "hot"})
    assert bad_type.value.status_code == 400 and "options.temperature" in bad_type.value.error
    with pytest.raises(ollama.ResponseError) as streamed_bad:  # refused before the stream opens
        list(client.chat(model=name, messages=msgs, options={"num_predict": 1.5}, stream=True))
    assert streamed_bad.value.status_code == 400
    assert "options.num_predict" in streamed_bad.value.error
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="no-such-model", messages=msgs)
    assert unknown.value.status_code == 404
    assert unknown.value.error.startswith("model 'no-such-model' not found")
    with pytest.raises(ollama.ResponseError) as unknown_show:
        client.show("no-such-model")
    assert unknown_show.value.status_code == 404

    post = lambda path, body: httpx.post(server.url + path, json=body)  # noqa: E731
    assert ollama_shaped(post("/api/chat", {"model": name}), 400) == "messages is required"
    assert ollama_shaped(post("/api/chat", {"messages": msgs}), 400) == "model is required"
    assert "not valid JSON" in ollama_shaped(
        httpx.post(server.url + "/api/generate", content=b"{nope"), 400
    )
    cases: list[tuple[dict[str, Any], str]] = [
        ({"top_k": 40}, "options.top_k"),
        ({"repeat_penalty": 1.3}, "options.repeat_penalty"),
        ({"bogus": 1}, "options.bogus: not an Ollama option"),
        ({"num_predict": 100_000}, "options.num_predict"),
        ({"num_predict": 0}, "options.num_predict"),
        ({"top_p": 0}, "options.top_p"),
        ({"temperature": -1}, "options.temperature"),
        ({"seed": -5}, "options.seed"),
        ({"stop": [""]}, "options.stop"),
    ]
    for options, fragment in cases:
        body = {"model": name, "prompt": "x", "options": options, "stream": False}
        assert fragment in ollama_shaped(post("/api/generate", body), 400), options
    chat_cases: list[tuple[dict[str, Any], str]] = [
        ({"format": "json"}, "format"),
        ({"think": True}, "think"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ({"stream": "yes"}, "stream"),
    ]
    for extra, fragment in chat_cases:
        body = {"model": name, "messages": msgs, **extra}
        assert fragment in ollama_shaped(post("/api/chat", body), 400), extra
    assert "raw" in ollama_shaped(
        post("/api/generate", {"model": name, "prompt": "x", "raw": True, "system": "s"}), 400
    )
    assert "not supported" in ollama_shaped(post("/api/pull", {"model": name}), 404)
    assert "embeddings" in ollama_shaped(post("/api/embed", {"model": name, "input": "x"}), 404)
    assert "no such endpoint" in ollama_shaped(httpx.get(server.url + "/api/nothing"), 404)
    assert "takes POST" in ollama_shaped(httpx.get(server.url + "/api/chat"), 405)
    assert "takes GET" in ollama_shaped(post("/api/tags", {}), 405)
    assert httpx.get(server.url + "/api/state").json()["model"] == name  # the dashboard's

    still = client.chat(model=name, messages=msgs, options={**GREEDY, "num_predict": 3})
    assert still.done and still.eval_count == 3


def test_stream_disconnect_cancels_the_generation(
    server: CoordinatorProcess, tiny_llama: Path
) -> None:
    plan = httpx.get(server.url + "/api/state").json()["plan"]
    addresses = [s["address"] for s in plan["stages"]]
    idle = [0] * len(addresses)

    async def holding(expected: list[int]) -> bool:
        return await active_requests(addresses, plan["plan_id"]) == expected

    async def until(cond: Callable[[], Awaitable[bool]], what: str) -> None:
        try:
            async with asyncio.timeout(60):  # only stops a hang
                while not await cond():
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise AssertionError(f"{what}: not within 60 s") from None

    async def scenario() -> None:
        assert await active_requests(addresses, plan["plan_id"]) == idle
        body = {
            "model": tiny_llama.name,
            "messages": chat_messages("a long story"),
            "options": {"num_predict": 1500, "temperature": 0},
        }
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=60) as c,
            c.stream("POST", "/api/chat", json=body) as r,
        ):
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("application/x-ndjson")
            lines = r.aiter_lines()  # kept alive: dropping it would close the connection
            for _ in range(5):
                part = json.loads(await lines.__anext__())
                assert part["done"] is False and part["message"]["role"] == "assistant"
            await until(lambda: holding([1] * len(addresses)), "every stage holds the request")
        # Leaving the block closed the connection mid-generation.
        await until(lambda: holding(idle), "every stage freed the request's KV cache")
        metrics = httpx.get(server.url + "/metrics").text
        assert 'layerlink_requests_total{endpoint="ollama_chat",finish_reason="cancelled"} 1' in (
            metrics
        )
        recent = httpx.get(server.url + "/api/state").json()["recent"][0]
        assert recent["finish_reason"] == "cancelled" and recent["completion_tokens"] < 1500

    asyncio.run(scenario())


# ----- in-process: the API key and a cluster that is still starting -------------------------


def test_api_key_and_no_plan_in_process(tokenizer: Any) -> None:
    async def scenario() -> None:
        ids = list(tokenizer.encode("abc def ghi jkl", add_special_tokens=False))
        assert len(ids) > 3
        pipe = ScriptedPipeline(ids)
        state = ApiState("m", tokenizer, pipe, api_key="sesame")  # type: ignore[arg-type]
        transport = httpx.ASGITransport(app=create_app(state))
        anonymous = ollama.AsyncClient(host="http://t", transport=transport)
        with pytest.raises(ollama.ResponseError) as denied:
            await anonymous.chat(model="m", messages=chat_messages("x"))
        assert denied.value.status_code == 401 and "API key" in denied.value.error
        keyed = ollama.AsyncClient(
            host="http://t", transport=transport, headers={"Authorization": "Bearer sesame"}
        )
        r = await keyed.generate(model="m", prompt="x", raw=True, options={"num_predict": 3})
        assert (
            r.response == tokenizer.decode(ids[:3])
            and r.eval_count == 3
            and r.done_reason == "length"
        )
        assert [m.model for m in (await keyed.ps()).models] == ["m:latest"]
        # No model details without the model folder (in-process state): empty, not invented.
        tags = (await keyed.list()).models
        assert tags[0].model == "m:latest" and tags[0].size == 0
        state.pipeline = None
        assert (await keyed.ps()).models == []
        with pytest.raises(ollama.ResponseError) as starting:
            await keyed.chat(model="m", messages=chat_messages("x"))
        assert starting.value.status_code == 503 and "no plan" in starting.value.error
        version = await httpx.AsyncClient(transport=transport, base_url="http://t").get(
            "/api/version"
        )
        assert version.status_code == 200, "the version needs no key"

    asyncio.run(scenario())


def test_oversized_body_is_refused_in_ollama_shape(tokenizer: Any) -> None:
    async def scenario() -> None:
        state = ApiState("m", tokenizer, None)
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            big = b"x" * (9 << 20)
            assert "exceeds" in ollama_shaped(await c.post("/api/chat", content=big), 413)
            openai_big = await c.post("/v1/chat/completions", content=big)
            assert openai_big.json()["error"]["code"] == "request_too_large"

    asyncio.run(scenario())


class FailingPipeline(ScriptedPipeline):
    """Yields its tokens, then fails as a pipeline whose stage died."""

    async def stream(
        self, prompt: list[int], params: GenerationParams, request_id: str | None = None
    ) -> AsyncIterator[TokenEvent]:
        try:
            for i, t in enumerate(self.tokens):
                yield TokenEvent(token=t, step=i)
            raise PipelineError("stage 1 on node-b stopped answering")
        finally:
            self.released.append(request_id or "")


def test_a_failure_mid_stream_is_an_error_line(tokenizer: Any) -> None:
    async def scenario() -> None:
        ids = list(tokenizer.encode("abc def ghi jkl", add_special_tokens=False))
        pipe = FailingPipeline(ids)
        state = ApiState("m", tokenizer, pipe)  # type: ignore[arg-type]
        client = ollama.AsyncClient(
            host="http://t", transport=httpx.ASGITransport(create_app(state))
        )
        parts: list[str] = []
        with pytest.raises(ollama.ResponseError) as failed:
            async for part in await client.chat(
                model="m", messages=chat_messages("x"), stream=True, options={"num_predict": 20}
            ):
                parts.append(part.message.content or "")
        assert "stage 1 on node-b stopped answering" in failed.value.error
        assert "".join(parts) == tokenizer.decode(ids)[: len("".join(parts))] and parts
        with pytest.raises(ollama.ResponseError) as whole:
            await client.generate(model="m", prompt="x", raw=True, options={"num_predict": 20})
        assert whole.value.status_code == 503 and "stopped answering" in whole.value.error
        assert len(pipe.released) == 2 and state.admission.running == 0

    asyncio.run(scenario())
