"""Safetensors files without loading them: tensor names, dtypes, shapes and byte ranges from
the header, and the sha256 of each tensor's data bytes, cached per file.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to `{dtype, shape, data_offsets: [begin, end)}` (offsets relative to the end of
the header) and the data. Only the header is parsed here; data bytes are read only to hash
them, in bounded pieces.

Hashes are cached in a small JSON file per model file, keyed by the file's size and mtime
(ns): a restart, or a second session with the same model, hashes nothing again. A file whose
size or mtime changed is hashed again from scratch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The files mlx_lm's loader reads (`model*.safetensors`); other *.safetensors files in a
# Hugging Face folder (e.g. `consolidated.safetensors`) are a second copy of the weights.
WEIGHT_GLOB = "model*.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024
READ_BYTES = 8 << 20

# Bytes per element of each safetensors dtype.
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


class TensorFileError(ValueError):
    """A file that is not a usable safetensors file; the message names it."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: where its data bytes lie."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute offset of the data in `file`
    nbytes: int


@dataclass(frozen=True)
class HashedTensor:
    entry: TensorEntry
    sha256: str


def expected_nbytes(dtype: str, shape: Iterable[int]) -> int:
    """Bytes of a tensor of this dtype and shape; TensorFileError for an unknown dtype."""
    if dtype not in DTYPE_BYTES:
        raise TensorFileError(f"unknown safetensors dtype {dtype!r}")
    return DTYPE_BYTES[dtype] * math.prod(int(d) for d in shape)


def read_header(path: Path) -> list[TensorEntry]:
    """The tensors of one safetensors file, in header order (data never read)."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise TensorFileError(f"{path.name}: not a safetensors file (short header)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES:
                raise TensorFileError(f"{path.name}: implausible safetensors header length {n}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise TensorFileError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise TensorFileError(f"{path.name}: bad safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path.name}: safetensors header is not an object")
    base = 8 + n
    out: list[TensorEntry] = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in meta["data_offsets"])
            dtype = str(meta["dtype"])
            shape = tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(f"{path.name}: bad header entry for {name!r}") from None
        # The data region is not checked here (hashing reads it and notices a short file):
        # header-only files describe a model's sizes as well as full ones.
        if not 0 <= begin <= end:
            raise TensorFileError(f"{path.name}: tensor {name!r} has bad data offsets")
        if dtype in DTYPE_BYTES and expected_nbytes(dtype, shape) != end - begin:
            raise TensorFileError(f"{path.name}: tensor {name!r} size does not match its shape")
        out.append(TensorEntry(name, dtype, shape, path, base + begin, end - begin))
    return out


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(WEIGHT_GLOB))


def folder_tensors(folder: Path) -> list[TensorEntry]:
    """Every tensor of the model folder's weight files (names must be unique)."""
    files = weight_files(folder)
    if not files:
        raise TensorFileError(f"no {WEIGHT_GLOB} files in {folder}")
    out: list[TensorEntry] = []
    seen: set[str] = set()
    for f in files:
        for e in read_header(f):
            if e.name in seen:
                raise TensorFileError(f"tensor {e.name!r} appears in two files of {folder}")
            seen.add(e.name)
            out.append(e)
    return out


def hash_range(path: Path, offset: int, nbytes: int) -> str:
    """sha256 of nbytes of `path` from offset, read in bounded pieces."""
    h = hashlib.sha256()
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        left = nbytes
        while left:
            piece = f.read(min(READ_BYTES, left))
            if not piece:
                raise TensorFileError(f"{path.name}: file ended {left} bytes early")
            h.update(piece)
            left -= len(piece)
    return h.hexdigest()


def file_key(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


class HashCache:
    """Tensor hashes of model files, persisted per file in `root` and keyed by the file's
    size and mtime. Safe to share between processes (writes are atomic renames)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _record_path(self, path: Path) -> Path:
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        return self.root / f"{key}.json"

    def load(self, path: Path) -> dict[str, str]:
        """Known hashes of `path`'s tensors (empty when the file changed or was never seen)."""
        try:
            doc = json.loads(self._record_path(path).read_text())
            size, mtime = file_key(path)
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict) or doc.get("size") != size or doc.get("mtime_ns") != mtime:
            return {}
        hashes = doc.get("tensors")
        return {str(k): str(v) for k, v in hashes.items()} if isinstance(hashes, dict) else {}

    def store(self, path: Path, key: tuple[int, int], hashes: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        doc = {
            "path": str(path.resolve()),
            "size": key[0],
            "mtime_ns": key[1],
            "tensors": dict(sorted(hashes.items())),
        }
        record = self._record_path(path)
        tmp = record.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, record)


def pending_bytes(entries: Iterable[TensorEntry], cache: HashCache) -> int:
    """Data bytes of the entries whose hashes are not cached (what hash_tensors will read)."""
    known: dict[Path, dict[str, str]] = {}
    total = 0
    for e in entries:
        if e.file not in known:
            known[e.file] = cache.load(e.file)
        if e.name not in known[e.file]:
            total += e.nbytes
    return total


def hash_tensors(
    entries: Iterable[TensorEntry],
    cache: HashCache | None,
    on_hashed: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> list[HashedTensor]:
    """sha256 of every entry's data, from the cache where the file is unchanged.

    Hashing runs on a few threads (hashlib releases the GIL on large buffers);
    `on_hashed(nbytes)` is called after each tensor hashed (not for cached ones)."""
    entries = list(entries)
    by_file: dict[Path, list[TensorEntry]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e)
    known: dict[Path, dict[str, str]] = {}
    keys: dict[Path, tuple[int, int]] = {}
    for f in by_file:
        keys[f] = file_key(f)
        known[f] = cache.load(f) if cache is not None else {}
    todo = [e for e in entries if e.name not in known[e.file]]
    if todo:
        total = sum(e.nbytes for e in todo)
        log.info("hashing %d tensors (%.1f MB)", len(todo), total / 1e6)

        def one(e: TensorEntry) -> tuple[TensorEntry, str]:
            digest = hash_range(e.file, e.offset, e.nbytes)
            if on_hashed is not None:
                on_hashed(e.nbytes)
            return e, digest

        n = workers or min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="hash") as pool:
            for e, digest in pool.map(one, todo):
                known[e.file][e.name] = digest
        if cache is not None:
            for f in {e.file for e in todo}:
                if file_key(f) == keys[f]:  # unchanged while we read it
                    cache.store(f, keys[f], known[f])
    return [HashedTensor(e, known[e.file][e.name]) for e in entries]
