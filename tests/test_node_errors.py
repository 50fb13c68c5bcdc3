"""Bad input gets the right gRPC status and a useful message; the node keeps serving."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from coordinator.nodeclient import NodeClient
from coordinator.pipeline import GenerationParams
from node._proto.layerlink.v1 import node_pb2 as pb
from tests.helpers import run_on_nodes


async def load_error(address: str, **kw: object) -> grpc.aio.AioRpcError:
    async with NodeClient(address) as c:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await c.load_stage(pb.LoadStageRequest(plan_id="bad", stage_count=1, **kw))  # type: ignore[arg-type]
        return ei.value


def test_load_errors(local_cluster, tiny_llama: Path) -> None:
    addr = local_cluster.nodes[0].address
    e = asyncio.run(load_error(addr, model_path=str(tiny_llama), start=4, end=12))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "outside the model's 8 layers" in e.details()
    e = asyncio.run(load_error(addr, model_path=str(tiny_llama), start=5, end=5))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    e = asyncio.run(load_error(addr, model_path="/nonexistent/model", start=0, end=1))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "does not exist" in e.details()
    e = asyncio.run(load_error(addr, model_path=str(tiny_llama.parent), start=0, end=1))
    assert e.code() == grpc.StatusCode.NOT_FOUND and "config.json" in e.details()


def test_corrupt_model_folders_are_refused_with_failed_precondition(local_cluster, tiny_llama: Path, tmp_path: Path) -> None:
    """A model folder broken on the node (corrupt config.json, a field of the wrong type, no
    or corrupt safetensors) is FAILED_PRECONDITION naming the file or field, not UNKNOWN;
    the node then loads a good folder."""
    import json
    import shutil

    config = json.loads((tiny_llama / "config.json").read_text())

    def broken(name: str, edit: Any) -> Path:
        d = tmp_path / name
        shutil.copytree(tiny_llama, d)
        edit(d)
        return d

    def truncate(d: Path) -> None:
        for f in d.glob("*.safetensors"):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    cases = [
        (broken("json", lambda d: (d / "config.json").write_text("{not json")), "config.json on this node is not valid JSON"),
        (broken("array", lambda d: (d / "config.json").write_text("[1, 2]")), "does not hold a JSON object"),
        (broken("field", lambda d: (d / "config.json").write_text(json.dumps({**config, "hidden_size": "big"}))),
         "hidden_size must be a positive whole number"),
        (broken("text", lambda d: (d / "config.json").write_text(json.dumps({**config, "text_config": 3}))),
         "text_config must be an object"),
        (broken("none", lambda d: [f.unlink() for f in d.glob("*.safetensors")]), "No safetensors found"),
        (broken("cut", truncate), "cannot load the model"),
    ]  # fmt: skip
    addr = local_cluster.nodes[0].address
    for path, message in cases:
        e = asyncio.run(load_error(addr, model_path=str(path), start=0, end=8))
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (path.name, e.code(), e.details())
        assert message in e.details(), (path.name, e.details())

    async def good() -> int:
        async with NodeClient(addr) as c:
            reply = await c.load_stage(pb.LoadStageRequest(plan_id="good", model_path=str(tiny_llama), start=0, end=8,
                                                           stage_count=1))  # fmt: skip
            await c.unload_stage("good")
            return reply.stage.end

    assert asyncio.run(good()) == 8


async def forward_replies(address: str, model: Path, messages: list[pb.ForwardRequest], last: bool) -> list[pb.ForwardReply]:
    async with NodeClient(address) as c:
        await c.load_stage(pb.LoadStageRequest(
            plan_id="err", model_path=str(model), start=4 if not last else 4, end=8,
            next_address="", stage_index=1, stage_count=2,
        ))
        queue: asyncio.Queue[pb.ForwardRequest | None] = asyncio.Queue()
        for m in messages:
            queue.put_nowait(m)
        queue.put_nowait(None)

        async def gen():  # type: ignore[no-untyped-def]
            while (m := await queue.get()) is not None:
                yield m
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)

        replies = [r async for r in c.stub.Forward(gen())]
        await c.unload_stage("err")
        return replies


def hidden(shape: tuple[int, ...], dtype: str = "float32") -> pb.Tensor:
    arr = np.zeros(shape, dtype={"float32": np.float32, "float16": np.float16, "int32": np.int32}[dtype])
    return pb.Tensor(dtype=dtype, shape=list(shape), data=arr.tobytes())


def test_forward_errors_keep_the_stream_alive(local_cluster, tiny_llama: Path) -> None:
    addr = local_cluster.nodes[1].address
    ok = pb.ForwardRequest(request_id="good", plan_id="err", phase=pb.PHASE_PREFILL,
                           hidden=hidden((1, 3, 256)), sample=True, position=0)
    msgs = [
        pb.ForwardRequest(request_id="a", plan_id="err", phase=pb.PHASE_PREFILL, hidden=hidden((1, 3, 128)), position=0),
        pb.ForwardRequest(request_id="b", plan_id="err", phase=pb.PHASE_PREFILL, hidden=hidden((1, 3, 256), "int32"), position=0),
        pb.ForwardRequest(request_id="c", plan_id="err", phase=pb.PHASE_PREFILL,
                          hidden=pb.Tensor(dtype="float32", shape=[1, 3, 256], data=b"\0" * 10), position=0),
        pb.ForwardRequest(request_id="ghost", plan_id="err", phase=pb.PHASE_DECODE, hidden=hidden((1, 1, 256)), position=5),
        pb.ForwardRequest(request_id="d", plan_id="no-such-plan", phase=pb.PHASE_PREFILL, hidden=hidden((1, 1, 256))),
        ok,
    ]
    replies = asyncio.run(forward_replies(addr, tiny_llama, msgs, last=True))
    by_id = {r.request_id: r for r in replies}
    assert by_id["a"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "hidden size is 256" in by_id["a"].message
    # Activations of any float dtype are accepted (a mixed-dtype model promotes them); integers are not.
    assert by_id["b"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "int32" in by_id["b"].message
    assert by_id["c"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "10 bytes" in by_id["c"].message
    assert by_id["ghost"].code == grpc.StatusCode.NOT_FOUND.value[0] and "unknown request id" in by_id["ghost"].message
    assert by_id["d"].code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "not loaded" in by_id["d"].message
    assert "good" not in by_id, "the valid message on the same stream must be served"


def test_release_unknown_request(local_cluster, tiny_llama: Path) -> None:
    async def go() -> grpc.aio.AioRpcError:
        async with NodeClient(local_cluster.nodes[2].address) as c:
            await c.load_stage(pb.LoadStageRequest(plan_id="rel", model_path=str(tiny_llama), start=0, end=8, stage_count=1))
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.release("rel", "nobody")
            await c.unload_stage("rel")
            return ei.value

    e = asyncio.run(go())
    assert e.code() == grpc.StatusCode.NOT_FOUND


def test_node_still_serves_after_bad_input(local_cluster, tiny_llama: Path) -> None:
    (result,) = asyncio.run(run_on_nodes(local_cluster.nodes, tiny_llama, [[1, 2, 3]], GenerationParams(max_tokens=4)))
    assert len(result.tokens) == 4


def test_kv_caches_are_freed(local_cluster, tiny_llama: Path) -> None:
    async def go() -> list[int]:
        from coordinator.pipeline import Pipeline
        from coordinator.session import even_counts, fixed_plan, read_model

        model = read_model(tiny_llama)
        plan = fixed_plan(model, local_cluster.nodes, even_counts(8, 3))
        p = Pipeline(plan, str(model.path))
        await p.load()
        await p.open()
        try:
            async for ev in p.stream([1, 2, 3], GenerationParams(max_tokens=50)):
                if ev.step == 3:
                    break  # the client walks away mid-generation
            await asyncio.sleep(0.5)
            counts = []
            for s in plan.stages:
                info = await p.clients[s.address].get_info()
                counts += [st.active_requests for st in info.stages if st.plan_id == plan.plan_id]
            return counts
        finally:
            await p.close()

    assert asyncio.run(go()) == [0, 0, 0]


def test_idle_request_caches_expire(tiny_llama: Path, session_dir: Path) -> None:
    from coordinator.lab.localcluster import LocalCluster

    async def go(address: str) -> tuple[int, int]:
        async with NodeClient(address) as c:
            await c.load_stage(pb.LoadStageRequest(plan_id="idle", model_path=str(tiny_llama), start=0, end=8, stage_count=1))
            queue: asyncio.Queue[pb.ForwardRequest] = asyncio.Queue()
            queue.put_nowait(pb.ForwardRequest(request_id="left-behind", plan_id="idle", phase=pb.PHASE_PREFILL,
                                               tokens=[1, 2, 3], position=0))

            async def gen():  # type: ignore[no-untyped-def]
                yield await queue.get()
                await asyncio.sleep(3.0)

            call = c.stub.Forward(gen())
            live = 0
            for _ in range(40):
                info = await c.get_info()
                live = info.stages[0].active_requests
                if live:
                    break
                await asyncio.sleep(0.05)
            for _ in range(60):
                await asyncio.sleep(0.1)
                info = await c.get_info()
                if info.stages[0].active_requests == 0:
                    break
            call.cancel()
            return live, info.stages[0].active_requests

    with LocalCluster(1, "idle", log_dir=session_dir, name_prefix="idle", extra_args=["--idle-timeout", "1"]) as cl:
        live, after = asyncio.run(go(cl.nodes[0].address))
    assert live == 1
    assert after == 0


def test_idle_pipeline_survives_keepalive_pings(tiny_llama: Path, session_dir: Path) -> None:
    """Regression: servers refused the clients' keepalive pings (GOAWAY too_many_pings), so a
    pipeline idle for a few ping intervals hung on its next request."""
    import os

    from coordinator.lab.localcluster import LocalCluster

    fast_pings = {"LAYERLINK_GRPC_KEEPALIVE_MS": "500"}
    old = os.environ.get("LAYERLINK_GRPC_KEEPALIVE_MS")
    os.environ.update(fast_pings)  # the coordinator side of this test pings fast too
    try:
        import importlib

        import coordinator.nodeclient
        import node.service

        importlib.reload(node.service)
        importlib.reload(coordinator.nodeclient)

        async def go(nodes: list[object]) -> tuple[int, int]:
            from coordinator.pipeline import Pipeline
            from coordinator.session import even_counts, fixed_plan, read_model

            model = read_model(tiny_llama)
            p = Pipeline(fixed_plan(model, nodes, even_counts(8, 2)), str(model.path))
            await p.load()
            await p.open()
            try:
                first = await p.generate([1, 2, 3], GenerationParams(max_tokens=4, step_timeout_s=10))
                await asyncio.sleep(4.0)  # eight ping intervals with no traffic
                second = await p.generate([1, 2, 3], GenerationParams(max_tokens=4, step_timeout_s=10))
                return len(first.tokens), len(second.tokens)
            finally:
                await p.close()

        with LocalCluster(2, "keepalive", log_dir=session_dir, name_prefix="ka", env=fast_pings) as cl:
            assert asyncio.run(go(cl.nodes)) == (4, 4)
    finally:
        if old is None:
            os.environ.pop("LAYERLINK_GRPC_KEEPALIVE_MS", None)
        else:
            os.environ["LAYERLINK_GRPC_KEEPALIVE_MS"] = old
        importlib.reload(node.service)
        importlib.reload(coordinator.nodeclient)


def test_a_second_coordinator_cannot_take_over_a_plan_in_use(local_cluster, tiny_llama: Path) -> None:
    """Plan ids follow from model and placement: another coordinator process (another owner)
    asking for the same plan on the same nodes gets a clear refusal while the first is still
    connected, and the first keeps generating; once the first has gone, the plan is free."""
    from coordinator.pipeline import Pipeline, PipelineError
    from coordinator.session import even_counts, fixed_plan, read_model
    from tests.helpers import reference_generate

    model = read_model(tiny_llama)
    nodes = local_cluster.nodes[:2]
    plan = fixed_plan(model, nodes, even_counts(model.num_layers, 2))
    prompt = [1, 17, 42, 99, 7]
    want, _ = reference_generate(tiny_llama, prompt, 6)

    async def scenario() -> None:
        first = Pipeline(plan, str(model.path), owner="coordinator-a")
        await first.load()
        await first.open()
        try:
            second = Pipeline(plan, str(model.path), owner="coordinator-b")
            with pytest.raises(PipelineError, match="another coordinator that is still connected"):
                await second.load()
            await second.close()
            got = await first.generate(prompt, GenerationParams(max_tokens=6))
            assert list(got.tokens) == want
        finally:
            await first.close(unload=False)  # gone without unloading, as a crashed one
        third = Pipeline(plan, str(model.path), owner="coordinator-b")
        for attempt in range(50):  # until the nodes notice that its subscriptions ended
            try:
                await third.load()
                break
            except PipelineError:
                if attempt == 49:
                    raise
                await asyncio.sleep(0.1)
        await third.open()
        try:
            got = await third.generate(prompt, GenerationParams(max_tokens=6))
            assert list(got.tokens) == want
        finally:
            await third.close()

    asyncio.run(scenario())


def test_errors_only_subscription_gets_failures_but_no_tokens(local_cluster, tiny_llama: Path) -> None:
    """The coordinator's gRPC subscriptions ask for errors only (tokens come over the data
    path): a plain subscriber sees the token of a prefill, an errors-only one sees only the
    failure of a step for an unknown request."""
    addr = local_cluster.nodes[2].address

    async def run() -> tuple[list[pb.StageEvent], list[pb.StageEvent]]:
        async with NodeClient(addr) as c:
            await c.load_stage(pb.LoadStageRequest(plan_id="eo", model_path=str(tiny_llama), start=0,
                                                   end=8, stage_count=1))  # fmt: skip
            try:
                plain = c.stub.Subscribe(pb.SubscribeRequest(plan_id="eo"))
                errors = c.stub.Subscribe(pb.SubscribeRequest(plan_id="eo", errors_only=True))
                got: dict[str, list[pb.StageEvent]] = {"plain": [], "errors": []}

                async def drain(name: str, call: Any) -> None:
                    async for ev in call:
                        got[name].append(ev)

                tasks = [asyncio.create_task(drain("plain", plain)), asyncio.create_task(drain("errors", errors))]
                queue: asyncio.Queue[pb.ForwardRequest | None] = asyncio.Queue()

                async def requests():  # type: ignore[no-untyped-def]
                    while (m := await queue.get()) is not None:
                        yield m

                stream = c.stub.Forward(requests())
                deadline = asyncio.get_running_loop().time() + 60
                n = 0
                # Until both subscriptions are live a step may go unseen: repeat until each has
                # what it should (a token for the plain one, the failure for the other).
                while not (any(e.code == 0 for e in got["plain"]) and got["errors"]):
                    assert asyncio.get_running_loop().time() < deadline, got
                    n += 1
                    queue.put_nowait(pb.ForwardRequest(request_id=f"ok{n}", plan_id="eo", phase=pb.PHASE_PREFILL,
                                                       tokens=[1, 2, 3], sample=True))  # fmt: skip
                    queue.put_nowait(pb.ForwardRequest(request_id=f"ghost{n}", plan_id="eo", phase=pb.PHASE_DECODE,
                                                       tokens=[1], sample=True, position=9))  # fmt: skip
                    await asyncio.sleep(0.3)
                queue.put_nowait(None)
                stream.cancel()
                for t in tasks:
                    t.cancel()
                return got["plain"], got["errors"]
            finally:
                await c.unload_stage("eo")

    plain, errors = asyncio.run(run())
    assert any(e.code == 0 and e.token >= 0 for e in plain)
    assert errors and all(e.code != 0 for e in errors)


def test_a_plan_that_fails_part_way_leaves_no_stage_resident(local_cluster, tiny_llama: Path) -> None:
    """One node refuses its stage (the shipped weights it is told to load are not in its
    cache): the stages the other nodes did load are unloaded, and their memory returns."""
    from coordinator.pipeline import Pipeline, PipelineError
    from coordinator.session import even_counts, fixed_plan, read_model

    model = read_model(tiny_llama)
    plan = fixed_plan(model, local_cluster.nodes, even_counts(model.num_layers, 3))

    async def infos() -> list[pb.NodeInfo]:
        out = []
        for s in plan.stages:
            async with NodeClient(s.address) as c:
                out.append(await c.get_info())
        return out

    async def scenario() -> tuple[list[pb.NodeInfo], list[int], list[pb.NodeInfo]]:
        before = await infos()
        p = Pipeline(plan, str(model.path))
        p.weights_ids = {2: "0" * 64}  # the last node has no such weights
        loaded: list[int] = []
        try:
            with pytest.raises(PipelineError, match=r"stage 2 on .* failed to load"):
                await p.load(lambda i, reply: loaded.append(i))
        finally:
            await p.close()
        return before, loaded, await infos()

    before, loaded, after = asyncio.run(scenario())
    assert sorted(loaded) == [0, 1], "the other stages loaded before the plan was given up"
    for b, a in zip(before, after, strict=True):
        assert plan.plan_id not in [st.plan_id for st in a.stages], f"{a.name} still holds a stage"
        assert a.mlx_active_bytes <= b.mlx_active_bytes, f"{a.name}: memory was not returned"


def test_subscription_is_acknowledged_once_registered(local_cluster, tiny_llama: Path) -> None:
    """With `ack`, a Subscribe stream opens with an acknowledgement, and the first failure
    sent after it is delivered (no retry, no sleep); without `ack` no such event comes, and
    a plan that is not loaded is refused."""
    addr = local_cluster.nodes[2].address
    ghost = pb.ForwardRequest(request_id="ghost", plan_id="ack", phase=pb.PHASE_DECODE, tokens=[1],
                              sample=True, position=9)  # fmt: skip

    async def run() -> tuple[pb.StageEvent, pb.StageEvent, pb.StageEvent, grpc.aio.AioRpcError]:
        async with NodeClient(addr) as c:
            await c.load_stage(pb.LoadStageRequest(plan_id="ack", model_path=str(tiny_llama), start=0,
                                                   end=8, stage_count=1))  # fmt: skip
            try:
                acked = aiter(c.stub.Subscribe(pb.SubscribeRequest(plan_id="ack", errors_only=True, ack=True)))
                plain = aiter(c.stub.Subscribe(pb.SubscribeRequest(plan_id="ack", errors_only=True)))
                first = await asyncio.wait_for(anext(acked), 30)
                stream = c.stub.Forward(iter([ghost]))
                failure = await asyncio.wait_for(anext(acked), 30)
                # The plain subscriber registered before its stream's first event was asked
                # for only by luck; what it receives first is an event, never an ack.
                queue: asyncio.Queue[pb.ForwardRequest] = asyncio.Queue()

                async def repeat():  # type: ignore[no-untyped-def]
                    while True:
                        yield await queue.get()

                again = c.stub.Forward(repeat())
                plain_first = asyncio.ensure_future(anext(plain))
                while not plain_first.done():
                    queue.put_nowait(ghost)
                    await asyncio.wait({plain_first}, timeout=0.3)
                stream.cancel()
                again.cancel()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await anext(aiter(c.stub.Subscribe(pb.SubscribeRequest(plan_id="nope", ack=True))))
                return first, failure, plain_first.result(), refused.value
            finally:
                await c.unload_stage("ack")

    first, failure, plain_first, refused = asyncio.run(run())
    assert first.code == 0 and not first.request_id and first.message == "subscribed"
    assert failure.request_id == "ghost" and failure.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert plain_first.request_id == "ghost" and plain_first.code != 0
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_pipeline_open_waits_for_every_acknowledgement(local_cluster, tiny_llama: Path) -> None:
    """Pipeline.open subscribes with `ack`: a stage that is not loaded fails open() with a
    message naming it, and a loaded plan serves its first request at once."""
    from coordinator.pipeline import Pipeline, PipelineError
    from coordinator.session import even_counts, fixed_plan, read_model

    model = read_model(tiny_llama)
    plan = fixed_plan(model, local_cluster.nodes, even_counts(model.num_layers, 3))

    async def scenario() -> int:
        p = Pipeline(plan, str(model.path))
        try:
            with pytest.raises(PipelineError, match=r"stage \d on .* refused the subscription: .*not loaded"):
                await p.open()  # nothing loaded yet
        finally:
            await p.close()
        p = Pipeline(plan, str(model.path))
        await p.load()
        await p.open()
        try:
            return len((await p.generate([1, 2, 3], GenerationParams(max_tokens=3, step_timeout_s=60))).tokens)
        finally:
            await p.close()

    assert asyncio.run(scenario()) == 3
