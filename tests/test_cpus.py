"""CPU placement of co-located nodes (node/cpus.py): parsing, the local policies, and pinning
a real process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from node import cpus


def test_parse_core_lists() -> None:
    assert cpus.parse("0") == {0}
    assert cpus.parse("0,2") == {0, 2}
    assert cpus.parse("0-3, 6") == {0, 1, 2, 3, 6}
    for bad in ("", "x", "3-1", "-1", "1-", ","):
        with pytest.raises(cpus.CpuError):
            cpus.parse(bad)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_local_policies_place_nodes_on_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "available", lambda: frozenset({0, 1, 2, 3}))
    assert [cpus.local_cpus(i, "spread") for i in range(5)] == ["0", "1", "2", "3", "0"]
    assert [cpus.local_cpus(i, "one") for i in range(3)] == ["0", "0", "0"]
    assert cpus.local_cpus(0, "none") is None
    monkeypatch.setattr(cpus, "available", lambda: frozenset({5}))
    assert cpus.local_cpus(2, "spread") == "5"
    monkeypatch.setenv(cpus.ENV, "bogus")
    with pytest.raises(cpus.CpuError, match="spread, one, none"):
        cpus.local_cpus(0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pin_moves_every_thread_of_a_process() -> None:
    core = min(os.sched_getaffinity(0))
    code = (
        "import os, threading, time\n"
        "from node import cpus\n"
        "t = threading.Thread(target=time.sleep, args=(5,), daemon=True); t.start()\n"
        f"cpus.pin(frozenset({{{core}}}))\n"
        "print(sorted({c for tid in os.listdir('/proc/self/task') for c in os.sched_getaffinity(int(tid))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"[{core}]"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_node_refuses_cores_it_may_not_use() -> None:
    out = subprocess.run([sys.executable, "-m", "node.main", "up", "--cpus", "4096", "--no-advertise"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert "4096" in out.stderr and "Traceback" not in out.stderr
