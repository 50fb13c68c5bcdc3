"""Synthetic models: they load in mlx_lm and transformers, decode non-trivially, are deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler

from coordinator.lab.synth import EOS_TOKEN, PRESETS, synthesize

PROMPTS = ("The harbour town", "Hello, how are you today?", "Write a poem about the sea.")
REPO = Path(__file__).resolve().parents[1]


def greedy(model_dir: Path, prompt: str, n: int = 48) -> list[int]:
    model, tok = load(str(model_dir))
    ids = mx.array(tok.encode(prompt))
    steps = generate_step(ids, model, max_tokens=n, sampler=make_sampler(0.0))
    return [int(t) for (t, _logprobs), _ in zip(steps, range(n), strict=False)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_loads_and_decodes_many_distinct_tokens(tmp_path: Path, arch: str) -> None:
    d = synthesize(tmp_path / arch, preset="tiny", arch=arch, seed=0)
    config = json.loads((d / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["num_hidden_layers"] == PRESETS["tiny"].num_hidden_layers
    model, tok = load(str(d))
    assert len(model.layers) == 8
    eos_id = config["eos_token_id"]
    assert tok.eos_token_id == eos_id
    for prompt in PROMPTS:
        out = greedy(d, prompt)
        assert len(out) == 48
        assert len(set(out)) >= 8, f"{arch} {prompt!r}: {out}"
        assert eos_id not in out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_tokenizer_and_chat_template(tmp_path: Path, arch: str) -> None:
    from transformers import AutoTokenizer

    d = synthesize(tmp_path / arch, preset="tiny", arch=arch, seed=1)
    hf = AutoTokenizer.from_pretrained(str(d))
    assert len(hf) == PRESETS["tiny"].vocab_size
    assert hf.eos_token == EOS_TOKEN
    text = "Mara measured 12 links, then wrote: tokens per second!"
    ids = hf.encode(text)
    assert ids[0] == hf.bos_token_id
    assert hf.decode(ids, skip_special_tokens=True) == text
    chat = [{"role": "user", "content": "hi there"}]
    rendered = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>user: hi there\nassistant:"
    # mlx_lm's wrapper renders the same template to the same ids.
    _, mlx_tok = load(str(d))
    assert mlx_tok.apply_chat_template(chat, add_generation_prompt=True) == hf.encode(
        rendered, add_special_tokens=False
    )


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", seed=7)
    b = synthesize(tmp_path / "b", seed=7)
    c = synthesize(tmp_path / "c", seed=8)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.parametrize(("bits", "dtype"), [(4, "float32"), (8, "bfloat16")])
def test_quantized_model_loads_in_mlx_lm(tmp_path: Path, bits: int, dtype: str) -> None:
    d = synthesize(tmp_path / "q", preset="tiny", seed=0, dtype=dtype, quant_bits=bits)
    config = json.loads((d / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    assert config["quantization"]["group_size"] == 64
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "model.layers.0.self_attn.q_proj.scales" in keys
    assert "model.layers.0.self_attn.q_proj.biases" in keys
    out = greedy(d, PROMPTS[0], n=24)
    assert len(set(out)) >= 4


def test_cli_writes_model(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.main",
            "synth-model",
            str(out),
            "--arch",
            "qwen2",
            "--seed",
            "3",
            "--dtype",
            "float16",
            "--gguf",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["torch_dtype"] == "float16"
    assert (out / "tokenizer.json").is_file()
    import gguf

    reader = gguf.GGUFReader(out / "model.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
