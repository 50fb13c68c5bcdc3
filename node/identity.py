"""A stable node id, persisted in the user's config dir (XDG_CONFIG_HOME honoured).

Ids are kept per node name, so several nodes on one machine (tests, or one per GPU) get
distinct, stable ids. A lock file stops two live processes from sharing one id.
"""

from __future__ import annotations

import fcntl
import os
import re
import uuid
from pathlib import Path
from typing import IO

_locks: list[IO[str]] = []  # held for the life of the process


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "layerlink"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "layerlink"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:64] or "node"


def node_id_for(name: str) -> str:
    """Return the persisted id for this node name, creating it on first use.

    If another live process already holds that name's id, a numbered variant is used."""
    d = config_dir() / "nodes"
    d.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        key = _safe(name) if n == 0 else f"{_safe(name)}-{n}"
        lock = open(d / f"{key}.lock", "w")  # noqa: SIM115 - held open on purpose
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        _locks.append(lock)
        path = d / f"{key}.id"
        if path.is_file():
            text = path.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{32}", text):
                return text
        node_id = uuid.uuid4().hex
        path.write_text(node_id + "\n")
        return node_id
    raise RuntimeError(f"could not allocate a node id for {name!r} in {d}")
