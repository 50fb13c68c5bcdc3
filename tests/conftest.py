"""Shared fixtures: isolated config dirs, mDNS on loopback only, synthetic models and a
session-wide cluster of real `cluster-node` processes on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coordinator.lab.lan import Lan, unavailable_reason

# Every node and browser started by the tests speaks mDNS on loopback only, in a cluster
# name of its own, with config/cache dirs of its own.
_SESSION_DIR = (
    Path(os.environ.get("LAYERLINK_TEST_DIR", "/tmp")) / f"layerlink-tests-{uuid.uuid4().hex[:8]}"
)
os.environ["LAYERLINK_MDNS_INTERFACES"] = "127.0.0.1"
os.environ["LAYERLINK_CLUSTER"] = f"t{uuid.uuid4().hex[:10]}"
os.environ["XDG_CONFIG_HOME"] = str(_SESSION_DIR / "config")
os.environ["XDG_CACHE_HOME"] = str(_SESSION_DIR / "cache")
# Local nodes are left to the scheduler in the tests (node/cpus.py's "none"): their timing-based
# checks were set without pinning; tests/test_cpus.py tests the placements themselves, and the
# demo and `make bench` pin (docs/performance.md, "Co-located stages").
os.environ.setdefault("LAYERLINK_LOCAL_CPUS", "none")
# Nodes run open on loopback unless a test gives them a token (a developer's own cluster
# token in the environment must not leak into the test nodes).
os.environ.pop("LAYERLINK_TOKEN", None)


STALE_AFTER_S = 12 * 3600  # a session lasts minutes: an older folder is a killed session's


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove what killed sessions left (their folders are not touched for hours); a
    session running beside this one keeps its folder, which it writes to all the time."""
    for old in _SESSION_DIR.parent.glob("layerlink-tests-*"):
        try:
            stale = time.time() - old.stat().st_mtime > STALE_AFTER_S
        except OSError:
            continue
        if stale and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Leave no models behind: the session's folder holds ~1.6 GB of models, caches and
    shipped weights, and a CI machine that keeps its /tmp across runs filled up with them.
    A passing session's folder goes whole; a failing one's keeps its logs (*.log) only."""
    if not _SESSION_DIR.is_dir():
        return
    if exitstatus == 0:
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)
        return
    for path in sorted(_SESSION_DIR.rglob("*"), reverse=True):  # children before parents
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()  # only once empty: folders that hold logs stay
            elif path.suffix != ".log":
                path.unlink()
        except OSError:
            continue


@pytest.fixture(scope="session")
def session_dir() -> Path:
    _SESSION_DIR.mkdir(parents=True, exist_ok=True)
    return _SESSION_DIR


@pytest.fixture(scope="session")
def model_factory(session_dir: Path):  # type: ignore[no-untyped-def]
    """model_factory(preset, arch, **kw) -> Path, synthesized once per session."""
    from coordinator.lab.synth import synthesize

    made: dict[tuple[object, ...], Path] = {}

    def make(preset: str = "tiny", arch: str = "llama", **kw: object) -> Path:
        key = (preset, arch, tuple(sorted(kw.items())))
        if key not in made:
            suffix = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
            path = session_dir / "models" / f"{preset}-{arch}{('-' + suffix) if suffix else ''}"
            made[key] = synthesize(path, preset=preset, arch=arch, seed=0, **kw)  # type: ignore[arg-type]
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(model_factory) -> Path:  # type: ignore[no-untyped-def]
    path: Path = model_factory("tiny", "llama")
    return path


@pytest.fixture(scope="session")
def local_cluster(session_dir: Path) -> Iterator[object]:
    """Three real node processes on loopback, advertised over mDNS, for the whole session."""
    from coordinator.lab.localcluster import LocalCluster

    log_dir = session_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(
        3, os.environ["LAYERLINK_CLUSTER"], log_dir=log_dir, name_prefix="shared"
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def lan_factory() -> Iterator[Callable[[int], Lan]]:
    """lan_factory(n) -> a built namespace LAN of n nodes (coordinator/lab/lan.py); all torn
    down after the test. Skips the test (with the reason) where namespaces cannot be made."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    made: list[Lan] = []

    def make(n: int) -> Lan:
        lan = Lan(n)
        made.append(lan)
        lan.build()
        return lan

    try:
        yield make
    finally:
        for lan in made:
            lan.close()
