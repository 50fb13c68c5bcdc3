"""GGUF export: names, hyperparameters, tokenizer and the llama rope row order, read back."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import load_file

from coordinator.lab.gguf_export import export_gguf
from coordinator.lab.synth import PRESETS, synthesize

REPO = Path(__file__).resolve().parents[1]
TINY = PRESETS["tiny"]


def field(reader: gguf.GGUFReader, key: str) -> object:
    return reader.fields[key].contents()


def tensor(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    (t,) = [t for t in reader.tensors if t.name == name]
    return np.asarray(t.data)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {arch: synthesize(root / arch, arch=arch, seed=5) for arch in ("llama", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hyperparameters_and_tokenizer(models: dict[str, Path], tmp_path: Path, arch: str) -> None:
    out = export_gguf(models[arch], tmp_path / "m.gguf")
    r = gguf.GGUFReader(out)
    assert field(r, "general.architecture") == arch
    assert field(r, f"{arch}.block_count") == TINY.num_hidden_layers
    assert field(r, f"{arch}.embedding_length") == TINY.hidden_size
    assert field(r, f"{arch}.feed_forward_length") == TINY.intermediate_size
    assert field(r, f"{arch}.attention.head_count") == TINY.num_attention_heads
    assert field(r, f"{arch}.attention.head_count_kv") == TINY.num_key_value_heads
    assert field(r, f"{arch}.context_length") == 2048
    assert field(r, f"{arch}.rope.freq_base") == pytest.approx(TINY.rope_theta)
    assert field(r, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(TINY.rms_norm_eps)
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    spec = json.loads((models[arch] / "tokenizer.json").read_text())
    tokens = field(r, "tokenizer.ggml.tokens")
    assert isinstance(tokens, list) and len(tokens) == TINY.vocab_size
    for text, i in spec["model"]["vocab"].items():
        assert tokens[i] == text
    merges = field(r, "tokenizer.ggml.merges")
    assert isinstance(merges, list) and merges[0] == " ".join(spec["model"]["merges"][0])
    types = field(r, "tokenizer.ggml.token_type")
    assert isinstance(types, list)
    config = json.loads((models[arch] / "config.json").read_text())
    assert field(r, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]
    assert types[config["eos_token_id"]] == gguf.TokenType.CONTROL
    assert types[10] == gguf.TokenType.NORMAL
    names = {t.name for t in r.tensors}
    per_layer = 9 + (3 if arch == "qwen2" else 0)
    assert len(names) == 3 + per_layer * TINY.num_hidden_layers
    assert ("blk.0.attn_q.bias" in names) == (arch == "qwen2")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_rope_rows_permuted_for_llama_only(
    models: dict[str, Path], tmp_path: Path, arch: str
) -> None:
    out = export_gguf(models[arch], tmp_path / "m.gguf")
    r = gguf.GGUFReader(out)
    hf = load_file(str(models[arch] / "model.safetensors"))
    q_hf = hf["model.layers.3.self_attn.q_proj.weight"]
    k_hf = hf["model.layers.3.self_attn.k_proj.weight"]
    q = tensor(r, "blk.3.attn_q.weight")
    k = tensor(r, "blk.3.attn_k.weight")
    v = tensor(r, "blk.3.attn_v.weight")
    np.testing.assert_array_equal(v, hf["model.layers.3.self_attn.v_proj.weight"])
    if arch == "qwen2":
        np.testing.assert_array_equal(q, q_hf)
        np.testing.assert_array_equal(k, k_hf)
        return
    head_dim = TINY.hidden_size // TINY.num_attention_heads
    half = head_dim // 2
    # Head h, pair j: GGUF rows 2j and 2j+1 are HF rows j and j + half of that head.
    for heads, got, want in (
        (TINY.num_attention_heads, q, q_hf),
        (TINY.num_key_value_heads, k, k_hf),
    ):
        for h in (0, heads - 1):
            for j in (0, 5, half - 1):
                np.testing.assert_array_equal(got[h * head_dim + 2 * j], want[h * head_dim + j])
                np.testing.assert_array_equal(
                    got[h * head_dim + 2 * j + 1], want[h * head_dim + half + j]
                )
    assert not np.array_equal(q, q_hf)


def test_ftypes(models: dict[str, Path], tmp_path: Path) -> None:
    for ftype, want in (("f16", "F16"), ("q8_0", "Q8_0")):
        r = gguf.GGUFReader(export_gguf(models["llama"], tmp_path / f"{ftype}.gguf", ftype))
        kinds = {t.name: t.tensor_type.name for t in r.tensors}
        assert kinds["blk.0.attn_q.weight"] == want
        assert kinds["blk.0.attn_norm.weight"] == "F32"
        # 688 is not a multiple of q8_0's block of 32: that row length falls back to f16.
        assert kinds["blk.0.ffn_down.weight"] == "F16"


def test_quantized_mlx_model_is_dequantized(tmp_path: Path) -> None:
    import mlx.core as mx

    d = synthesize(tmp_path / "q4", seed=2, quant_bits=4)
    r = gguf.GGUFReader(export_gguf(d, tmp_path / "q4.gguf"))
    w = mx.load(str(d / "model.safetensors"))
    assert isinstance(w, dict)
    p = "model.layers.1.mlp.up_proj"
    want = mx.dequantize(
        w[f"{p}.weight"], w[f"{p}.scales"], w[f"{p}.biases"], group_size=64, bits=4
    )
    np.testing.assert_allclose(tensor(r, "blk.1.ffn_up.weight"), np.array(want), rtol=0, atol=0)


def test_cli(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator.main",
            "export-gguf",
            str(models["qwen2"]),
            str(out),
            "--ftype",
            "f16",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert field(gguf.GGUFReader(out), "general.file_type") == gguf.LlamaFileType.MOSTLY_F16


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp not installed")
@pytest.mark.parametrize("ftype", ["f16", "q8_0"])
def test_llama_cpp_loads_and_tokenizes_like_hf(
    models: dict[str, Path], tmp_path: Path, ftype: str
) -> None:
    code = (
        "import sys, llama_cpp\n"
        "m = llama_cpp.Llama(sys.argv[1], n_ctx=64, verbose=False)\n"
        "print(*m.tokenize(sys.argv[2].encode(), add_bos=True))\n"
    )
    out = export_gguf(models["llama"], tmp_path / f"{ftype}.gguf", ftype)
    text = "Mara measured 12 links, then wrote: tokens per second!"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(out), text], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from tokenizers import Tokenizer

    want = Tokenizer.from_file(str(models["llama"] / "tokenizer.json")).encode(text).ids
    assert [int(x) for x in proc.stdout.split()] == want
