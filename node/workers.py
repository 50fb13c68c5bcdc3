"""Device workers: the processes a node starts for its devices beyond the first.

`cluster-node up --devices N` serves device 0 itself and starts `cluster-node up
--worker-device K/N` for K = 1 .. N-1 (node/devices.py says why one process per device). A
worker binds the node's host on the node's port + 2K (gRPC) and + 2K + 1 (data path) — free
ones when the node's port is 0 — and prints the node's READY line with its data port; the node
waits for every worker before it announces itself. A worker dies with its node (Linux: the
kernel's parent-death signal; elsewhere it watches its parent), and a node whose worker exits
stops too: a node is served whole or not at all, so the coordinator re-plans without it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from node.devices import DeviceServer

log = logging.getLogger(__name__)

READY_PREFIX = "LAYERLINK_NODE_READY"
PARENT_ENV = "LAYERLINK_NODE_PARENT"  # the pid of the node that started a worker
STOP_GRACE_S = 10.0


class WorkerError(RuntimeError):
    """A device worker that did not start; the message carries its last log lines."""


@dataclass(frozen=True)
class WorkerSpec:
    """How to start the worker of one device: its command line and extra environment."""

    device: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


def ready_line(address: str, node_id: str, data_port: int) -> str:
    """The line a node process prints once it serves (LocalCluster, the LAN lab and a node
    waiting for its workers read it)."""
    return f"{READY_PREFIX} {address} {node_id} data={data_port}"


def parse_ready(line: str) -> tuple[str, str, int]:
    """(address, node id, data port) of a READY line; ValueError if it is not one."""
    parts = line.split()
    if len(parts) < 3 or parts[0] != READY_PREFIX:
        raise ValueError(f"not a READY line: {line!r}")
    data = next((p for p in parts[3:] if p.startswith("data=")), "data=0")
    return parts[1], parts[2], int(data.removeprefix("data="))


def worker_argv(
    device: int,
    count: int,
    node_id: str,
    *,
    host: str,
    port: int,
    name: str,
    cluster: str,
    model_dirs: Sequence[str],
    cache_dir: str,
    cache_max_gb: float,
    idle_timeout_s: float,
    insecure: bool,
    verbose: int,
) -> tuple[str, ...]:
    """`cluster-node up` for device `device` of `count`. The token travels in the
    environment ($LAYERLINK_TOKEN), never on the command line (`ps` shows that)."""
    grpc_port = port + 2 * device if port else 0
    return (
        sys.executable,
        "-m",
        "node.main",
        *(["-" + "v" * verbose] if verbose else []),
        "up",
        "--worker-device",
        f"{device}/{count}",
        "--worker-of",
        node_id,
        "--no-advertise",
        "--host",
        host,
        "--port",
        str(grpc_port),
        "--data-port",
        str(grpc_port + 1 if grpc_port else 0),
        "--name",
        name,
        "--cluster",
        cluster,
        "--cache-dir",
        cache_dir,
        "--cache-max-gb",
        str(cache_max_gb),
        "--idle-timeout",
        str(idle_timeout_s),
        *(["--insecure"] if insecure else []),
        *(a for d in model_dirs for a in ("--model-dir", d)),
    )


class DeviceWorkers:
    """Starts, watches and stops a node's device workers."""

    def __init__(self, specs: Sequence[WorkerSpec], on_exit: Callable[[int, int], None]) -> None:
        """`on_exit(device, returncode)` is called (from a reader thread) when a worker
        exits while the node has not asked it to."""
        self._specs = tuple(specs)
        self.on_exit = on_exit
        self._procs: dict[int, subprocess.Popen[str]] = {}
        self._stopping = False
        self._tails: dict[int, list[str]] = {}
        self._ready: dict[int, tuple[str, str, int]] = {}
        self._events = {s.device: threading.Event() for s in self._specs}

    def launch(self) -> None:
        """Start every worker. Call from the node's main thread: Linux's parent-death signal
        follows the thread that started a process, and the main thread lives as long as
        the node."""
        for spec in self._specs:
            proc = subprocess.Popen(
                list(spec.argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, **dict(spec.env), PARENT_ENV: str(os.getpid())},
            )
            self._procs[spec.device] = proc
            threading.Thread(
                target=self._read,
                args=(spec.device, proc),
                name=f"worker-{spec.device}",
                daemon=True,
            ).start()

    def wait_ready(self, timeout_s: float) -> tuple[DeviceServer, ...]:
        """Wait for every worker's READY line (blocking: call off the event loop). Raises
        WorkerError after stopping them all when one exits or stays silent."""
        deadline = time.monotonic() + timeout_s
        for device, event in self._events.items():
            event.wait(max(0.0, deadline - time.monotonic()))
            if device not in self._ready:
                proc = self._procs[device]
                state = "did not become ready" if proc.poll() is None else "exited"
                self.stop()
                tail = "\n".join(self._tails.get(device, [])[-15:])
                raise WorkerError(
                    f"the worker of device {device} {state} within {timeout_s:.0f}s"
                    + (f"; its log:\n{tail}" if tail else "")
                )
        return tuple(
            DeviceServer(
                device=d,
                grpc_port=int(self._ready[d][0].rsplit(":", 1)[1]),
                data_port=self._ready[d][2],
                pid=self._procs[d].pid,
            )
            for d in sorted(self._ready)
        )

    def _read(self, device: int, proc: subprocess.Popen[str]) -> None:
        """Drain the worker's output into the node's stderr; note its READY line; report
        its exit."""
        tail = self._tails.setdefault(device, [])
        event = self._events[device]
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(READY_PREFIX) and device not in self._ready:
                try:
                    self._ready[device] = parse_ready(line)
                except ValueError:
                    log.warning("device %d worker: %s", device, line)
                event.set()
                continue
            tail.append(line)
            del tail[:-50]
            # The worker logs at the node's level already: its lines go out as they are.
            sys.stderr.write(f"[device {device}] {line}\n")
        code = proc.wait()
        event.set()
        if not self._stopping:
            self.on_exit(device, code)

    def stop(self) -> None:
        """SIGTERM every worker, wait for them (then SIGKILL what is left)."""
        self._stopping = True
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self._procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def die_with_parent() -> None:
    """Make this worker go when the node that started it goes, however it went (SIGKILL
    included): the kernel's parent-death signal on Linux, a watching thread elsewhere."""
    try:
        parent = int(os.environ.get(PARENT_ENV, ""))
    except ValueError:
        parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes
        import ctypes.util

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the node went before the signal was armed
            os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
