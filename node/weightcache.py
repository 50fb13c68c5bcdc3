"""The node's content-addressed weight cache: tensors shipped by the coordinator, named by the
sha256 of their data, kept under a size cap with least-recently-used eviction.

Layout under the cache root (`node.identity.cache_dir() / "weights"` unless --cache-dir):

    blobs/<aa>/<sha256>.safetensors   one verified tensor: a one-tensor safetensors file (key
                                      "data"), so MLX memory-maps it like any model file
    partial/<sha256>.part             a tensor being received: the same header, then the data
                                      bytes so far (a dropped connection resumes at its end)
    stages/<weights_id>/config.json   a shipped stage: the model's config and the manifest of
    stages/<weights_id>/manifest.json its tensors (name -> sha256, dtype, shape)
    hashes/                           hashes of the node's own model folders (tensorfiles.py)
    index.sqlite                      blob sizes, mtimes at verification, last use; stages
    lock                              held shared by running nodes, exclusively by `clear`

A blob is trusted while its file size and mtime equal those recorded when it was verified;
anything else (or `verify`) re-hashes it, and a blob that no longer matches its name is
deleted, so the coordinator sends it again. Two tensors with the same bytes share a blob.

Not thread-safe: a WeightCache is used from one thread at a time (the node's weights thread).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import struct
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from node import identity
from node.directwrite import DirectWriter
from node.tensorfiles import DTYPE_BYTES, READ_BYTES, expected_nbytes

log = logging.getLogger(__name__)

BLOB_KEY = "data"
SHA_RE = re.compile(r"[0-9a-f]{64}")
ID_RE = re.compile(r"[0-9a-f]{32}")
# Free disk space never used by the cache.
DISK_MARGIN_BYTES = 256 << 20
# Default cap: this fraction of the size of the file system that holds the cache.
DEFAULT_DISK_FRACTION = 0.8
MAX_TENSORS = 200_000
MAX_TENSOR_BYTES = 1 << 40
MAX_CONFIG_BYTES = 4 << 20
# Blob data starts on this boundary; direct (page-cache-bypassing) writes use it.
ALIGN = 4096
O_DIRECT: int = getattr(os, "O_DIRECT", 0)
DIRECT_MIN_BYTES = 1 << 20
# Pieces the hash may lag behind the writes (each held in memory until hashed).
HASH_LAG_PIECES = 4


def default_root() -> Path:
    return identity.cache_dir() / "weights"


class CacheError(Exception):
    """A cache request that cannot be served; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TensorMeta:
    """What a tensor is, by content: the sha256 of its data, dtype, shape and size."""

    sha256: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def check(self) -> None:
        if not SHA_RE.fullmatch(self.sha256):
            raise CacheError(grpc.StatusCode.INVALID_ARGUMENT, f"bad sha256 {self.sha256!r}")
        if self.dtype not in DTYPE_BYTES:
            raise CacheError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown dtype {self.dtype!r}")
        if len(self.shape) > 8 or any(d < 0 for d in self.shape):
            raise CacheError(grpc.StatusCode.INVALID_ARGUMENT, f"bad shape {list(self.shape)}")
        if self.nbytes > MAX_TENSOR_BYTES or expected_nbytes(self.dtype, self.shape) != self.nbytes:
            raise CacheError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {self.sha256[:12]}: {self.nbytes} bytes do not match "
                f"{self.dtype}{list(self.shape)}",
            )


@dataclass(frozen=True)
class StageTensor:
    name: str
    meta: TensorMeta


@dataclass(frozen=True)
class Prepared:
    weights_id: str
    missing: tuple[TensorMeta, ...]  # unique by sha256, in request order
    partial: tuple[tuple[str, int], ...]  # (sha256, data bytes already received)
    cached_bytes: int

    @property
    def missing_bytes(self) -> int:
        have = dict(self.partial)
        return sum(m.nbytes - have.get(m.sha256, 0) for m in self.missing)


@dataclass(frozen=True)
class CachedStage:
    """A complete shipped stage: where its config and each tensor's blob lie."""

    weights_id: str
    stage_dir: Path  # holds config.json (mlx_lm reads the model's config from here)
    tensors: tuple[tuple[str, Path, TensorMeta], ...]  # (name, blob, meta)

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for _, _, m in self.tensors)

    @property
    def sha256s(self) -> frozenset[str]:
        return frozenset(m.sha256 for _, _, m in self.tensors)


@dataclass(frozen=True)
class StageRow:
    weights_id: str
    model: str
    label: str
    tensors: int
    nbytes: int
    cached_bytes: int
    last_used: float


@dataclass(frozen=True)
class Listing:
    root: Path
    max_bytes: int
    blob_count: int
    blob_bytes: int
    partial_bytes: int
    stages: tuple[StageRow, ...]


def blob_header(meta: TensorMeta) -> bytes:
    """The safetensors header of a one-tensor blob (length prefix included), padded with
    spaces to a multiple of ALIGN bytes: the data starts on a block boundary."""
    body = json.dumps(
        {
            BLOB_KEY: {
                "dtype": meta.dtype,
                "shape": list(meta.shape),
                "data_offsets": [0, meta.nbytes],
            }
        },
        separators=(",", ":"),
    ).encode()
    body += b" " * (-(len(body) + 8) % ALIGN)
    return struct.pack("<Q", len(body)) + body


def weights_id_of(config_json: bytes, tensors: Iterable[StageTensor]) -> str:
    """A stage's name in the cache: the hash of its config and its (name, tensor) pairs."""
    doc = {
        "config": hashlib.sha256(config_json).hexdigest(),
        "tensors": sorted(
            [t.name, t.meta.sha256, t.meta.dtype, list(t.meta.shape)] for t in tensors
        ),
    }
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:32]


def _header_len(path: Path) -> int:
    with path.open("rb") as f:
        raw = f.read(8)
    if len(raw) != 8:
        return -1
    return 8 + int(struct.unpack("<Q", raw)[0])


def _hash_file(path: Path, offset: int, limit: int | None = None) -> tuple[Any, int]:
    """A sha256 object over path's bytes from offset (up to limit bytes), and the count."""
    h = hashlib.sha256()
    n = 0
    with path.open("rb", buffering=0) as f:
        f.seek(offset)
        while limit is None or n < limit:
            piece = f.read(READ_BYTES if limit is None else min(READ_BYTES, limit - n))
            if not piece:
                break
            h.update(piece)
            n += len(piece)
    return h, n


class TensorWriter:
    """Receives one tensor's data into its partial file; commit() verifies and files it.

    Where the platform offers O_DIRECT (Linux), block-aligned pieces bypass the page cache:
    copying hundreds of MB into freshly allocated page-cache memory costs more CPU than the
    network does, and the stage reads each blob once when it loads. The piece is copied into
    an aligned buffer and written from there; unaligned tails go through the page cache.
    """

    def __init__(self, cache: WeightCache, meta: TensorMeta, offset: int) -> None:
        self.cache = cache
        self.meta = meta
        self.path = cache.partial_path(meta.sha256)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = blob_header(meta)
        self._header_len = len(header)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._dfd = -1
        self._hashing: deque[Future[None]] = deque()
        # A writer this process left open for the tensor (an earlier stream whose client
        # vanished without its stream ending here) yields to this one: only a writer of
        # another process can hold the lock below.
        stale = cache.receiving.get(meta.sha256)
        if stale is not None:
            stale.close()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise CacheError(
                grpc.StatusCode.ABORTED,
                f"tensor {meta.sha256[:12]} is being received by another node process",
            ) from None
        cache.receiving[meta.sha256] = self
        size = os.fstat(self._fd).st_size
        have = size - len(header) if size >= len(header) else -1
        if have >= 0 and _header_len(self.path) != len(header):
            have = -1
        if offset == 0 or have < 0:
            if offset != 0:
                self.close()
                raise CacheError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"tensor {meta.sha256[:12]}: nothing received yet, a piece at {offset}",
                )
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, header, 0)
            self._hash = hashlib.sha256()
            self.have = 0
        elif offset == have:
            self._hash, n = _hash_file(self.path, len(header))
            self.have = n
        else:
            self.close()
            raise CacheError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tensor {meta.sha256[:12]}: {have} bytes received, a piece at {offset}",
            )
        if O_DIRECT and meta.nbytes >= DIRECT_MIN_BYTES:
            try:
                self._dfd = os.open(self.path, os.O_WRONLY | O_DIRECT)
            except OSError:  # a file system without direct I/O (tmpfs, ...)
                self._dfd = -1
        self._direct = self._dfd >= 0

    @property
    def complete(self) -> bool:
        return self.have == self.meta.nbytes

    def write(self, data: bytes | memoryview, offset: int) -> None:
        """Take the piece at `offset`; `data` must stay unchanged until commit() or close()
        (it is hashed a few pieces behind)."""
        if self._fd < 0:
            raise CacheError(
                grpc.StatusCode.ABORTED,
                f"tensor {self.meta.sha256[:12]}: a newer stream took over its reception",
            )
        if offset != self.have:
            raise CacheError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"tensor {self.meta.sha256[:12]}: piece at {offset}, expected {self.have}",
            )
        if self.have + len(data) > self.meta.nbytes:
            raise CacheError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"tensor {self.meta.sha256[:12]}: more than its {self.meta.nbytes} bytes",
            )
        # Hash on a second thread while this one writes (both release the GIL); the hash
        # may lag the writes by a few pieces (one thread keeps them in order).
        self._hashing.append(self.cache.hasher.submit(self._hash.update, data))
        while len(self._hashing) > HASH_LAG_PIECES:
            self._hashing.popleft().result()
        self._write_at(memoryview(data), self._header_len + self.have)
        self.have += len(data)

    def when_hashed(self) -> Future[None]:
        """Done once every piece written so far is in the hash (the hasher runs its jobs in
        order): wait for it elsewhere, and commit() then finds the hash ready. Safe from any
        thread once the last write() has returned."""
        return self.cache.hasher.submit(_nothing)

    def _hashed(self) -> None:
        """Wait until every received piece is in the hash."""
        while self._hashing:
            self._hashing.popleft().result()

    def _write_at(self, data: memoryview, pos: int) -> None:
        done = 0
        if self._direct and pos % ALIGN == 0:
            done = len(data) // ALIGN * ALIGN
            self.cache.direct.write(self._dfd, self._fd, data[:done], pos, self._refused)
        if done < len(data):
            # Queued direct writes land first: a file never has a hole before its end.
            self.cache.direct.settle(self._dfd)
            _pwrite_all(self._fd, data[done:], pos + done)

    def _refused(self) -> None:
        self._direct = False

    def commit(self) -> bool:
        """Verify the received bytes and move them into the cache; False (and the bytes
        dropped) when they do not hash to the tensor's name."""
        if self._fd < 0:
            raise CacheError(
                grpc.StatusCode.ABORTED,
                f"tensor {self.meta.sha256[:12]}: a newer stream took over its reception",
            )
        self._hashed()
        self.cache.direct.settle(self._dfd)
        digest = self._hash.hexdigest()
        if digest != self.meta.sha256:
            log.warning(
                "tensor %s arrived corrupted (hash %s); dropped", self.meta.sha256[:12], digest[:12]
            )
            self.path.unlink(missing_ok=True)
            self.close()
            return False
        dest = self.cache.blob_path(self.meta.sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.path, dest)
        self.close()
        self.cache.record_blob(self.meta.sha256, self.meta.nbytes, dest)
        return True

    def close(self) -> None:
        if self.cache.receiving.get(self.meta.sha256) is self:
            del self.cache.receiving[self.meta.sha256]
        self._hashed()
        self.cache.direct.settle(self._dfd)
        for fd in (self._dfd, self._fd):
            if fd >= 0:
                os.close(fd)
        self._dfd = self._fd = -1


def _nothing() -> None:
    pass


def _pwrite_all(fd: int, data: memoryview, pos: int) -> int:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], pos + done)
    return done


class WeightCache:
    """See the module docstring. `max_bytes` 0: a share of the file system's size."""

    def __init__(self, root: Path, max_bytes: int = 0) -> None:
        self.root = root
        self._max_bytes = max_bytes
        self._db: sqlite3.Connection | None = None
        self._lock: IO[str] | None = None
        self._hasher: ThreadPoolExecutor | None = None
        self._direct: DirectWriter | None = None
        # The open writer of each tensor being received (weights thread only).
        self.receiving: dict[str, TensorWriter] = {}

    @property
    def direct(self) -> DirectWriter:
        """Direct writes from aligned buffers on a disk thread (weights thread only)."""
        if self._direct is None:
            self._direct = DirectWriter()
        return self._direct

    @property
    def hasher(self) -> ThreadPoolExecutor:
        """The thread that hashes received pieces while the caller writes them."""
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hash")
        return self._hasher

    # ----- paths and bookkeeping -----------------------------------------------------------

    def blob_path(self, sha: str) -> Path:
        return self.root / "blobs" / sha[:2] / f"{sha}.safetensors"

    def partial_path(self, sha: str) -> Path:
        return self.root / "partial" / f"{sha}.part"

    def stage_dir(self, weights_id: str) -> Path:
        return self.root / "stages" / weights_id

    @property
    def max_bytes(self) -> int:
        if self._max_bytes > 0:
            return self._max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        return int(shutil.disk_usage(self.root).total * DEFAULT_DISK_FRACTION)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / "lock", "a+")  # noqa: SIM115 - held while open
            fcntl.flock(self._lock, fcntl.LOCK_SH)
            db = sqlite3.connect(self.root / "index.sqlite", timeout=30.0, check_same_thread=False)
            # WAL without a sync per transaction: the index is a cache of what the blob files
            # say (a lost row only costs a re-hash).
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(
                """
                CREATE TABLE IF NOT EXISTS blobs (
                    sha TEXT PRIMARY KEY, nbytes INTEGER, file_size INTEGER,
                    mtime_ns INTEGER, last_used REAL);
                CREATE TABLE IF NOT EXISTS stages (
                    id TEXT PRIMARY KEY, model TEXT, label TEXT, tensors INTEGER,
                    nbytes INTEGER, created REAL, last_used REAL);
                """
            )
            self._db = db
        return self._db

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        if self._hasher is not None:
            self._hasher.shutdown(wait=False)
            self._hasher = None
        if self._db is not None:
            self._db.close()
            self._db = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def record_blob(self, sha: str, nbytes: int, path: Path) -> None:
        st = path.stat()
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?)",
                (sha, nbytes, st.st_size, st.st_mtime_ns, time.time()),
            )

    def _forget_blob(self, sha: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM blobs WHERE sha = ?", (sha,))

    def check_blob(self, meta: TensorMeta, verify: bool = False) -> bool:
        """Is the blob present and intact? A changed or unrecorded file is re-hashed; one
        that no longer matches its name is deleted."""
        path = self.blob_path(meta.sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            self._forget_blob(meta.sha256)
            return False
        row = self.db.execute(
            "SELECT file_size, mtime_ns FROM blobs WHERE sha = ?", (meta.sha256,)
        ).fetchone()
        if not verify and row is not None and tuple(row) == (st.st_size, st.st_mtime_ns):
            return True
        h, n = _hash_file(path, max(0, _header_len(path)))
        if n == meta.nbytes and h.hexdigest() == meta.sha256:
            self.record_blob(meta.sha256, meta.nbytes, path)
            return True
        log.warning("cached tensor %s is corrupted; dropped, it will be fetched again", path)
        path.unlink(missing_ok=True)
        self._forget_blob(meta.sha256)
        return False

    def _partial_have(self, meta: TensorMeta) -> int:
        path = self.partial_path(meta.sha256)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return 0
        header = len(blob_header(meta))
        if size < header or _header_len(path) != header:
            return 0
        return min(size - header, meta.nbytes)

    # ----- stages ----------------------------------------------------------------------------

    def prepare(
        self,
        model: str,
        label: str,
        config_json: bytes,
        tensors: list[StageTensor],
        verify: bool = False,
        pinned: frozenset[str] = frozenset(),
    ) -> Prepared:
        """Record the stage and say which of its tensors are missing (and how much of each
        already arrived); make room for them under the cap."""
        if not tensors or len(tensors) > MAX_TENSORS:
            raise CacheError(
                grpc.StatusCode.INVALID_ARGUMENT, f"a stage has 1..{MAX_TENSORS} tensors"
            )
        if len(config_json) > MAX_CONFIG_BYTES:
            raise CacheError(grpc.StatusCode.INVALID_ARGUMENT, "config.json is too large")
        try:
            config = json.loads(config_json)
        except ValueError as e:
            raise CacheError(
                grpc.StatusCode.INVALID_ARGUMENT, f"config.json is not JSON: {e}"
            ) from None
        if not isinstance(config, dict):
            raise CacheError(grpc.StatusCode.INVALID_ARGUMENT, "config.json is not an object")
        names: set[str] = set()
        for t in tensors:
            if not t.name or len(t.name) > 1024 or "\x00" in t.name or t.name in names:
                raise CacheError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"bad or repeated tensor name {t.name!r}"
                )
            names.add(t.name)
            t.meta.check()
        weights_id = weights_id_of(config_json, tensors)
        self._write_stage(weights_id, config_json, tensors)
        unique: dict[str, TensorMeta] = {}
        for t in tensors:
            unique.setdefault(t.meta.sha256, t.meta)
        missing: list[TensorMeta] = []
        partial: list[tuple[str, int]] = []
        cached = 0
        for meta in unique.values():
            if self.check_blob(meta, verify):
                cached += meta.nbytes
                continue
            missing.append(meta)
            have = self._partial_have(meta)
            if have:
                partial.append((meta.sha256, have))
        prepared = Prepared(weights_id, tuple(missing), tuple(partial), cached)
        self._reserve(prepared.missing_bytes, frozenset(unique) | pinned)
        now = time.time()
        with self.db:
            self.db.executemany(
                "UPDATE blobs SET last_used = ? WHERE sha = ?", [(now, s) for s in unique]
            )
            self.db.execute(
                "INSERT OR REPLACE INTO stages VALUES (?, ?, ?, ?, ?, "
                "COALESCE((SELECT created FROM stages WHERE id = ?), ?), ?)",
                (
                    weights_id,
                    model[:256],
                    label[:256],
                    len(tensors),
                    sum(m.nbytes for m in unique.values()),
                    weights_id,
                    now,
                    now,
                ),
            )
        return prepared

    def _write_stage(self, weights_id: str, config_json: bytes, tensors: list[StageTensor]) -> None:
        d = self.stage_dir(weights_id)
        if (d / "manifest.json").is_file():
            return
        d.mkdir(parents=True, exist_ok=True)
        manifest = {
            "weights_id": weights_id,
            "tensors": [
                {
                    "name": t.name,
                    "sha256": t.meta.sha256,
                    "dtype": t.meta.dtype,
                    "shape": list(t.meta.shape),
                    "nbytes": t.meta.nbytes,
                }
                for t in tensors
            ],
        }
        for name, data in (
            ("config.json", config_json),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            tmp = d / f".{name}.{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, d / name)

    def stage(self, weights_id: str) -> CachedStage:
        """A complete shipped stage, ready to load; NOT_FOUND if it is unknown or lacks
        tensors (evicted, corrupted): prepare and ship it again."""
        if not ID_RE.fullmatch(weights_id):
            raise CacheError(grpc.StatusCode.INVALID_ARGUMENT, f"bad weights_id {weights_id!r}")
        d = self.stage_dir(weights_id)
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError):
            raise CacheError(
                grpc.StatusCode.NOT_FOUND,
                f"no shipped stage {weights_id} in this node's cache ({self.root})",
            ) from None
        out: list[tuple[str, Path, TensorMeta]] = []
        lacking = 0
        for t in manifest["tensors"]:
            meta = TensorMeta(
                str(t["sha256"]), str(t["dtype"]), tuple(t["shape"]), int(t["nbytes"])
            )
            if not self.check_blob(meta):
                lacking += 1
            out.append((str(t["name"]), self.blob_path(meta.sha256), meta))
        if lacking:
            raise CacheError(
                grpc.StatusCode.NOT_FOUND,
                f"shipped stage {weights_id} lacks {lacking} of its {len(out)} tensors "
                "(evicted or corrupted): ship it again",
            )
        now = time.time()
        with self.db:
            self.db.execute("UPDATE stages SET last_used = ? WHERE id = ?", (now, weights_id))
            self.db.executemany(
                "UPDATE blobs SET last_used = ? WHERE sha = ?",
                [(now, m.sha256) for _, _, m in out],
            )
        return CachedStage(weights_id, d, tuple(out))

    # ----- space ----------------------------------------------------------------------------

    def _used_bytes(self) -> int:
        (blob_bytes,) = self.db.execute("SELECT COALESCE(SUM(file_size), 0) FROM blobs").fetchone()
        return int(blob_bytes) + self._partial_bytes()

    def _partial_bytes(self) -> int:
        d = self.root / "partial"
        return sum(p.stat().st_size for p in d.glob("*.part")) if d.is_dir() else 0

    def _reserve(self, need: int, keep: frozenset[str]) -> None:
        """Evict least-recently-used blobs and stale partial tensors (never those in `keep`)
        until `need` more bytes fit under the cap and on the disk."""
        cap = self.max_bytes
        used = self._used_bytes()
        free = shutil.disk_usage(self.root).free - DISK_MARGIN_BYTES

        def short() -> int:
            return max(used + need - cap, need - free)

        if short() <= 0:
            return
        victims: list[tuple[float, str, Path]] = [
            (float(last or 0.0), str(sha), self.blob_path(str(sha)))
            for sha, last in self.db.execute("SELECT sha, last_used FROM blobs").fetchall()
        ]
        part_dir = self.root / "partial"
        if part_dir.is_dir():
            victims += [(p.stat().st_mtime, p.stem, p) for p in part_dir.glob("*.part")]
        evicted = 0
        for _, sha, path in sorted(victims):
            if short() <= 0:
                break
            if sha in keep:
                continue
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                size = 0
            if path.suffix != ".part":
                self._forget_blob(sha)
            used -= size
            free += size
            evicted += size
        if evicted:
            log.info("evicted %.1f MB of least recently used tensors", evicted / 1e6)
        if short() > 0:
            raise CacheError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the stage needs {need / 1e9:.2f} GB more in the weight cache {self.root}: "
                f"cap {cap / 1e9:.2f} GB, {used / 1e9:.2f} GB held by tensors in use, "
                f"{max(0, free) / 1e9:.2f} GB free on disk (raise --cache-max-gb or free "
                "disk space)",
            )

    def open_writer(self, meta: TensorMeta, offset: int) -> TensorWriter:
        return TensorWriter(self, meta, offset)

    # ----- `cluster-node cache` -------------------------------------------------------------

    def listing(self) -> Listing:
        blobs = {
            str(sha): int(size)
            for sha, size in self.db.execute("SELECT sha, file_size FROM blobs").fetchall()
        }
        rows: list[StageRow] = []
        for wid, model, label, n, nbytes, last in self.db.execute(
            "SELECT id, model, label, tensors, nbytes, last_used FROM stages "
            "ORDER BY last_used DESC"
        ).fetchall():
            cached = 0
            try:
                manifest = json.loads((self.stage_dir(wid) / "manifest.json").read_text())
                seen: set[str] = set()
                for t in manifest["tensors"]:
                    if t["sha256"] in blobs and t["sha256"] not in seen:
                        cached += int(t["nbytes"])
                        seen.add(t["sha256"])
            except (OSError, ValueError, KeyError):
                pass
            rows.append(StageRow(wid, model, label, int(n), int(nbytes), cached, float(last)))
        return Listing(
            root=self.root,
            max_bytes=self.max_bytes,
            blob_count=len(blobs),
            blob_bytes=sum(blobs.values()),
            partial_bytes=self._partial_bytes(),
            stages=tuple(rows),
        )


def clear(root: Path) -> int:
    """Delete the whole cache under root; returns the bytes freed. Refuses while a running
    node holds the cache."""
    if not root.exists():
        return 0
    lock_path = root / "lock"
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CacheError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a running node uses the weight cache {root}: stop it first",
            ) from None
        freed = 0
        for sub in ("blobs", "partial", "stages", "hashes"):
            d = root / sub
            if d.is_dir():
                freed += sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
                shutil.rmtree(d)
        for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
            with contextlib.suppress(FileNotFoundError):
                (root / name).unlink()
    return freed
