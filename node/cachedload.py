"""Build a stage's model tree from shipped tensors in the node's weight cache.

mlx_lm's own loader builds the model (architecture from config.json, quantized layers where
the weights carry scales, the architecture's `sanitize`), but reads its weights from the
cache's one-tensor blobs instead of the model folder's files: the model class is wrapped so
that `sanitize` receives the stage's tensors. Each blob is memory-mapped lazily by `mx.load`;
nothing is read until the stage evaluates its own modules, and blobs of other layers are not
even on this node.

Every parameter the stage keeps must come from the cache (`provided`); ModelStage checks it,
since the tree is loaded non-strictly (other layers' parameters are absent by design).
"""

from __future__ import annotations

import logging
import resource
from typing import Any

import mlx.core as mx

from node.weightcache import BLOB_KEY, CachedStage

log = logging.getLogger(__name__)

MX_DTYPES: dict[str, Any] = {
    "BOOL": mx.bool_,
    "U8": mx.uint8,
    "I8": mx.int8,
    "U16": mx.uint16,
    "I16": mx.int16,
    "F16": mx.float16,
    "BF16": mx.bfloat16,
    "U32": mx.uint32,
    "I32": mx.int32,
    "F32": mx.float32,
    "U64": mx.uint64,
    "I64": mx.int64,
}
# Every lazily loaded blob holds a file descriptor until it is evaluated.
SPARE_FDS = 256


def _ensure_fds(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        log.info("raised the open-file limit from %d to %d for %d tensors", soft, new, n)


def lazy_weights(stage: CachedStage) -> dict[str, mx.array]:
    """name -> lazily loaded array of every tensor of the stage."""
    _ensure_fds(len(stage.tensors))
    out: dict[str, mx.array] = {}
    for name, blob, meta in stage.tensors:
        if meta.dtype not in MX_DTYPES:
            raise ValueError(f"tensor {name}: dtype {meta.dtype} has no MLX equivalent")
        loaded = mx.load(str(blob))
        if not isinstance(loaded, dict) or BLOB_KEY not in loaded:
            raise ValueError(f"cached blob {blob} is not a one-tensor safetensors file")
        arr: mx.array = loaded[BLOB_KEY]
        # A blob shared by two tensors with equal bytes carries the first one's dtype/shape.
        want = MX_DTYPES[meta.dtype]
        if arr.dtype != want:
            arr = arr.view(want)
        if tuple(arr.shape) != meta.shape:
            arr = arr.reshape(meta.shape)
        out[name] = arr
    return out


def build_model(stage: CachedStage) -> tuple[Any, dict[int, mx.array]]:
    """(model, provided): the lazily built model tree, and the arrays that came from the
    cache by id (held, so the ids stay valid while the caller checks its parameters)."""
    from mlx_lm.utils import _get_classes, load_model

    weights = lazy_weights(stage)
    provided: dict[int, mx.array] = {}

    def classes(config: dict[str, Any]) -> tuple[type, type]:
        model_class, args_class = _get_classes(config=config)
        base_sanitize = getattr(model_class, "sanitize", None)

        def sanitize(self: Any, loaded: dict[str, mx.array]) -> dict[str, mx.array]:
            merged = {**loaded, **weights}
            if base_sanitize is not None:
                merged = base_sanitize(self, merged)
            provided.update((id(v), v) for v in merged.values())
            return merged

        shipped = type(model_class.__name__, (model_class,), {"sanitize": sanitize})
        return shipped, args_class

    model, _ = load_model(stage.stage_dir, lazy=True, strict=False, get_model_classes=classes)
    return model, provided
