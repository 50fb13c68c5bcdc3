"""Export a Hugging Face / MLX model folder (llama or qwen2) to GGUF for the llama.cpp baseline.

The point is that both systems run the *same weights*: the benchmark compares LayerLink and
llama.cpp on one function, and greedy tokens must agree. So this writer

- maps HF tensor names to GGUF names (`model.layers.3.self_attn.q_proj.weight` ->
  `blk.3.attn_q.weight`);
- for llama, reorders the rows of q_proj and k_proj: HF rotates the two *halves* of each
  head (rotate_half), ggml's llama rope rotates *adjacent pairs*, so within every head row
  `j` of the first half and row `j` of the second half become rows `2j` and `2j+1`. qwen2
  runs with ggml's NEOX rope, which is the HF layout: no reordering;
- dequantizes MLX affine-quantized weights (`.scales`/`.biases`) to float first;
- writes the tokenizer as a `gpt2` byte-level BPE (tokens, token types, merges, special ids,
  chat template) and every hyperparameter llama.cpp reads.

`ftype` picks the storage of the 2-D weights: f32, f16 or q8_0 (rows whose length is not a
multiple of 32 fall back to f16, as llama.cpp's own converter does). Norms and biases stay f32.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:
    import gguf  # imported where it is used: every `coordinator` command builds this parser

log = logging.getLogger(__name__)

FTYPES = ("f32", "f16", "q8_0")
SUPPORTED_ARCHS = ("llama", "qwen2")

# ftype -> the name of its gguf.LlamaFileType member.
_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}

# HF module path inside a layer -> GGUF tensor base name inside `blk.{i}`.
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def export_gguf(model_dir: Path, out_path: Path, ftype: str = "f32") -> Path:
    """Write `model_dir` (HF/MLX safetensors + tokenizer.json) as a GGUF file at `out_path`."""
    if ftype not in FTYPES:
        raise ValueError(f"unknown ftype {ftype!r}; choose from {list(FTYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF export supports {list(SUPPORTED_ARCHS)}, not model_type {arch!r}")
    if config.get("rope_scaling"):
        raise ValueError(
            f"rope_scaling {config['rope_scaling']!r} is not supported by this exporter"
        )
    hp = _Hyper.from_config(config)
    import gguf

    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(model_dir.name)
    writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPE[ftype]]))
    writer.add_vocab_size(hp.vocab_size)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden_size)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.intermediate_size)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_norm_eps)
    _add_tokenizer(writer, model_dir, config, hp.vocab_size)

    seen: set[str] = set()
    for hf_name, data in _float_tensors(model_dir, config):
        name = _gguf_name(hf_name)
        if name is None:
            continue
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _interleave_rope_rows(data, hp.n_head)
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _interleave_rope_rows(data, hp.n_head_kv)
        stored, qtype = _encode(data, ftype)
        writer.add_tensor(name, stored, raw_dtype=qtype)
        seen.add(name)
    if "output.weight" not in seen and not config.get("tie_word_embeddings", False):
        raise ValueError(f"{model_dir}: no lm_head.weight and tie_word_embeddings is false")
    if "token_embd.weight" not in seen:
        raise ValueError(f"{model_dir}: no model.embed_tokens.weight")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s (%s, %s, %d tensors)", out_path, arch, ftype, len(seen))
    return out_path


@dataclass(frozen=True)
class _Hyper:
    """The hyperparameters GGUF needs, read once from config.json."""

    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_norm_eps: float

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> _Hyper:
        hidden, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
        return cls(
            n_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(config.get("num_key_value_heads") or n_head),
            head_dim=int(config.get("head_dim") or hidden // n_head),
            vocab_size=int(config["vocab_size"]),
            context_length=int(config.get("max_position_embeddings", 2048)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        )


def _interleave_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder rows within each head from HF's half-split rope layout to ggml's pairs.

    w: (n_heads * head_dim, ...) -> same shape; in each head, row j of the first half moves
    to 2j and row j of the second half to 2j+1.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"{rows} rows do not split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    # (heads, 2 halves, half, ...) -> (heads, half, 2, ...) -> back to (rows, ...)
    split = w.reshape(n_heads, 2, half, *w.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2).reshape(w.shape))


def _encode(data: np.ndarray, ftype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    import gguf

    if data.ndim < 2 or ftype == "f32":
        return data.astype(np.float32), gguf.GGMLQuantizationType.F32
    if (
        ftype == "q8_0"
        and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0
    ):
        q8 = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(data.astype(np.float32), q8), q8
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16


def _gguf_name(hf_name: str) -> str | None:
    """GGUF name of an HF tensor; None for tensors llama.cpp does not use (rope caches)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    module, _, kind = hf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        raise ValueError(f"unexpected tensor {hf_name!r}")
    if module in _TOP_NAMES:
        return f"{_TOP_NAMES[module]}.{kind}"
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_NAMES:
        return f"blk.{int(parts[2])}.{_LAYER_NAMES[parts[3]]}.{kind}"
    raise ValueError(f"tensor {hf_name!r} has no GGUF counterpart in this exporter")


def _float_tensors(model_dir: Path, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every weight, MLX-quantized ones dequantized."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    quant: dict[str, Any] = config.get("quantization") or {}
    for f in files:
        loaded = mx.load(str(f))
        assert isinstance(loaded, dict)
        arrays: dict[str, mx.array] = loaded
        for name in sorted(arrays):
            if name.endswith((".scales", ".biases")):
                continue
            w = arrays[name]
            base = name.removesuffix(".weight")
            if name.endswith(".weight") and f"{base}.scales" in arrays:
                per_layer = quant.get(base)  # mlx_lm allows per-layer overrides
                params: dict[str, Any] = per_layer if isinstance(per_layer, dict) else quant
                w = mx.dequantize(
                    w,
                    arrays[f"{base}.scales"],
                    arrays.get(f"{base}.biases"),
                    group_size=int(params.get("group_size", 64)),
                    bits=int(params.get("bits", 4)),
                    mode=str(params.get("mode", "affine")),
                )
            yield name, np.array(w.astype(mx.float32))


def _token_id(tokenizer_config: dict[str, Any], key: str, vocab: dict[str, int]) -> int | None:
    tok = tokenizer_config.get(key)
    if isinstance(tok, dict):
        tok = tok.get("content")
    return vocab.get(tok) if isinstance(tok, str) else None


def _add_tokenizer(
    writer: gguf.GGUFWriter, model_dir: Path, config: dict[str, Any], n_vocab: int
) -> None:
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"only BPE tokenizers are exported, not {model.get('type')!r}")
    tokenizer_config: dict[str, Any] = {}
    tc_path = model_dir / "tokenizer_config.json"
    if tc_path.exists():
        tokenizer_config = json.loads(tc_path.read_text())

    vocab: dict[str, int] = dict(model["vocab"])
    types: dict[int, gguf.TokenType] = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = int(added["id"])
        types[int(added["id"])] = (
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        )
    if max(vocab.values()) >= n_vocab:
        raise ValueError(f"tokenizer has ids up to {max(vocab.values())}, model vocab is {n_vocab}")
    by_id = {i: t for t, i in vocab.items()}
    tokens: list[str] = []
    token_types: list[int] = []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            token_types.append(int(types.get(i, gguf.TokenType.NORMAL)))
        else:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{i}]")
            token_types.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec, str(config.get("model_type"))))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)

    bos = _token_id(tokenizer_config, "bos_token", vocab)
    eos = _token_id(tokenizer_config, "eos_token", vocab)
    pad = _token_id(tokenizer_config, "pad_token", vocab)
    if bos is None and isinstance(config.get("bos_token_id"), int):
        bos = config["bos_token_id"]
    eos_cfg = config.get("eos_token_id")
    if eos is None and eos_cfg is not None:
        eos = eos_cfg[0] if isinstance(eos_cfg, list) else int(eos_cfg)
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(bool(tokenizer_config.get("add_bos_token", False)))
    template = tokenizer_config.get("chat_template")
    if isinstance(template, str):
        writer.add_chat_template(template)


def _pre_tokenizer_name(spec: dict[str, Any], arch: str) -> str:
    """llama.cpp's name for the pre-tokenizer: its regex must match the HF tokenizer's."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # the GPT-2 split regex, which ByteLevel(use_regex=True) applies
    if pre.get("type") == "Sequence":  # Split(regex) + ByteLevel(use_regex=False)
        known = {"qwen2": "qwen2", "llama": "llama-bpe"}
        if arch in known:
            return known[arch]
    log.warning("unrecognised pre-tokenizer %r; llama.cpp will use its default", pre.get("type"))
    return "default"
