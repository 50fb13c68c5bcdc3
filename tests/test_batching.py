"""Decode steps of several requests in one forward pass (ModelStage.step_batch) give what
each request gets alone: the same logits (to float rounding) and the same greedy tokens, at
different positions, on a first, a middle and a last stage; a bad item fails alone."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from node.stage import DecodeItem, ModelStage, Sampling, StageError, StageSpec

GREEDY = Sampling()
PROMPTS = [[3, 17, 5], [9] * 11, [40, 2, 8, 31, 7, 7, 1, 90], [5]]


def stage(model: Path, start: int, end: int, last: bool) -> ModelStage:
    return ModelStage(StageSpec("p", model, start, end, 0, 1, next_address="" if last else "x"))


def test_batched_decode_equals_one_request_at_a_time(tiny_llama: Path) -> None:
    """The whole model as one stage (first and last): 6 decode steps of 4 requests."""
    solo, batched = stage(tiny_llama, 0, 8, True), stage(tiny_llama, 0, 8, True)
    tokens: dict[str, int] = {}
    for i, p in enumerate(PROMPTS):
        a = solo.step(f"r{i}", 0, True, GREEDY, p, None, True, False)
        b = batched.step(f"r{i}", 0, True, GREEDY, p, None, True, False)
        assert a.token == b.token
        tokens[f"r{i}"] = a.token
    pos = {f"r{i}": len(p) for i, p in enumerate(PROMPTS)}
    for _ in range(6):
        items = [DecodeItem(r, pos[r], GREEDY, tokens[r], None, want_logits=True) for r in pos]
        together = batched.step_batch(items)
        for item, res in zip(items, together, strict=True):
            assert not isinstance(res, StageError), res
            alone = solo.step(item.request_id, item.position, False, GREEDY, [item.token], None,
                              True, True)  # fmt: skip
            assert res.token == alone.token
            assert res.logits is not None and alone.logits is not None
            np.testing.assert_allclose(np.array(res.logits), np.array(alone.logits), atol=1e-4)
            tokens[item.request_id] = res.token
            pos[item.request_id] += 1


def test_batched_hidden_states_of_a_middle_stage(tiny_llama: Path) -> None:
    solo, batched = stage(tiny_llama, 3, 6, False), stage(tiny_llama, 3, 6, False)
    mx.random.seed(0)
    for i, n in enumerate((4, 9, 1)):
        h = mx.random.normal((1, n, 256))
        solo.step(f"r{i}", 0, True, GREEDY, None, h, True, False)
        batched.step(f"r{i}", 0, True, GREEDY, None, h, True, False)
    xs = [mx.random.normal((1, 1, 256)) for _ in range(3)]
    items = [DecodeItem(f"r{i}", n, GREEDY, None, xs[i]) for i, n in enumerate((4, 9, 1))]
    for item, res in zip(items, batched.step_batch(items), strict=True):
        assert not isinstance(res, StageError) and res.hidden is not None
        alone = solo.step(item.request_id, item.position, False, GREEDY, None, item.hidden,
                          True, False)  # fmt: skip
        assert alone.hidden is not None
        np.testing.assert_allclose(np.array(res.hidden), np.array(alone.hidden), atol=1e-5)


def test_a_bad_item_fails_alone(tiny_llama: Path) -> None:
    s = stage(tiny_llama, 0, 8, True)
    for r in ("a", "b"):
        s.step(r, 0, True, GREEDY, [1, 2], None, True, False)
    items = [
        DecodeItem("a", 2, GREEDY, 5, None),
        DecodeItem("b", 7, GREEDY, 5, None),  # wrong position
        DecodeItem("nobody", 0, GREEDY, 5, None),  # unknown request
        DecodeItem("b", 2, GREEDY, 10**6, None),  # outside the vocabulary
    ]
    out = s.step_batch(items)
    assert not isinstance(out[0], StageError) and out[0].token >= 0
    assert isinstance(out[1], StageError) and "position" in str(out[1])
    assert isinstance(out[2], StageError) and "unknown request" in str(out[2])
    assert isinstance(out[3], StageError) and "vocabulary" in str(out[3])
    assert s.requests["a"].offset == 3 and s.requests["b"].offset == 2


@pytest.mark.parametrize("n", [1, 16])
def test_batch_sizes(tiny_llama: Path, n: int) -> None:
    s = stage(tiny_llama, 0, 8, True)
    for i in range(n):
        s.step(f"r{i}", 0, True, GREEDY, [i + 1] * (i + 1), None, True, False)
    out = s.step_batch([DecodeItem(f"r{i}", i + 1, GREEDY, 3, None) for i in range(n)])
    assert all(not isinstance(r, StageError) for r in out)


def test_a_failing_task_does_not_stop_the_compute_queue(tmp_path: Path) -> None:
    """Whatever one queued task raises, the node's compute queue goes on with the next
    (regression: an exception escaping the drain would leave the queue marked busy forever
    and the node would never compute again)."""
    import threading

    from node import hardware
    from node._proto.layerlink.v1 import node_pb2 as pb
    from node.service import NodeConfig, NodeService

    svc = NodeService(
        NodeConfig("id", "n", "127.0.0.1", 0, "c", cache_dir=tmp_path), hardware.probe()
    )
    ran = threading.Event()

    def boom() -> None:
        raise RuntimeError("a task that fails")

    broken_step = (pb.ForwardRequest(request_id="r", phase=pb.PHASE_DECODE), object(), print)
    try:
        svc._enqueue(boom)
        svc._enqueue(broken_step)  # type: ignore[arg-type]  # its stage is missing
        svc._enqueue(ran.set)
        assert ran.wait(10)
        ran.clear()
        svc._enqueue(ran.set)  # and the queue still takes new work afterwards
        assert ran.wait(10)
    finally:
        svc.weights.close()
        svc._compute.shutdown(wait=True)
