"""The dtype a node computes in, which may differ from the dtype its weights are stored in.

MLX's CPU backend is slow at float16 and bfloat16 arithmetic (measured on the real model:
float16 0.23 tok/s against float32 7.9 tok/s). A node whose default device is the CPU
therefore holds float16/bfloat16 parameters as float32 — dense weights, norms, and the
scales and offsets of quantized layers (the packed integers stay as they are). The cast is
exact (float16 and bfloat16 values are float32 values), so the stage computes the stored
weights' function in float32. GPUs (Metal, CUDA) compute in the stored dtype.

`LAYERLINK_COMPUTE_DTYPE=native` keeps the stored dtypes everywhere (for comparisons).
"""

from __future__ import annotations

import os
from typing import Any

import mlx.core as mx

ENV = "LAYERLINK_COMPUTE_DTYPE"
NATIVE = "native"
FLOAT32 = "float32"
_HALF = (mx.float16, mx.bfloat16)


def policy() -> str:
    """ "float32" on the CPU backend, "native" on a GPU or when the environment says so."""
    if os.environ.get(ENV, "").strip().lower() == NATIVE:
        return NATIVE
    return FLOAT32 if mx.default_device().type == mx.DeviceType.cpu else NATIVE


def cast_for_compute(module: Any, rule: str | None = None) -> bool:
    """Cast `module`'s half-precision parameters to float32 when the rule says so; True when
    anything changed. Works on any mlx.nn.Module (a stage's kept layers, or a whole model)."""
    from mlx.utils import tree_flatten, tree_map

    if (rule or policy()) != FLOAT32:
        return False
    flat = tree_flatten(module.parameters())
    assert isinstance(flat, list)
    if not any(v.dtype in _HALF for _, v in flat):
        return False
    module.update(
        tree_map(lambda v: v.astype(mx.float32) if v.dtype in _HALF else v, module.parameters())
    )
    return True
