"""Which CPU cores a process may run on (Linux), for nodes and stage workers that share a
machine.

Measured here (2 cores, the real model, a bare ring of 3 stage processes): left to the
scheduler, co-located stage processes cost 7.9 ms per hop; pinned, 0.2-1.2 ms; and LayerLink's
3 stages kept 0.83 of its 1-stage speed unpinned, 0.95-0.97 pinned (docs/performance.md,
"Co-located stages"). `cluster-node up --cpus 0` (or `0,2`, `0-3`) pins a
node; local clusters (demo, bench, tests) choose a placement for their nodes with
`local_cpus`. Pinning is a Linux feature (`sched_setaffinity`); elsewhere it is refused with a
clear error.
"""

from __future__ import annotations

import os

ENV = "LAYERLINK_LOCAL_CPUS"
# Placements of co-located processes: "spread": one core each in turn over all cores, so that
# stages computing at once (concurrent requests) do not share a core; "one": all on the first
# core; "none": the scheduler's choice.
POLICIES = ("spread", "one", "none")
DEFAULT_POLICY = "spread"


class CpuError(ValueError):
    """A CPU list that cannot be applied here; the message says why."""


def parse(spec: str) -> frozenset[int]:
    """ "0", "0,2", "0-3,6" -> the set of core numbers."""
    cores: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise CpuError(f"--cpus {spec!r}: expected core numbers like 0, 0,2 or 0-3") from None
        if a < 0 or b < a:
            raise CpuError(f"--cpus {spec!r}: {part!r} is not a range of core numbers")
        cores.update(range(a, b + 1))
    if not cores:
        raise CpuError(f"--cpus {spec!r} names no core")
    return frozenset(cores)


def available() -> frozenset[int]:
    if not hasattr(os, "sched_getaffinity"):
        return frozenset(range(os.cpu_count() or 1))
    return frozenset(os.sched_getaffinity(0))


def pin(cores: frozenset[int]) -> None:
    """Restrict every thread of this process (and those it starts later) to `cores`."""
    if not hasattr(os, "sched_setaffinity"):
        raise CpuError("--cpus needs Linux (this system cannot pin a process to cores)")
    allowed = available()
    if not cores <= allowed:
        raise CpuError(
            f"--cpus names cores {sorted(cores - allowed)} this process may not use "
            f"(allowed: {sorted(allowed)})"
        )
    tids = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # a thread that ended meanwhile
            continue


def local_cpus(index: int, policy: str | None = None) -> str | None:
    """The --cpus of the `index`-th co-located process under `policy` (default: the
    environment's LAYERLINK_LOCAL_CPUS, else DEFAULT_POLICY); None: not pinned."""
    policy = policy or os.environ.get(ENV) or DEFAULT_POLICY
    if policy not in POLICIES:
        raise CpuError(f"{ENV}={policy!r}: choose one of {', '.join(POLICIES)}")
    if policy == "none" or not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(available())
    return str(cores[0] if policy == "one" else cores[index % len(cores)])
