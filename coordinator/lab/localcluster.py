"""Start and stop `cluster-node` processes on this machine (demo, tests, benchmarks), and
`coordinator up` over them.

Each node binds 127.0.0.1 on a free port and prints a READY line with its address; we wait
for that line (never a fixed sleep) and stop every process we started on exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass
class _Starting:
    """A node process spawned and not yet known to be ready."""

    name: str
    proc: subprocess.Popen[str]
    deadline: float
    timeout: float
    line: list[str] = field(default_factory=list)  # its READY line, once read
    reader: threading.Thread | None = None


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
        return self._wait_ready(self._spawn(name, timeout, extra_args))

    def start_nodes(
        self,
        names: list[str],
        timeout: float = 60.0,
        extra_args: list[str] | None = None,
        envs: list[dict[str, str]] | None = None,
        args: list[list[str]] | None = None,
    ) -> list[LocalNode]:
        """Start the nodes all at once, then wait for each one's READY line (a node's start is
        mostly imports and its mDNS announcement: waited for one after the other, they added
        up); `envs` and `args`: each node's own additions to the cluster's environment and to
        `extra_args`. On a failure every node of this call is stopped."""
        pending = [
            self._spawn(
                name,
                timeout,
                [*(extra_args or []), *(args[i] if args else [])],
                envs[i] if envs else None,
            )
            for i, name in enumerate(names)
        ]
        try:
            return [self._wait_ready(p) for p in pending]
        except BaseException:
            for p in pending:
                self.stop_node(p.name)
            raise

    def _spawn(
        self,
        name: str,
        timeout: float,
        extra_args: list[str] | None,
        env: dict[str, str] | None = None,
    ) -> _Starting:
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
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**self.env, **(env or {})}
        )
        self.procs[name] = proc
        assert proc.stdout is not None
        starting = _Starting(name, proc, time.monotonic() + timeout, timeout)

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(READY_PREFIX):
                    starting.line.append(line)
                    break

        starting.reader = threading.Thread(target=read, daemon=True)
        starting.reader.start()
        return starting

    def _wait_ready(self, starting: _Starting) -> LocalNode:
        assert starting.reader is not None
        starting.reader.join(max(0.0, starting.deadline - time.monotonic()))
        if not starting.line:
            starting.proc.kill()
            raise RuntimeError(
                f"node {starting.name} did not become ready within {starting.timeout:.0f}s "
                f"(exit {starting.proc.poll()})"
            )
        address, node_id, _data_port = parse_ready(starting.line[0])
        node = LocalNode(
            name=starting.name, address=address, node_id=node_id, pid=starting.proc.pid
        )
        self.nodes.append(node)
        return node

    def start(self) -> list[LocalNode]:
        return self.start_nodes([f"{self.name_prefix}{i}" for i in range(self.count)])

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

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to every node at once, then wait for each (each sends its mDNS goodbye on
        the way out); one still running after `timeout` is killed."""
        procs = list(self.procs.values())
        self.procs.clear()
        self.nodes = []
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

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


class CoordinatorProcess:
    """`coordinator up --port 0` over the given nodes, as users run it; `url` is read from
    its READY line. Raises RuntimeError, with the end of its log, if it exits or is not
    ready within `timeout` seconds."""

    def __init__(
        self,
        model: Path,
        nodes: Sequence[LocalNode],
        log_path: Path,
        extra_args: list[str] | None = None,
        timeout: float = 120.0,
    ) -> None:
        from coordinator.commands.up import READY_PREFIX as COORDINATOR_READY  # (heavy import)

        cmd = [sys.executable, "-m", "coordinator.main", "up", "--model", str(model), "--port", "0"]
        for n in nodes:
            cmd += ["--node", n.address]
        cmd += extra_args or []
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        box: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:  # drained to the end: the pipe never fills
                if line.startswith(COORDINATOR_READY) and not box:
                    box.append(line.split()[1])
                    ready.set()

        threading.Thread(target=read, name="coordinator-stdout", daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"coordinator up did not become ready (exit {self.proc.poll()}); log: "
                    + log_path.read_text()[-2000:]
                )
        self.url = box[0]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
