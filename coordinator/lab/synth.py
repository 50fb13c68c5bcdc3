"""Random-weight test models that load in mlx_lm, transformers and (as GGUF) llama.cpp.

`synthesize` writes a complete Hugging Face style model folder: `config.json`,
`model.safetensors` in HF tensor naming, and a byte-level BPE tokenizer trained on the
English text in this module (`tokenizer.json`, `tokenizer_config.json` with a chat template,
`special_tokens_map.json`). Nothing is downloaded. The same seed always writes the same bytes.

The weights are random, but scaled so that greedy decoding wanders over many tokens instead
of repeating one: projections have std 1/sqrt(fan_in) (q and k twice that); the embedding is larger than the
residual updates, so the current token keeps a strong say in the next one; the lm_head rows
of the special tokens are zero, so a random model never emits EOS (or BOS, or PAD).

Optionally the folder is then quantized the MLX way (`quant_bits`, affine, group size 64)
and/or exported to `model.gguf` (f32) for the llama.cpp baseline.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx
import numpy as np

from node.architectures import HF_CLASSES

log = logging.getLogger(__name__)

# mistral is llama's weights under mlx_lm's "mistral" model type; qwen3 adds per-head q/k norms.
ARCHS = ("llama", "mistral", "qwen2", "qwen3")
DTYPES = ("float32", "float16", "bfloat16")
QUANT_BITS = (4, 8)
QUANT_GROUP_SIZE = 64

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)  # ids 0, 1, 2

# Roles are plain text, so the template needs no extra special tokens. Works with the Jinja
# environments of both transformers and mlx_lm (which calls transformers).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

# Scale of the token embedding relative to one layer's residual update (which is ~1).
EMBED_STD = 4.0
# Logit scale of the lm_head: logits have std about this for a unit-RMS final hidden state.
LM_HEAD_STD = 4.0
# Extra scale of q_proj and k_proj: sharper, position-dependent attention makes greedy
# decoding of a random model fall into short cycles far less often.
QK_SCALE = 2.0
# Relative spread of the RMSNorm weights around 1.
NORM_JITTER = 0.1
# Std of the q/k/v biases of qwen2.
BIAS_STD = 0.1

# Original text written for this project; the tokenizer is trained on it.
TRAINING_TEXT = """\
The harbour town woke slowly on the first cold morning of autumn. Fishing boats rocked
against the pier while gulls argued over the night's leftovers, and the baker on Quay Street
pulled the first trays of rye bread out of an oven that had been burning since four o'clock.
Nobody hurried. The tide would turn at half past nine, and until then the water belonged to
the herons that waited, perfectly still, along the mud flats beyond the lighthouse.

Mara kept the small repair shop behind the chandlery. Her customers brought her radios that
hissed, outboard motors that coughed, and once a pocket watch that had spent three days at
the bottom of the bay. She liked problems that could be opened with a screwdriver and
understood with patience. A machine, she told her apprentice, always tells you what is wrong
with it; you only have to listen longer than you want to.

In the afternoon the wind shifted to the north and the sky turned the colour of slate. The
apprentice, a quiet boy named Tobias, swept copper shavings into a tin and asked why the old
computers on the top shelf were never thrown away. Because each of them can still do some
work, Mara said. One has a fast memory and a slow processor, another the opposite. Joined
together with cables, they could share a job that none of them could finish alone.

Tobias thought about that for a long time. He imagined a long sentence passed from machine
to machine like a bucket along a line of people at a fire: the first one reads the words, the
second one remembers what they mean, the third one guesses what comes next. The slowest
person in the line sets the pace, he realised, and every handover costs a moment. If the
line is too long, the water spills before it reaches the flames.

That evening they tested the idea. They measured how quickly each computer could read its
share of numbers from memory, and how long a message needed to cross the cable between two
of them. The measurements surprised them both. The network was not slow because it carried
too little data; it was slow because every single message waited for an answer before the
next one could leave. Small messages, sent often, paid the full price of the journey each time.

By midnight the rain had stopped. Seven machines hummed on the workbench, each holding a
few layers of a model that wrote short poems about the sea. The poems were not good, but they
arrived steadily, one word after another, and Mara wrote the numbers in her notebook: tokens
per second, bytes per token, milliseconds per hop. Tomorrow they would try a different split
and compare the results honestly, with the same weights and the same prompt.

Questions kept arriving from the village. Could the grocer's laptop join the cluster? Would
the school's old desktop help, or would it only slow everyone down? Mara answered each one
with an experiment rather than an opinion. Twelve quick trials, she said, are worth more than
a hundred confident guesses; write down what you expected, then write down what happened.
"""


@dataclass(frozen=True)
class Preset:
    """Shape of a synthetic model."""

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        num_hidden_layers=8,
        hidden_size=256,
        intermediate_size=688,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=512,
    ),
    "small": Preset(
        num_hidden_layers=12,
        hidden_size=512,
        intermediate_size=1408,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=1024,
    ),
}


def synthesize(
    out_dir: Path,
    preset: str = "tiny",
    arch: str = "llama",
    seed: int = 0,
    dtype: str = "float32",
    quant_bits: int | None = None,
    gguf: bool = False,
    layers: int | None = None,
) -> Path:
    """Write a random-weight model folder to `out_dir` and return its path.

    `layers` overrides the preset's layer count (the same shapes, more or fewer layers).

    With `quant_bits` (4 or 8) the weights are quantized the MLX way after writing; with
    `gguf` the folder also gets `model.gguf` (f32; from the dequantized weights when
    quantized, so both engines compute the same function).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {list(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {list(DTYPES)}")
    if quant_bits is not None and quant_bits not in QUANT_BITS:
        raise ValueError(f"quant_bits must be one of {list(QUANT_BITS)}, got {quant_bits}")
    shape = PRESETS[preset]
    if layers is not None:
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        shape = replace(shape, num_hidden_layers=layers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    _write_tokenizer(out_dir, shape.vocab_size)
    eos_id = SPECIAL_TOKENS.index(EOS_TOKEN)
    bos_id = SPECIAL_TOKENS.index(BOS_TOKEN)
    config = _config(shape, arch, dtype, bos_id, eos_id)
    weights = _random_weights(shape, arch, seed)
    mx_dtype = getattr(mx, dtype)
    arrays = {name: mx.array(w).astype(mx_dtype) for name, w in weights.items()}
    # A previous quantized write leaves an index file that would point at stale names.
    (out_dir / "model.safetensors.index.json").unlink(missing_ok=True)
    mx.save_safetensors(str(out_dir / "model.safetensors"), arrays, metadata={"format": "pt"})
    _write_json(out_dir / "config.json", config)
    log.info("wrote %s model (%s, %s, seed %d) to %s", preset, arch, dtype, seed, out_dir)

    if quant_bits is not None:
        _quantize_in_place(out_dir, quant_bits)
    if gguf:
        from coordinator.lab.gguf_export import export_gguf

        export_gguf(out_dir, out_dir / "model.gguf", ftype="f32")
    return out_dir


def _config(shape: Preset, arch: str, dtype: str, bos_id: int, eos_id: int) -> dict[str, object]:
    return {
        "architectures": [HF_CLASSES[arch]],
        "model_type": arch,
        "num_hidden_layers": shape.num_hidden_layers,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab_size,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "max_position_embeddings": shape.max_position_embeddings,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }


def _random_weights(shape: Preset, arch: str, seed: int) -> dict[str, np.ndarray]:
    """HF-named float32 weights, drawn in a fixed order from one seeded generator."""
    rng = np.random.default_rng(seed)
    h, inter, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    q_out = shape.num_attention_heads * shape.head_dim
    kv_out = shape.num_key_value_heads * shape.head_dim

    def normal(rows: int, cols: int, std: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * std).astype(np.float32)

    def proj(out_features: int, in_features: int, gain: float = 1.0) -> np.ndarray:
        # (out, in), like nn.Linear
        return normal(out_features, in_features, gain / np.sqrt(in_features))

    def norm() -> np.ndarray:
        return (1.0 + NORM_JITTER * rng.standard_normal(h, dtype=np.float32)).astype(np.float32)

    def head_norm() -> np.ndarray:
        d = shape.head_dim
        return (1.0 + NORM_JITTER * rng.standard_normal(d, dtype=np.float32)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": normal(v, h, EMBED_STD)}
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm()
        w[f"{p}.self_attn.q_proj.weight"] = proj(q_out, h, QK_SCALE)
        w[f"{p}.self_attn.k_proj.weight"] = proj(kv_out, h, QK_SCALE)
        w[f"{p}.self_attn.v_proj.weight"] = proj(kv_out, h)
        if arch == "qwen2":
            w[f"{p}.self_attn.q_proj.bias"] = normal(1, q_out, BIAS_STD)[0]
            w[f"{p}.self_attn.k_proj.bias"] = normal(1, kv_out, BIAS_STD)[0]
            w[f"{p}.self_attn.v_proj.bias"] = normal(1, kv_out, BIAS_STD)[0]
        if arch == "qwen3":
            w[f"{p}.self_attn.q_norm.weight"] = head_norm()
            w[f"{p}.self_attn.k_norm.weight"] = head_norm()
        w[f"{p}.self_attn.o_proj.weight"] = proj(h, q_out)
        w[f"{p}.post_attention_layernorm.weight"] = norm()
        w[f"{p}.mlp.gate_proj.weight"] = proj(inter, h)
        w[f"{p}.mlp.up_proj.weight"] = proj(inter, h)
        w[f"{p}.mlp.down_proj.weight"] = proj(h, inter)
    w["model.norm.weight"] = norm()
    lm_head = normal(v, h, LM_HEAD_STD / np.sqrt(h))
    lm_head[: len(SPECIAL_TOKENS)] = 0.0  # never predict BOS, EOS or PAD
    w["lm_head.weight"] = lm_head
    return w


def _write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Train a byte-level BPE of exactly `vocab_size` tokens on TRAINING_TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing < 0:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    if missing:
        # The text ran out of merges: fill the vocabulary with unused special tokens so the
        # tokenizer and the embedding agree on its size (llama.cpp requires it).
        tok.add_special_tokens([f"<reserved_{i}>" for i in range(missing)])
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        # Explicitly none: transformers maps model_type qwen2 to Qwen2Tokenizer, whose
        # default unk token "<|endoftext|>" would otherwise be added as a 513th token.
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    special_map = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
    _write_json(out_dir / "special_tokens_map.json", special_map)


def _quantize_in_place(out_dir: Path, bits: int) -> None:
    """Replace the float weights in `out_dir` with MLX affine-quantized ones."""
    from mlx_lm.utils import load_model, quantize_model, save_model

    model, config = load_model(out_dir)
    report = io.StringIO()
    with contextlib.redirect_stdout(report):  # mlx_lm prints its bits-per-weight summary
        model, qconfig = quantize_model(model, config, QUANT_GROUP_SIZE, bits)
    log.debug("mlx_lm: %s", report.getvalue().strip())
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        save_model(Path(tmp), model)
        for name in ("model.safetensors", "model.safetensors.index.json"):
            shutil.move(str(Path(tmp) / name), str(out_dir / name))
    qconfig["quantization"] = dict(qconfig["quantization"])
    qconfig["quantization_config"] = dict(qconfig["quantization"])
    _write_json(out_dir / "config.json", qconfig)
    log.info("quantized %s to %d bits (group size %d)", out_dir, bits, QUANT_GROUP_SIZE)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
