"""Start and stop `cluster-node` processes on this machine (demo, tests, benchmarks).

Each node binds 127.0.0.1 on a free port and prints a READY line with its address; we wait
for that line (never a fixed sleep) and stop every process we started on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from node.cpus import local_cpus
from node.workers import READY_PREFIX, parse_ready


@dataclass(frozen=True)
class LocalNode:
    name: str
    address: str
    node_id: str
    pid: int


class LocalCluster:
    def __init__(
        self,
        count: int,
        cluster: str,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        name_prefix: str = "node",
        cpu_policy: str | None = None,
    ) -> None:
        """`cpu_policy`: how the nodes share this machine's cores (node/cpus.py: "spread",
        "one" or "none"; default: $LAYERLINK_LOCAL_CPUS, else "spread")."""
        self.count = count
        self.cluster = cluster
        self.host = host
        self.extra_args = extra_args or []
        self.env = {**os.environ, "LAYERLINK_MDNS_INTERFACES": host, **(env or {})}
        self.log_dir = log_dir
        self.name_prefix = name_prefix
        self.cpu_policy = cpu_policy
        self.started = 0
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.nodes: list[LocalNode] = []

    def start_node(
        self, name: str, timeout: float = 60.0, extra_args: list[str] | None = None
    ) -> LocalNode:
        cmd = [
            sys.executable,
            "-m",
            "node.main",
            *(["-v"] if self.log_dir else []),  # INFO logs when they are kept
            "up",
            "--host",
            self.host,
            "--port",
            "0",
            "--name",
            name,
            "--cluster",
            self.cluster,
            *self.extra_args,
            *(extra_args or []),
        ]
        pinned = local_cpus(self.started, self.cpu_policy)
        self.started += 1
        if pinned is not None:
            cmd += ["--cpus", pinned]
        stderr = open(self.log_dir / f"{name}.log", "w") if self.log_dir else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=self.env)
        self.procs[name] = proc
        assert proc.stdout is not None
        line_box: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(READY_PREFIX):
                    line_box.append(line)
                    break

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not line_box:
            proc.kill()
            raise RuntimeError(
                f"node {name} did not become ready within {timeout:.0f}s (exit {proc.poll()})"
            )
        address, node_id, _data_port = parse_ready(line_box[0])
        node = LocalNode(name=name, address=address, node_id=node_id, pid=proc.pid)
        self.nodes.append(node)
        return node

    def start(self) -> list[LocalNode]:
        for i in range(self.count):
            self.start_node(f"{self.name_prefix}{i}")
        return self.nodes

    def stop_node(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        proc = self.procs.pop(name, None)
        self.nodes = [n for n in self.nodes if n.name != name]
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for name in list(self.procs):
            self.stop_node(name)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def wait_until(predicate: object, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(interval)
    return False
