"""Tensor <-> bytes for the wire. The one place that knows how an MLX array becomes a
`Tensor` message and back. No pickle crosses this boundary: raw little-endian bytes, an
explicit dtype and shape, checked before anything is built from them."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from node._proto.layerlink.v1 import node_pb2 as pb

# dtype name -> (MLX dtype, numpy dtype carrying the same bytes)
_DTYPES: dict[str, tuple[mx.Dtype, type[np.generic]]] = {
    "float32": (mx.float32, np.float32),
    "float16": (mx.float16, np.float16),
    "bfloat16": (mx.bfloat16, np.uint16),  # numpy has no bfloat16: move the raw 16-bit words
    "int32": (mx.int32, np.int32),
}
_NAMES = {mlx: name for name, (mlx, _) in _DTYPES.items()}


class CodecError(ValueError):
    """A tensor message that does not describe a valid tensor of the expected kind."""


def dtype_name(dtype: mx.Dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise CodecError(f"dtype {dtype} cannot travel on the wire") from None


def to_proto(arr: mx.array) -> pb.Tensor:
    """Encode an (evaluated) MLX array."""
    name = dtype_name(arr.dtype)
    if name == "bfloat16":
        data = np.asarray(arr.view(mx.uint16)).tobytes()
    else:
        data = np.asarray(arr).tobytes()
    return pb.Tensor(dtype=name, shape=list(arr.shape), data=data)


def from_proto(
    t: pb.Tensor,
    *,
    dtype: str | None = None,
    ndim: int | None = None,
    last_dim: int | None = None,
    max_elements: int = 1 << 28,
) -> mx.array:
    """Decode a tensor, checking dtype, rank, last dimension and byte length."""
    if t.dtype not in _DTYPES:
        raise CodecError(f"unknown tensor dtype {t.dtype!r}; expected one of {sorted(_DTYPES)}")
    if dtype is not None and t.dtype != dtype:
        raise CodecError(f"tensor dtype is {t.dtype}, the loaded model uses {dtype}")
    shape = tuple(int(d) for d in t.shape)
    if ndim is not None and len(shape) != ndim:
        raise CodecError(f"tensor has shape {list(shape)}, expected {ndim} dimensions")
    if any(d <= 0 for d in shape):
        raise CodecError(f"tensor shape {list(shape)} has an empty or negative dimension")
    if last_dim is not None and shape[-1] != last_dim:
        raise CodecError(
            f"tensor's last dimension is {shape[-1]}, the model's hidden size is {last_dim}"
        )
    count = math.prod(shape)
    if count > max_elements:
        raise CodecError(f"tensor of {count} elements exceeds the limit of {max_elements}")
    mlx_dtype, np_dtype = _DTYPES[t.dtype]
    itemsize = np.dtype(np_dtype).itemsize
    if len(t.data) != count * itemsize:
        raise CodecError(
            f"tensor data is {len(t.data)} bytes; shape {list(shape)} of {t.dtype} needs {count * itemsize}"
        )
    arr = np.frombuffer(t.data, dtype=np_dtype).reshape(shape)
    out = mx.array(arr)
    if t.dtype == "bfloat16":
        out = out.view(mx.bfloat16)
    return out
