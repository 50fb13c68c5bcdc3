"""Checks on request fields that name things outside the message: model folders on this
node's disk and the addresses of other nodes. (Tensors are checked in codec.py, layer ranges
and token ids in stage.py.)

Trust boundary: a coordinator that proved the cluster secret names these, but a path is
still confined to the node's --model-dir roots, and a link out of them (a symlinked folder
or a symlinked file inside the model folder) is refused: the node reads only what its
owner put under those roots.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePath

from node.stage import ErrorKind, StageError

MAX_PATH_CHARS = 4096
MAX_ADDRESS_CHARS = 261  # a 253-character host name, ':' and a port
_HOST_RE = re.compile(r"[A-Za-z0-9.\-_]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def _inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def confine_model_path(raw: str, roots: Sequence[Path]) -> Path:
    """The folder `raw` names, resolved; with roots, it must lie inside one of them and so
    must every entry of it that is a symbolic link. Raises StageError(INVALID_ARGUMENT)."""
    if not raw or "\x00" in raw or len(raw) > MAX_PATH_CHARS:
        raise StageError(
            ErrorKind.INVALID_ARGUMENT,
            f"model_path must be a path of 1-{MAX_PATH_CHARS} characters",
        )
    if ".." in PurePath(raw).parts:
        raise StageError(ErrorKind.INVALID_ARGUMENT, f"model path {raw!r} must not contain '..'")
    path = Path(raw)
    if not roots:
        return path.resolve()
    resolved_roots = [r.resolve() for r in roots]
    if not path.is_absolute():
        candidates = [root / path for root in roots]
        path = next((c for c in candidates if c.exists()), candidates[0])
    resolved = path.resolve()
    where = ", ".join(str(r) for r in resolved_roots)
    if not _inside(resolved, resolved_roots):
        raise StageError(
            ErrorKind.INVALID_ARGUMENT,
            f"model path {raw!r} is outside this node's model directories ({where})",
        )
    if resolved.is_dir():
        for entry in sorted(resolved.iterdir()):
            if entry.is_symlink() and not _inside(entry.resolve(), resolved_roots):
                raise StageError(
                    ErrorKind.INVALID_ARGUMENT,
                    f"{entry.name} in model path {raw!r} links outside this node's model "
                    f"directories ({where})",
                )
    return resolved


def check_address(value: str, field: str) -> None:
    """An empty string, or host:port (IPv6 hosts in brackets). Raises StageError."""
    if not value:
        return
    host, sep, port = value.rpartition(":")
    ok = (
        len(value) <= MAX_ADDRESS_CHARS
        and bool(sep)
        and bool(_HOST_RE.fullmatch(host))
        and port.isascii()
        and port.isdigit()
        and 0 < int(port) < 65536
    )
    if not ok:
        raise StageError(ErrorKind.INVALID_ARGUMENT, f"{field} {value[:80]!r} is not host:port")
