"""A LAN in network namespaces, for tests and experiments (root only).

Layout, for n nodes (every name carries a per-instance tag, so concurrent runs never meet):

    hub namespace  llh<tag>:  bridge br0 (10.213.0.254/24) with ports v0 .. v<n-1>
    node namespace ll<tag>n<k>: eth0 = 10.213.0.<k+1>/24, the peer of v<k>

Nothing is created in the host's own namespace: the bridge lives in the hub namespace, so
traffic never leaves the namespaces this helper made. The hub's address is the seat of the
coordinator (`Lan.hub_cmd`); node namespaces hold `cluster-node` processes.

Shaping: `Lan.shape(k, rate_bit_s)` puts a tbf on both ends of node k's veth (egress of eth0:
the node's upload; egress of v<k> on the bridge: its download), so every link touching
node k is held to that rate in both directions. netem is not available, so latency is
added by wire relays (coordinator/lab/wire.py, `Lan.start_wire`): a node listens on 127.0.0.1
in its namespace and a relay on its LAN address delays what crosses from other namespaces.

Teardown: `Lan.close()` (or leaving the `with` block) kills every process the helper
started, by process group, and deletes the namespaces (which deletes their veths and the
bridge); it runs even when the test body fails.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from node.workers import READY_PREFIX

# The folder that holds the coordinator and node packages (a checkout, or site-packages).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
WIRE_READY_PREFIX = "WIRE_READY"
NODE_PORT = 50151
# A node's data port is NODE_PORT-based too but clear of the wire relays' ports (502xx) and
# of a second node's gRPC port in the same namespace (the default would be port + 1).
DATA_PORT_OFFSET = 1000

# Rates in bit/s for `Lan.shape`.
RATE_100MBIT = 100_000_000
RATE_1GBE = 1_000_000_000
RATE_2_5GBE = 2_500_000_000
RATE_10GBE = 10_000_000_000
RATE_RISER_1GBS = 8_000_000_000  # a PCIe x1-riser-like 1 GB/s


def unavailable_reason() -> str:
    """Why namespace LANs cannot be built here; empty when they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} tool (iproute2) is not installed"
    probe = f"llprobe{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return ""


def _run(argv: Sequence[str]) -> None:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


@dataclass(frozen=True)
class LanNode:
    """A node namespace of the LAN."""

    index: int
    netns: str
    ip: str


@dataclass
class NodeProcess:
    """A `cluster-node` (or other server) started inside a namespace."""

    name: str
    netns: str
    address: str
    node_id: str
    process: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Lan:
    """N namespaces on one bridge. Use as a context manager; see the module docstring."""

    n: int
    subnet: str = "10.213.0"
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    nodes: list[LanNode] = field(default_factory=list)
    processes: list[NodeProcess] = field(default_factory=list)
    _made: list[str] = field(default_factory=list)
    _workdir: Path | None = None

    @property
    def hub(self) -> str:
        return f"llh{self.tag}"

    @property
    def hub_ip(self) -> str:
        return f"{self.subnet}.254"

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"lan{self.tag}-"))
        return self._workdir

    def __enter__(self) -> Lan:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._made.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def build(self) -> None:
        if not 1 <= self.n <= 200:
            raise ValueError("a namespace LAN has 1 .. 200 nodes")
        self._add_netns(self.hub)
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "addr", "add", f"{self.hub_ip}/24", "dev", "br0"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for k in range(self.n):
            ns = f"ll{self.tag}n{k}"
            self._add_netns(ns)
            # Both ends are created directly inside their namespaces: none in the host's.
            _run(["ip", "link", "add", f"v{k}", "netns", self.hub, "type", "veth",
                  "peer", "name", "eth0", "netns", ns])  # fmt: skip
            _run(["ip", "-n", self.hub, "link", "set", f"v{k}", "master", "br0"])
            _run(["ip", "-n", self.hub, "link", "set", f"v{k}", "up"])
            ip = f"{self.subnet}.{k + 1}"
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self.nodes.append(LanNode(index=k, netns=ns, ip=ip))

    def shape(self, k: int, rate_bit_s: int) -> None:
        """Hold node k's link to rate_bit_s in both directions (tbf at both veth ends)."""
        rate_bytes = rate_bit_s / 8
        # The bucket: a couple of full-size frames, or 250 us of line rate at high rates. A
        # larger one lets small messages through at wire speed and bends the link's
        # latency + bytes / bandwidth line; tbf splits GSO super-packets into frames.
        burst = max(4096, int(rate_bytes * 0.00025))
        for ns, dev in ((self.nodes[k].netns, "eth0"), (self.hub, f"v{k}")):
            _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf",
                  "rate", f"{rate_bit_s}bit", "burst", str(burst), "latency", "50ms"])  # fmt: skip

    def unshape(self, k: int) -> None:
        """Remove node k's shaping (both ends)."""
        for ns, dev in ((self.nodes[k].netns, "eth0"), (self.hub, f"v{k}")):
            _run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"])

    def ns_cmd(self, k: int, argv: Sequence[str]) -> list[str]:
        """argv run inside node k's namespace."""
        return ["ip", "netns", "exec", self.nodes[k].netns, *argv]

    def hub_cmd(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the hub namespace (the coordinator's seat, 10.213.0.254)."""
        return ["ip", "netns", "exec", self.hub, *argv]

    def start(
        self,
        k: int,
        argv: Sequence[str],
        name: str,
        port: int,
        env: dict[str, str] | None = None,
    ) -> NodeProcess:
        """Start argv in node k's namespace (stdout piped, stderr to a log file)."""
        log_path = self.workdir / f"{name}.log"
        full_env = {**os.environ, **(env or {})}
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                self.ns_cmd(k, argv),
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env=full_env,
                cwd=PACKAGE_ROOT,
                start_new_session=True,  # its own process group, killed as one
            )
        node = NodeProcess(name, self.nodes[k].netns, f"{self.nodes[k].ip}:{port}", "", proc,
                           log_path)  # fmt: skip
        self.processes.append(node)
        return node

    def start_node(
        self,
        k: int,
        name: str | None = None,
        port: int = NODE_PORT,
        extra_args: Sequence[str] = (),
        host: str = "",
    ) -> NodeProcess:
        """Start `cluster-node up` in node k's namespace, on its LAN address or `host`
        (127.0.0.1: reachable only through wire relays), its data path on port +
        DATA_PORT_OFFSET; call wait_ready() before use. Without a --token in extra_args the
        node runs open (--insecure): the namespaces are this test's own network."""
        name = name or f"ns{k}"
        open_node = [] if "--token" in extra_args else ["--insecure"]
        argv = [sys.executable, "-m", "node.main", "up", "--host", host or self.nodes[k].ip,
                "--port", str(port), "--data-port", str(port + DATA_PORT_OFFSET),
                "--name", name, "--no-advertise", *open_node, *extra_args]  # fmt: skip
        # Node ids persist per name under XDG_CONFIG_HOME: keep them inside this LAN.
        env = {"XDG_CONFIG_HOME": str(self.workdir / "config"), "PYTHONUNBUFFERED": "1"}
        return self.start(k, argv, name, port, env)

    def start_wire(self, k: int, port: int, target_port: int, delay_us: float,
                   target_host: str = "", jitter_us: float = 0.0) -> NodeProcess:  # fmt: skip
        """Start a wire-delay relay (coordinator/lab/wire.py) on node k's LAN address and `port`, in
        front of `target_port` (on that address, or `target_host` in the namespace): peers
        from other namespaces see delay_us (+/- jitter_us) more one-way latency, peers in the
        same namespace none. Call wait_ready() before use."""
        ip = self.nodes[k].ip
        argv = [sys.executable, "-m", "coordinator.lab.wire", "--listen", f"{ip}:{port}",
                "--target", f"{target_host or ip}:{target_port}", "--delay-us",
                str(delay_us), "--jitter-us", str(jitter_us)]  # fmt: skip
        return self.start(k, argv, f"wire{k}-{port}", port)

    def stop(self, process: NodeProcess) -> None:
        """Stop one process this LAN started (its process group), e.g. a relay whose delay
        changes."""
        if process.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.process.pid, signal.SIGTERM)
            try:
                process.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.process.pid, signal.SIGKILL)
                process.process.wait(timeout=5)
        if process.process.stdout is not None:
            process.process.stdout.close()
        if process in self.processes:
            self.processes.remove(process)

    def wait_ready(self, nodes: Sequence[NodeProcess], timeout_s: float = 60.0) -> None:
        """Wait until every process printed its ready line (no fixed sleeps)."""
        deadline = time.monotonic() + timeout_s
        pending = {n.process.stdout: n for n in nodes if n.process.stdout is not None}
        sel = selectors.DefaultSelector()
        for stream in pending:
            sel.register(stream, selectors.EVENT_READ)
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    names = ", ".join(n.name for n in pending.values())
                    logs = "\n".join(f"--- {n.name}\n{n.log()}" for n in pending.values())
                    raise TimeoutError(f"not ready after {timeout_s}s: {names}\n{logs}")
                for key, _ in sel.select(timeout=min(left, 0.5)):
                    node = pending[key.fileobj]  # type: ignore[index]
                    line = node.process.stdout.readline() if node.process.stdout else ""
                    if not line:
                        raise RuntimeError(f"{node.name} exited early:\n{node.log()}")
                    if line.startswith((READY_PREFIX, WIRE_READY_PREFIX)):
                        parts = line.split()
                        node.node_id = parts[2] if len(parts) > 2 else ""
                        sel.unregister(key.fileobj)
                        del pending[key.fileobj]  # type: ignore[arg-type]
        finally:
            sel.close()

    def close(self) -> None:
        for node in self.processes:
            proc = node.process
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for node in self.processes:
            proc = node.process
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        self.processes.clear()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        self._made.clear()
        self.nodes.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
