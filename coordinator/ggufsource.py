"""GGUF files as a model source: the file llama.cpp, Ollama, LM Studio and Jan keep.

A GGUF is read once on the coordinator and written as an MLX model folder in
`$XDG_CACHE_HOME/layerlink/gguf/` (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, and `model.gguf`, a link back to the file for the llama.cpp
baseline). Everything after that — planning, shipping each node its stage's tensors, the
nodes' caches — works on that folder as on any other; nodes never need the GGUF.

What maps without loss: F32, F16 and BF16 tensors as they are; Q4_0, Q4_1 and Q8_0 blocks
repacked as MLX affine quantization with group 32 (each block of 32 values is an affine grid:
the codes, scales and offsets are the GGUF's own, offsets and scales in float16). K-quants
Q4_K (the bulk of a Q4_K_M file) is repacked too: each of its sub-blocks of 32 values is an
affine grid, so only its scale and offset products are rounded to float16. Q5_K, Q6_K, Q5_0
and Q5_1 (the rest of K-quant files) are dequantized by the gguf package and quantized again
as MLX 8-bit with group 32: a small error, which docs/weights.md reports. Anything else is refused before any node is
touched, with a message naming what is supported.

The tokenizer is built from the GGUF's own vocabulary: GPT-2-style byte-level BPE from its
merges, with the pre-tokenizer llama.cpp names in `tokenizer.ggml.pre`, or SentencePiece
BPE from its pieces and scores, split as llama.cpp's SPM tokenizer splits; with its special
tokens, end-of-turn ids and chat template: no download.

Trust boundary: the file is the user's, but may be truncated or corrupt; every field read is
checked, and any failure is a GGUFError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.architectures import HF_CLASSES

log = logging.getLogger(__name__)

# GGUF architecture -> the mlx_lm model type its tensors become.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
LOSSLESS_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0")
# Types that MLX's affine quantization (group 32) cannot hold exactly: dequantized by the gguf
# package and quantized again with these bits (Q4_K_M files mix in Q5_0/Q6_K; llama.cpp falls
# back to Q5_0/Q5_1 for rows that are not a multiple of 256).
REQUANT_BITS = {"Q5_K": 8, "Q6_K": 8, "Q5_0": 8, "Q5_1": 8}
# Repacked, not requantized: Q4_K's sub-blocks of 32 are affine grids (see _q4_k).
REPACKED_TYPES = ("Q4_K",)
SUPPORTED_TYPES = (*LOSSLESS_TYPES, *REPACKED_TYPES, *REQUANT_BITS)
GROUP_SIZE = 32
CONVERTER_VERSION = 4  # bump when the folder written for a GGUF would change

# llama.cpp's pre-tokenizer names -> the regex that splits text before byte-level BPE
# (None: GPT-2's own, which ByteLevel applies itself). `digits`: numbers split one digit each.
_GPT2 = None
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, tuple[str | None, bool]] = {
    "default": (_GPT2, False),
    "gpt-2": (_GPT2, False),
    "gpt2": (_GPT2, False),
    "mpt": (_GPT2, False),
    "olmo": (_GPT2, False),
    "smollm": (_GPT2, True),
    "starcoder": (_GPT2, True),
    "refact": (_GPT2, True),
    "llama-bpe": (_LLAMA3, False),
    "llama-v3": (_LLAMA3, False),
    "llama3": (_LLAMA3, False),
    "smaug-bpe": (_LLAMA3, False),
    "qwen2": (_QWEN2, False),
    "stablelm2": (_QWEN2, False),
}
# `tokenizer.ggml.model` values built here: byte-level BPE, and SentencePiece BPE (which
# llama.cpp calls "llama", its SPM tokenizer).
TOKENIZER_MODELS = ("gpt2", "llama")
# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"

# GGUF tensor name parts -> mlx_lm (Hugging Face) names.
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SUFFIXES = ("weight", "bias", "scales", "biases")


class GGUFError(RuntimeError):
    """A GGUF file LayerLink cannot serve; the message names the file and the reason."""


@dataclass(frozen=True)
class GGUFSummary:
    """What a GGUF holds, read from its header without loading tensor data."""

    path: Path
    architecture: str
    tensor_types: dict[str, int]  # GGML type name -> number of tensors
    file_type: str  # the most common quantized type, e.g. "Q4_1"
    # The open gguf.GGUFReader (a memory map; parsing the header takes seconds on a large
    # vocabulary, so convert() reuses it rather than reading the file again).
    reader: Any = field(default=None, repr=False, compare=False)


def cache_root() -> Path:
    from node.identity import cache_dir

    return cache_dir() / "gguf"


def is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def inspect_gguf(path: Path) -> GGUFSummary:
    """Check the file's header and tensor table; refuse what cannot be served exactly."""
    import gguf
    import numpy as np

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises ValueError, IndexError, ... on bad bytes
        raise GGUFError(
            f"{path} is not a readable GGUF file: truncated or corrupt ({type(e).__name__}: {e})"
        ) from None
    size = path.stat().st_size
    types: dict[str, int] = {}
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise GGUFError(
                f"{path} is truncated: tensor {t.name} ends at byte {end}, the file has {size}"
            )
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    if not reader.tensors:
        raise GGUFError(f"{path} holds no tensors")

    def string(key: str, default: str = "") -> str:
        f = reader.fields.get(key)
        if f is None or not f.data:
            return default
        raw = f.parts[f.data[0]]
        return bytes(np.asarray(raw, dtype=np.uint8)).decode("utf-8", "replace")

    arch = string("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{path}: architecture {arch or '(none)'!r} is not supported; LayerLink serves "
            f"GGUF architectures {', '.join(sorted(ARCHITECTURES))}"
        )
    bad = sorted(set(types) - set(SUPPORTED_TYPES))
    if bad:
        raise GGUFError(
            f"{path}: tensor type(s) {', '.join(bad)} are not supported; LayerLink reads "
            f"{', '.join(SUPPORTED_TYPES)}"
        )
    tok_model = string("tokenizer.ggml.model")
    if tok_model not in TOKENIZER_MODELS:
        raise GGUFError(
            f"{path}: tokenizer model {tok_model or '(none)'!r} is not supported; LayerLink "
            "builds byte-level BPE vocabularies ('gpt2': Llama 3, Qwen, SmolLM, Mistral Nemo) "
            "and SentencePiece BPE ones ('llama': Llama 2, Mistral 7B, TinyLlama), not "
            "WordPiece ('bert'), Unigram ('t5'), RWKV or others"
        )
    pre = string("tokenizer.ggml.pre", "default")
    if tok_model == "gpt2" and pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"{path}: pre-tokenizer {pre!r} is not supported; LayerLink knows "
            f"{', '.join(sorted(PRE_TOKENIZERS))}"
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(
            f"{path}: per-frequency RoPE factors (rope_freqs, Llama 3.1 and later) are not "
            "supported yet"
        )
    quantized = {k: v for k, v in types.items() if k not in ("F32", "F16", "BF16")}
    file_type = max(quantized, key=lambda k: quantized[k]) if quantized else max(types)
    return GGUFSummary(
        path=path,
        architecture=arch,
        tensor_types=types,
        file_type=file_type,
        reader=reader,
    )


def converted_folder(path: Path, *, root: Path | None = None) -> Path:
    """The MLX folder for GGUF `path`, converting it on first use (later calls reuse it
    while the file's size and modification time are unchanged)."""
    path = path.expanduser().resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise GGUFError(f"cannot read {path}: {e.strerror}") from None
    key = hashlib.sha256(
        f"{path}|{st.st_size}|{st.st_mtime_ns}|{CONVERTER_VERSION}".encode()
    ).hexdigest()[:16]
    root = root or cache_root()
    out = root / f"{_safe(path.stem)}-{key}"
    if (out / "config.json").is_file():
        return out  # converted before, from this very file
    summary = inspect_gguf(path)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        convert(summary, tmp)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").is_file():  # not another process's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s (%s) to %s", path.name, summary.file_type, out)
    return out


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:64] or "model"


def convert(summary: GGUFSummary, out: Path) -> None:
    """Write the MLX folder of a checked GGUF into `out`."""
    import mlx.core as mx

    reader = summary.reader
    try:
        meta: dict[str, Any] = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # the gguf package raises freely on bytes it cannot parse
        raise GGUFError(f"{summary.path}: cannot read its metadata ({e})") from None
    names = {t.name for t in reader.tensors}
    config = model_config(summary, meta, names)
    weights = dict(_mlx_weights(summary, reader, config))
    if config["tie_word_embeddings"] is False and "lm_head.weight" not in weights:
        raise GGUFError(f"{summary.path}: no output tensor and the embeddings are not tied")
    config["torch_dtype"] = _stored_dtype(weights)
    bits = _quantized_bits(weights)
    if bits:
        default = max(set(bits.values()), key=list(bits.values()).count)
        quant: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
        for module, b in sorted(bits.items()):
            if b != default:
                quant[module] = {"group_size": GROUP_SIZE, "bits": b}
        config["quantization"] = quant
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer, tok_config = build_tokenizer(summary, meta)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (out / "layerlink-source.json").write_text(
        json.dumps(
            {"gguf": str(summary.path), "types": summary.tensor_types,
             "converter": CONVERTER_VERSION},
            indent=2,
        )
    )  # fmt: skip
    os.symlink(summary.path, out / "model.gguf")


def _meta_int(meta: Mapping[str, Any], key: str, default: int | None = None) -> int:
    v = meta.get(key)
    if v is None:
        if default is None:
            raise GGUFError(f"the GGUF metadata lacks {key}")
        return default
    try:
        return int(v)
    except (TypeError, ValueError):
        raise GGUFError(f"the GGUF metadata's {key} is not a number") from None


def _meta_float(meta: Mapping[str, Any], key: str, default: float) -> float:
    v = meta.get(key)
    if v is None:
        return default
    try:
        return float(v)
    except (TypeError, ValueError):
        raise GGUFError(f"the GGUF metadata's {key} is not a number") from None


def model_config(
    summary: GGUFSummary, meta: Mapping[str, Any], tensor_names: set[str]
) -> dict[str, Any]:
    """config.json for mlx_lm from the GGUF's `<arch>.*` metadata."""
    a = summary.architecture
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(f"{summary.path}: the GGUF has no tokenizer vocabulary")
    heads = _meta_int(meta, f"{a}.attention.head_count")
    hidden = _meta_int(meta, f"{a}.embedding_length")
    head_dim = _meta_int(meta, f"{a}.attention.key_length", hidden // max(heads, 1))
    rope_dims = _meta_int(meta, f"{a}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GGUFError(
            f"{summary.path}: partial rotary embeddings ({rope_dims} of {head_dim} dims) are "
            "not supported"
        )
    scaling = meta.get(f"{a}.rope.scaling.type")
    rope_scaling: dict[str, Any] | None = None
    if isinstance(scaling, str) and scaling not in ("none", ""):
        if scaling != "linear":
            raise GGUFError(f"{summary.path}: RoPE scaling {scaling!r} is not supported")
        rope_scaling = {
            "type": "linear",
            "factor": _meta_float(meta, f"{a}.rope.scaling.factor", 1.0),
        }
    bos = _meta_int(meta, "tokenizer.ggml.bos_token_id", -1)
    config: dict[str, Any] = {
        "model_type": ARCHITECTURES[a],
        "architectures": [HF_CLASSES[ARCHITECTURES[a]]],
        "hidden_size": hidden,
        "num_hidden_layers": _meta_int(meta, f"{a}.block_count"),
        "intermediate_size": _meta_int(meta, f"{a}.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta_int(meta, f"{a}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _meta_float(meta, f"{a}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": _meta_float(meta, f"{a}.rope.freq_base", 10000.0),
        "max_position_embeddings": _meta_int(meta, f"{a}.context_length", 4096),
        "vocab_size": len(tokens),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "eos_token_id": end_of_turn_ids(meta),
    }
    if bos >= 0:
        config["bos_token_id"] = bos
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def end_of_turn_ids(meta: Mapping[str, Any]) -> list[int]:
    """eos, end-of-turn and end-of-generation ids the GGUF names (llama.cpp stops on all)."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id"):  # fmt: skip
        v = _meta_int(meta, key, -1)
        if v >= 0 and v not in ids:
            ids.append(v)
    return ids


def _mlx_weights(
    summary: GGUFSummary, reader: Any, config: Mapping[str, Any]
) -> Iterator[tuple[str, Any]]:
    """(mlx_lm name, array) for every tensor: renamed, q/k rows restored for llama, legacy
    quants repacked exactly, K-quants requantized."""
    for t in reader.tensors:
        hf = hf_name(t.name)
        if hf is None:
            raise GGUFError(
                f"{summary.path}: tensor {t.name} has no place in a {summary.architecture} model"
            )
        parts = tensor_parts(t)
        if summary.architecture == "llama":
            parts = _unpermute_qk(t.name, parts, config)
        stem = hf.rsplit(".", 1)[0]
        for suffix, value in parts.items():
            yield f"{stem}.{suffix}", value


def tensor_parts(t: Any) -> dict[str, Any]:
    """One GGUF tensor (a gguf.ReaderTensor) as MLX arrays: {"weight"} (or {"bias"}) for
    float types; {"weight", "scales", "biases"} (affine, group 32) for quantized ones."""
    import gguf
    import mlx.core as mx
    import numpy as np

    kind = t.tensor_type.name
    data = np.asarray(t.data)
    key = "bias" if t.name.endswith(".bias") else "weight"
    if kind == "F32":
        return {key: mx.array(data.astype(np.float32, copy=False))}
    if kind == "F16":
        return {key: mx.array(data.astype(np.float16, copy=False))}
    if kind == "BF16":
        return {key: mx.array(data.view(np.uint16)).view(mx.bfloat16)}
    if kind in LEGACY_BLOCKS:
        return _legacy_quant(data, kind)
    if kind == "Q4_K":
        return _q4_k(data)
    if kind in REQUANT_BITS:
        values = gguf.quants.dequantize(t.data, t.tensor_type)  # (rows, cols) float32
        dense = mx.array(np.ascontiguousarray(values, dtype=np.float32))
        w, scales, biases = mx.quantize(dense, group_size=GROUP_SIZE, bits=REQUANT_BITS[kind])
        return {
            "weight": w,
            "scales": scales.astype(mx.float16),
            "biases": biases.astype(mx.float16),
        }
    raise GGUFError(f"tensor {t.name}: type {kind} is not supported")


# Legacy GGML blocks of 32 values: (block bytes, MLX bits). Each block is an affine grid,
# so it maps to one MLX group exactly: Q4_0 x = d*(q-8), Q4_1 x = d*q + m, Q8_0 x = d*q.
LEGACY_BLOCKS = {"Q4_0": (18, 4), "Q4_1": (20, 4), "Q8_0": (34, 8)}


def _pack(codes: Any, bits: int) -> Any:
    """(rows, cols) codes -> MLX's packing: uint32 words, element k of a word at bits k*bits."""
    import numpy as np

    rows = codes.shape[0]
    per_word = 32 // bits
    words = codes.astype(np.uint32).reshape(rows, -1, per_word)
    words = words << (np.arange(per_word, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(words, axis=-1).astype(np.uint32)


def _q4_k(data: Any) -> dict[str, Any]:
    """Q4_K super-blocks (256 values: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins,
    128 bytes of 4-bit codes) as MLX 4-bit groups of 32. Sub-block j is the grid
    x = (d * sc_j) * q - (dmin * m_j): scale d*sc_j, bias -dmin*m_j, the codes as stored. The
    only change is rounding those two products to float16."""
    import mlx.core as mx
    import numpy as np

    rows = data.shape[0]
    b = data.reshape(rows, -1, 144)  # (rows, super-blocks, bytes)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    q = b[..., 4:16].astype(np.uint16)  # 12 bytes of packed scales/mins
    sc = np.empty((*q.shape[:2], 8), dtype=np.float32)
    mn = np.empty_like(sc)
    sc[..., :4] = q[..., 0:4] & 63
    mn[..., :4] = q[..., 4:8] & 63
    sc[..., 4:] = (q[..., 8:12] & 0x0F) | ((q[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (q[..., 8:12] >> 4) | ((q[..., 4:8] >> 6) << 4)
    qs = b[..., 16:].reshape(rows, -1, 4, 32)  # 4 chunks of 64 values, 32 bytes each
    codes = np.stack([qs & 0x0F, qs >> 4], axis=3)  # (rows, sb, 4, 2, 32): sub-block 2c, 2c+1
    scales = (d[..., None] * sc).astype(np.float16).reshape(rows, -1)
    biases = (-(dmin[..., None] * mn)).astype(np.float16).reshape(rows, -1)
    return {
        "weight": mx.array(_pack(codes.reshape(rows, -1), 4)),
        "scales": mx.array(scales),
        "biases": mx.array(biases),
    }


def _legacy_quant(data: Any, kind: str) -> dict[str, Any]:
    """Q4_0 / Q4_1 / Q8_0 blocks repacked as MLX affine (weight, scales, biases), exactly."""
    import mlx.core as mx
    import numpy as np

    size, bits = LEGACY_BLOCKS[kind]
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, size)  # (rows, groups, block bytes)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]  # (rows, groups)
    if kind == "Q8_0":
        codes = blocks[..., 2:].view(np.int8).astype(np.int16) + 128  # 0..255
        bias = d * np.float16(-128)
    else:
        packed = blocks[..., 4:] if kind == "Q4_1" else blocks[..., 2:]  # 16 bytes
        codes = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # elements 0-15, 16-31
        bias = (
            blocks[..., 2:4].copy().view(np.float16)[..., 0]
            if kind == "Q4_1"
            else d * np.float16(-8)
        )
    return {
        "weight": mx.array(_pack(codes.reshape(rows, -1), bits)),
        "scales": mx.array(d.astype(np.float16)),
        "biases": mx.array(bias.astype(np.float16)),
    }


def hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    suffix = parts[-1]
    if suffix not in _SUFFIXES:
        return None
    if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"model.layers.{int(parts[1])}.{_BLOCK[parts[2]]}.{suffix}"
    if len(parts) == 2 and parts[0] in _TOP:
        return f"{_TOP[parts[0]]}.{suffix}"
    return None


def _unpermute_qk(name: str, parts: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """llama.cpp's converter reorders the rows of q and k per head for its RoPE layout
    (pairs interleaved); put them back in Hugging Face's order (halves)."""
    if name.endswith("attn_q.weight") or name.endswith("attn_q.bias"):
        heads = int(config["num_attention_heads"])
    elif name.endswith("attn_k.weight") or name.endswith("attn_k.bias"):
        heads = int(config["num_key_value_heads"])
    else:
        return parts
    out = {}
    for key, a in parts.items():
        rows = a.shape[0]
        rest = list(a.shape[1:])
        out[key] = (
            a.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)
        )
    return out


def _stored_dtype(weights: Mapping[str, Any]) -> str:
    """The float dtype most matrix bytes are in (quantized layers count by their scales)."""
    import mlx.core as mx

    names = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
    by_bytes: dict[str, int] = {}
    for w in weights.values():
        if w.ndim == 2 and w.dtype in names:
            key = names[w.dtype]
            by_bytes[key] = by_bytes.get(key, 0) + int(w.nbytes)
    return max(by_bytes, key=lambda k: by_bytes[k]) if by_bytes else "float32"


def _quantized_bits(weights: Mapping[str, Any]) -> dict[str, int]:
    """module path -> bits, for every quantized module (bits from the packed width)."""
    out = {}
    for name, w in weights.items():
        if not name.endswith(".scales"):
            continue
        module = name[: -len(".scales")]
        packed = weights[f"{module}.weight"]
        in_features = int(w.shape[-1]) * GROUP_SIZE
        out[module] = int(packed.shape[-1]) * 32 // in_features
    return out


def build_tokenizer(summary: GGUFSummary, meta: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(tokenizers.Tokenizer, tokenizer_config.json) from the GGUF's vocabulary."""
    if meta.get("tokenizer.ggml.model") == "llama":
        return build_spm_tokenizer(summary, meta)
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges_raw = meta.get("tokenizer.ggml.merges")
    if not isinstance(merges_raw, list) or not merges_raw:
        raise GGUFError(f"{summary.path}: the GGUF's BPE vocabulary has no merges")
    merges = []
    for m in merges_raw:
        left, sep, right = str(m).partition(" ")
        if not sep:
            raise GGUFError(f"{summary.path}: malformed BPE merge {m!r}")
        merges.append((left, right))
    types = _token_types(summary, meta, len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    regex, digits = PRE_TOKENIZERS[_pre_name(meta)]
    steps: list[Any] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if regex is not None:
        steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex is None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    special = [
        AddedToken(t, special=ty == TOKEN_CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    tok.add_tokens(special)

    def token_at(key: str) -> str | None:
        i = _meta_int(meta, key, -1)
        return tokens[i] if 0 <= i < len(tokens) else None

    add_bos = (
        bool(meta["tokenizer.ggml.add_bos_token"])
        if "tokenizer.ggml.add_bos_token" in meta
        else False
    )
    bos = token_at("tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    eos_ids = end_of_turn_ids(meta)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": _meta_int(meta, f"{summary.architecture}.context_length", 4096),
        "bos_token": bos,
        "eos_token": tokens[eos_ids[0]] if eos_ids and eos_ids[0] < len(tokens) else None,
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return tok, config


def _pre_name(meta: Mapping[str, Any]) -> str:
    pre = meta.get("tokenizer.ggml.pre")
    return pre if isinstance(pre, str) and pre else "default"


def _flag(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    v = meta.get(key)
    return default if v is None else bool(v)


def _token_types(summary: GGUFSummary, meta: Mapping[str, Any], n: int) -> list[int]:
    raw = meta.get("tokenizer.ggml.token_type")
    types = [int(x) for x in raw] if raw is not None else [1] * n
    if len(types) != n:
        raise GGUFError(f"{summary.path}: {len(types)} token types for {n} tokens")
    return types


def spm_merges(tokens: list[str], scores: list[float]) -> tuple[list[tuple[str, str]], int]:
    """The BPE merges that reproduce llama.cpp's SentencePiece tokenizer, and how many of the
    joined pieces repeat the score of another joined piece.

    llama.cpp starts from the characters of the text and repeatedly joins the adjacent pair
    whose concatenation is a token of the highest score (the leftmost such pair on a tie).
    A BPE model does the same with merges ranked in that order: every split (a, b) of every
    token where a and b are tokens too, ranked by the joined token's score, highest first.
    Pieces of equal score are ranked by id (lower first), where llama.cpp takes the leftmost
    pair: the one place where the two can differ (docs/weights.md)."""
    ids: dict[str, int] = {}
    for i, t in enumerate(tokens):
        ids[t] = i  # llama.cpp's token-to-id map keeps the last of duplicate texts
    ranked: list[tuple[float, int, int, str, str]] = []
    merging: dict[int, float] = {}
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, k, left, right))
                merging[i] = scores[i]
    ranked.sort()
    seen: set[float] = set()
    tied = 0
    for score in merging.values():
        tied += score in seen
        seen.add(score)
    return [(left, right) for *_, left, right in ranked], tied


def build_spm_tokenizer(
    summary: GGUFSummary, meta: Mapping[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """A SentencePiece vocabulary (`tokenizer.ggml.model = llama`) as the `tokenizers`
    equivalent of llama.cpp's SPM tokenizer: spaces become "▁" and one is prepended to
    every stretch of text between special tokens (add_space_prefix), no pre-tokenizer
    split, BPE merges ranked by the scores (spm_merges), characters outside the vocabulary
    as <0xXX> byte tokens; control and unknown tokens special, user-defined ones always
    matched in the text, as llama.cpp does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    tokens: list[str] = [str(t) for t in meta["tokenizer.ggml.tokens"]]
    raw_scores = meta.get("tokenizer.ggml.scores")
    try:
        scores = [float(x) for x in raw_scores] if raw_scores is not None else [0.0] * len(tokens)
    except (TypeError, ValueError):
        raise GGUFError(f"{summary.path}: the GGUF's token scores are not numbers") from None
    if len(scores) != len(tokens):
        raise GGUFError(f"{summary.path}: {len(scores)} token scores for {len(tokens)} tokens")
    types = _token_types(summary, meta, len(tokens))
    merges, tied = spm_merges(tokens, scores)
    if tied:
        log.warning(
            "%s: %d SentencePiece pieces share a score with another; equal-score pieces "
            "are merged in id order (the trained order when the scores were lost), where "
            "llama.cpp joins the leftmost pair first: texts may split differently",
            summary.path.name,
            tied,
        )

    def token_at(key: str) -> str | None:
        i = _meta_int(meta, key, -1)
        return tokens[i] if 0 <= i < len(tokens) else None

    unk = token_at("tokenizer.ggml.unknown_token_id")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True,
            ignore_merges=False,
        )
    )  # fmt: skip
    prefix = _flag(meta, "tokenizer.ggml.add_space_prefix", True)
    steps: list[Any] = [normalizers.Prepend(SPM_SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPM_SPACE)])
    decode: list[Any] = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(decode)
    tok.add_tokens(
        [
            AddedToken(t, special=ty != TOKEN_USER_DEFINED, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if t and ty in (TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED)
        ]
    )
    # llama.cpp's defaults for SentencePiece vocabularies: BOS added, EOS not.
    add_bos = _flag(meta, "tokenizer.ggml.add_bos_token", True)
    add_eos = _flag(meta, "tokenizer.ggml.add_eos_token", False)
    bos = token_at("tokenizer.ggml.bos_token_id")
    eos = token_at("tokenizer.ggml.eos_token_id")
    around = [t for t, on in ((bos, add_bos), (eos, add_eos)) if on and t is not None]
    if around:
        first = [bos] if add_bos and bos is not None else []
        last = [eos] if add_eos and eos is not None else []
        tok.post_processor = processors.TemplateProcessing(
            single=[*first, "$A", *last],
            pair=[*first, "$A", *last, *first, "$B:1", *last],
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(around)],
        )
    eos_ids = end_of_turn_ids(meta)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": _meta_int(meta, f"{summary.architecture}.context_length", 4096),
        "bos_token": bos,
        "eos_token": tokens[eos_ids[0]] if eos_ids and eos_ids[0] < len(tokens) else None,
        "unk_token": unk,
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos and bos is not None,
        "add_eos_token": add_eos and eos is not None,
        "clean_up_tokenization_spaces": False,
    }
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template:
        config["chat_template"] = template
    return tok, config
