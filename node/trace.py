"""Opt-in timeline of a token's way through the pipeline, for finding where time goes.

With LAYERLINK_TRACE=DIR set, every process (nodes and coordinator) appends one line per
event to DIR/trace-<pid>.tsv: `t_ns  pid  event  request_id  step`. The clock is
CLOCK_MONOTONIC (time.perf_counter_ns on Linux), shared by every process on one host, so
events of different processes on one machine can be laid on one time line
(`python -m node.trace DIR` summarises the gaps). Off (and one branch per call) otherwise.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

_DIR = os.environ.get("LAYERLINK_TRACE", "")
ENABLED = bool(_DIR)
_lines: list[str] = []
_lock = threading.Lock()


def mark(event: str, request_id: str = "", step: int = -1) -> None:
    if not ENABLED:
        return
    line = f"{time.perf_counter_ns()}\t{os.getpid()}\t{event}\t{request_id}\t{step}\n"
    with _lock:
        _lines.append(line)
        if len(_lines) >= 4096:
            _flush_locked()


def _flush_locked() -> None:
    if not _lines:
        return
    path = Path(_DIR) / f"trace-{os.getpid()}.tsv"
    with path.open("a") as f:
        f.writelines(_lines)
    _lines.clear()


def flush() -> None:
    if ENABLED:
        with _lock:
            _flush_locked()


if ENABLED:
    Path(_DIR).mkdir(parents=True, exist_ok=True)
    atexit.register(flush)


def summarise(folder: Path) -> str:
    """Median gap (us) between consecutive events of one decode step, in time order."""
    events: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
    for f in folder.glob("trace-*.tsv"):
        for line in f.read_text().splitlines():
            t, pid, ev, rid, step = line.split("\t")
            if int(step) >= 2:  # warm steps only
                events[(rid, int(step))].append((int(t), f"{ev}@{pid}"))
    gaps: dict[tuple[str, str], list[float]] = defaultdict(list)
    for evs in events.values():
        evs.sort()
        for (t0, a), (t1, b) in zip(evs, evs[1:], strict=False):
            gaps[(a, b)].append((t1 - t0) / 1e3)
    rows = sorted(gaps.items(), key=lambda kv: -len(kv[1]))
    out = []
    for (a, b), v in rows[:40]:
        v.sort()
        out.append(f"{len(v):6d}  {v[len(v) // 2]:9.1f} us  {a} -> {b}")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(summarise(Path(sys.argv[1])) + "\n")
