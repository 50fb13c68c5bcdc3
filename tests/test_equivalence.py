"""An N-stage pipeline over real node processes computes exactly what the unsplit model does."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from coordinator.pipeline import GenerationParams
from tests.helpers import reference_generate, run_on_nodes, to_logprobs

PROMPT = [1, 17, 42, 99, 7, 300, 12, 5]
N_TOKENS = 48


@pytest.mark.parametrize(
    ("preset", "arch"),
    [("tiny", "llama"), ("small", "llama"), ("tiny", "qwen2"), ("small", "qwen2"),
     ("tiny", "qwen3"), ("tiny", "mistral")],
)  # fmt: skip
def test_pipeline_matches_single_process(model_factory, local_cluster, preset: str, arch: str) -> None:
    """Every model type node/architectures.py lists: 1, 2 and 3 stages equal mlx_lm."""
    path = model_factory(preset, arch)
    ref_tokens, ref_logprobs = reference_generate(path, PROMPT, N_TOKENS)
    assert len(set(ref_tokens)) >= 8, "the synthetic model should not repeat one token"
    params = GenerationParams(max_tokens=N_TOKENS, want_logits=True)
    for stages in (1, 2, 3):
        nodes = local_cluster.nodes[:stages]
        (result,) = asyncio.run(run_on_nodes(nodes, path, [PROMPT], params))
        assert list(result.tokens) == ref_tokens, f"{stages}-stage tokens differ from mlx_lm"
        assert len(result.logits) == N_TOKENS
        worst = max(float(np.abs(to_logprobs(a) - b).max()) for a, b in zip(result.logits, ref_logprobs, strict=True))
        assert worst < 1e-3, f"{stages}-stage log-probabilities differ by {worst}"


def test_uneven_split_matches(model_factory, local_cluster) -> None:
    path = model_factory("tiny", "llama")
    ref_tokens, _ = reference_generate(path, PROMPT, 16)
    (result,) = asyncio.run(run_on_nodes(local_cluster.nodes, path, [PROMPT],
                                         GenerationParams(max_tokens=16), counts=[1, 6, 1]))
    assert list(result.tokens) == ref_tokens


def test_concurrent_requests_do_not_mix(model_factory, local_cluster) -> None:
    path = model_factory("tiny", "llama")
    a = [3, 14, 15, 92, 65]
    b = [27, 18, 28, 18, 28, 45, 90]
    params = GenerationParams(max_tokens=24)
    alone_a, = asyncio.run(run_on_nodes(local_cluster.nodes, path, [a], params))
    alone_b, = asyncio.run(run_on_nodes(local_cluster.nodes, path, [b], params))
    assert alone_a.tokens != alone_b.tokens
    both = asyncio.run(run_on_nodes(local_cluster.nodes, path, [a, b], params))
    assert both[0].tokens == alone_a.tokens
    assert both[1].tokens == alone_b.tokens


def test_seeded_sampling_is_reproducible(model_factory, local_cluster) -> None:
    path = model_factory("tiny", "llama")
    params = GenerationParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=1234)
    r1, r2 = asyncio.run(run_on_nodes(local_cluster.nodes[:2], path, [PROMPT, PROMPT], params))
    assert r1.tokens == r2.tokens
    (r3,) = asyncio.run(run_on_nodes(local_cluster.nodes[:2], path, [PROMPT],
                                     GenerationParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=99)))
    assert r3.tokens != r1.tokens


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_quantized_model_over_two_stages(model_factory, local_cluster, bits: int) -> None:
    path = model_factory("tiny", "llama", quant_bits=bits)
    config = json.loads((path / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    ref_tokens, _ = reference_generate(path, PROMPT, 24)
    (result,) = asyncio.run(run_on_nodes(local_cluster.nodes[:2], path, [PROMPT], GenerationParams(max_tokens=24)))
    assert list(result.tokens) == ref_tokens


def test_supported_types_are_the_tested_ones() -> None:
    """A type added to the supported list needs its equivalence case above."""
    from node.architectures import SUPPORTED_MODEL_TYPES

    tested = {"llama", "qwen2", "qwen3", "mistral"}
    assert set(SUPPORTED_MODEL_TYPES) == tested


def test_float16_model_computes_in_float32_on_cpu_nodes(model_factory, local_cluster) -> None:
    """A float16 model on CPU nodes: each stage holds float32 (exact) and the pipeline equals
    mlx_lm on the same weights cast the same way (tests.helpers.reference_generate)."""
    path = model_factory("tiny", "llama", dtype="float16")
    ref_tokens, _ = reference_generate(path, PROMPT, 16)
    (result,) = asyncio.run(run_on_nodes(local_cluster.nodes, path, [PROMPT], GenerationParams(max_tokens=16)))
    assert list(result.tokens) == ref_tokens

    async def dtypes() -> list[str]:
        from coordinator.nodeclient import NodeClient

        out = []
        for n in local_cluster.nodes:
            async with NodeClient(n.address) as c:
                info = await c.get_info(timeout=10.0)
                out += [d.compute_dtype for d in info.devices]
        return out

    assert set(asyncio.run(dtypes())) == {"float32"}
