"""Test helpers: drive a pipeline over real nodes, and the single-process reference."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from coordinator.pipeline import GenerationParams, GenerationResult, Pipeline
from coordinator.session import even_counts, fixed_plan, read_model


def reference_generate(model_path: Path, prompt: list[int], n: int,
                       stop_at: int | None = None) -> tuple[list[int], list[np.ndarray]]:  # fmt: skip
    """mlx_lm's own single-process greedy generation: tokens and log-probabilities, with the
    weights held in the dtype a node on this machine computes in (node/computedtype.py);
    `stop_at`: a token after which it stops (included)."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    from node.computedtype import cast_for_compute

    model, _ = load(str(model_path))
    cast_for_compute(model)
    tokens: list[int] = []
    logprobs: list[np.ndarray] = []
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1))
    for tok, lp in steps:
        tokens.append(int(tok))
        logprobs.append(np.array(lp.astype(mx.float32)))
        if tokens[-1] == stop_at:
            break
    return tokens, logprobs


async def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `cond` until it holds; the seconds it took. `timeout` is a generous deadline that
    only stops a test that would otherwise hang (an event that never comes), not a timing."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout:.0f} s") from None
    return time.monotonic() - t0


def to_logprobs(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return (x - (m + np.log(np.exp(x - m).sum()))).astype(np.float32)


async def run_on_nodes(nodes: list[Any], model_path: Path, prompts: list[list[int]], params: GenerationParams,
                       counts: list[int] | None = None) -> list[GenerationResult]:
    """Load the model over `nodes` (even split unless counts), run the prompts concurrently."""
    model = read_model(model_path)
    plan = fixed_plan(model, nodes, counts or even_counts(model.num_layers, len(nodes)))
    pipeline = Pipeline(plan, str(model.path))
    await pipeline.load()
    await pipeline.open()
    try:
        return list(await asyncio.gather(*(pipeline.generate(p, params) for p in prompts)))
    finally:
        await pipeline.close()
