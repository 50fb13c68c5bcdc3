"""The model types the stage engine reproduces exactly, and the check that refuses others.

A stage runs its slice of mlx_lm's layer list with one causal mask (node/stage.py). That is
the whole forward pass for the types below; an architecture whose forward pass does more —
Gemma scales its embeddings, others soft-cap logits or give some layers a sliding window —
would load and silently produce wrong tokens. Every type listed has a test in which a
3-stage pipeline equals mlx_lm (tests/test_equivalence.py). MLX is not loaded here: the
coordinator checks a model with this before any node is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# mlx_lm model type -> what it covers (mistral is mlx_lm's llama code).
SUPPORTED_MODEL_TYPES = {
    "llama": "Llama 2/3, SmolLM, TinyLlama",
    "mistral": "Mistral 7B",
    "qwen2": "Qwen2, Qwen2.5",
    "qwen3": "Qwen3 (dense)",
}

# The Hugging Face class a config.json of each type names in "architectures".
HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def unsupported_reason(config: Mapping[str, Any]) -> str | None:
    """Why the stage engine cannot run this config exactly, or None if it can."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
        names = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
        return (
            f"model type {model_type!r} is not supported: LayerLink serves only what its stage "
            f"engine reproduces exactly ({names})"
        )
    layer_types = config.get("layer_types")
    if isinstance(layer_types, list) and any(t != "full_attention" for t in layer_types):
        return f"{model_type} with sliding-window layers is not supported (full attention only)"
    if model_type == "qwen2" and config.get("use_sliding_window"):
        return "qwen2 with use_sliding_window is not supported (full attention only)"
    return None


# config.json fields that size the model: a wrong one is named, before any loader trips on it.
SHAPE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def shape_error(config: Mapping[str, Any]) -> str | None:
    """What is wrong with a config.json's shape fields (in it or its text_config), or None."""
    text = config.get("text_config", {})
    if not isinstance(text, Mapping):
        return "text_config must be an object"
    for section in (config, text):
        for key in SHAPE_FIELDS:
            v = section.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                return f"{key} must be a positive whole number, not {v!r}"
    return None
