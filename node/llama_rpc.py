"""llama.cpp's ggml RPC server, run from llama-cpp-python's libraries through ctypes.

The llama.cpp baseline puts model layers on remote machines through ggml's RPC backend.
llama-cpp-python (built with `-DGGML_RPC=ON`) ships `libggml-rpc` but no `rpc-server`
binary, so this module starts the server itself: it looks up
`ggml_backend_rpc_start_server` on the "RPC" backend registry of libggml and calls it with an
endpoint and its devices (the build's GPUs when it has any — CUDA, Metal — else the CPU). That
call never returns, so the server lives in a child process
(`python -m node.llama_rpc`) and stops when that process is killed.

Traps this module handles (see docs/design "Baseline"):

- The wheel installs `libggml.so` and `libggml.so.0` as two *separate copies*. libllama links
  `libggml.so.0`; state registered through the other copy is invisible to libllama. `load_ggml`
  opens the copy libllama links and checks that no other copy is mapped.
- The server has no authentication and serves one client at a time: bind it to the cluster
  interface only (the default is loopback, never 0.0.0.0), and give each client its own server.
- Client and server must speak the same protocol major version (7 in llama-cpp-python 0.3.36).
  The library has no getter for it; the server prints it in its start banner
  ("Starting RPC server v7.0.0"), which `LlamaRpcServer` parses and checks against
  `RPC_PROTOCOL_MAJOR`.

Nothing here runs at import time; llama_cpp is imported only when a function needs it.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# The RPC protocol major version of the llama.cpp that llama-cpp-python 0.3.36 vendors
# (RPC_PROTO_MAJOR_VERSION in ggml-rpc.h). libggml-rpc exports no getter for it, so it is a
# constant here, checked at run time against the banner every server prints and, where the
# wheel installed its headers, against the installed ggml-rpc.h (`installed_protocol_version`).
RPC_PROTOCOL_MAJOR = 7

_BANNER = re.compile(r"Starting RPC server v(\d+)\.(\d+)\.(\d+)")
_HEADER_DEFINE = re.compile(r"#define\s+RPC_PROTO_(MAJOR|MINOR|PATCH)_VERSION\s+(\d+)")
# Shared-library names of libggml, the one libllama links first.
_GGML_NAMES = ("libggml.so.0", "libggml.0.dylib", "libggml.dylib", "libggml.so")

GGML_BACKEND_DEVICE_TYPE_CPU = 0
GGML_BACKEND_DEVICE_TYPE_GPU = 1
GGML_BACKEND_DEVICE_TYPE_IGPU = 2


def choose_server_devices(devices: list[tuple[int, int, str]]) -> list[int]:
    """Of (handle, ggml device type, name), what a server offers its client: the build's GPUs
    (CUDA, Metal, Vulkan; discrete or integrated) when it has any, so the baseline runs where
    LayerLink's MLX does, else its CPU. RPC devices (other servers) are never re-served."""
    gpus = [
        h
        for h, kind, name in devices
        if kind in (GGML_BACKEND_DEVICE_TYPE_GPU, GGML_BACKEND_DEVICE_TYPE_IGPU)
        and not name.upper().startswith("RPC")
    ]
    return gpus or [h for h, kind, _ in devices if kind == GGML_BACKEND_DEVICE_TYPE_CPU]


class LlamaRpcError(RuntimeError):
    """The llama.cpp RPC backend is unavailable, or a server failed to start."""


def llama_cpp_dir() -> Path:
    """The installed llama_cpp package folder (without importing it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise LlamaRpcError(
            "llama_cpp is not installed: `make install` builds llama-cpp-python with GGML_RPC=ON"
        )
    return Path(spec.origin).parent


def installed_protocol_version() -> tuple[int, int, int] | None:
    """(major, minor, patch) from the installed ggml-rpc.h, or None if no header was installed."""
    candidates = [
        llama_cpp_dir().parent / "include" / "ggml-rpc.h",
        llama_cpp_dir() / "include" / "ggml-rpc.h",
    ]
    for header in candidates:
        if header.is_file():
            found = dict(_HEADER_DEFINE.findall(header.read_text()))
            if len(found) == 3:
                return int(found["MAJOR"]), int(found["MINOR"]), int(found["PATCH"])
    return None


def protocol_version() -> int:
    """The RPC protocol major version this node's llama.cpp speaks (advertised over mDNS)."""
    installed = installed_protocol_version()
    if installed is not None and installed[0] != RPC_PROTOCOL_MAJOR:
        log.warning(
            "installed ggml-rpc.h says RPC protocol v%d, this code expects v%d",
            installed[0],
            RPC_PROTOCOL_MAJOR,
        )
        return installed[0]
    return RPC_PROTOCOL_MAJOR


def _mapped_ggml_copies() -> set[str]:
    """Paths of every libggml file mapped into this process (Linux; empty elsewhere)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return set()
    found = set()
    for line in maps.read_text().splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        name = os.path.basename(path)
        if name.startswith("libggml.") or name == "libggml.dylib":
            found.add(os.path.realpath(path))
    return found


class GgmlApi:
    """The few ggml backend-registry functions the RPC server and client need, typed."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.lib = lib
        self.path = path
        vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        self._fn("ggml_backend_reg_by_name", vp, [cp])
        self._fn("ggml_backend_reg_get_proc_address", vp, [vp, cp])
        self._fn("ggml_backend_reg_name", cp, [vp])
        self._fn("ggml_backend_reg_dev_count", sz, [vp])
        self._fn("ggml_backend_reg_dev_get", vp, [vp, sz])
        self._fn("ggml_backend_register", None, [vp])
        self._fn("ggml_backend_dev_count", sz, [])
        self._fn("ggml_backend_dev_get", vp, [sz])
        self._fn("ggml_backend_dev_name", cp, [vp])
        self._fn("ggml_backend_dev_description", cp, [vp])
        self._fn("ggml_backend_dev_type", ctypes.c_int, [vp])

    def _fn(self, name: str, restype: object, argtypes: list[object]) -> None:
        f = getattr(self.lib, name)
        f.restype = restype
        f.argtypes = argtypes

    def rpc_registry(self) -> int:
        reg = self.lib.ggml_backend_reg_by_name(b"RPC")
        if not reg:
            raise LlamaRpcError(
                f"{self.path} has no RPC backend: llama-cpp-python was built without GGML_RPC=ON"
            )
        return int(reg)

    def rpc_proc(self, name: str) -> int:
        addr = self.lib.ggml_backend_reg_get_proc_address(self.rpc_registry(), name.encode())
        if not addr:
            raise LlamaRpcError(f"the RPC backend does not export {name}")
        return int(addr)

    def devices(self) -> list[int]:
        return [
            int(self.lib.ggml_backend_dev_get(i)) for i in range(self.lib.ggml_backend_dev_count())
        ]

    def cpu_devices(self) -> list[int]:
        return [
            d
            for d in self.devices()
            if self.lib.ggml_backend_dev_type(d) == GGML_BACKEND_DEVICE_TYPE_CPU
        ]

    def server_devices(self) -> list[int]:
        return choose_server_devices(
            [(d, int(self.lib.ggml_backend_dev_type(d)), self.dev_name(d)) for d in self.devices()]
        )

    def dev_name(self, dev: int) -> str:
        return bytes(self.lib.ggml_backend_dev_name(dev)).decode()

    def dev_description(self, dev: int) -> str:
        return bytes(self.lib.ggml_backend_dev_description(dev)).decode()


def load_ggml() -> GgmlApi:
    """Open the libggml copy that libllama links, after libllama itself.

    Importing llama_cpp loads libllama, whose loader maps its libggml; opening that same file
    again returns the same handle. Registering backends on any other copy is silently ignored
    by libllama, so this fails loudly if a second copy is mapped.
    """
    import llama_cpp  # noqa: F401  (loads libllama and, through it, the right libggml)

    lib_dir = llama_cpp_dir() / "lib"
    for name in _GGML_NAMES:
        path = lib_dir / name
        if path.is_file():
            break
    else:
        raise LlamaRpcError(f"no libggml in {lib_dir}")
    lib = ctypes.CDLL(str(path))
    mapped = _mapped_ggml_copies()
    if len(mapped) > 1:
        raise LlamaRpcError(
            f"two copies of libggml are loaded ({', '.join(sorted(mapped))}): RPC devices "
            "registered on one are invisible to libllama; import llama_cpp._ggml nowhere"
        )
    if mapped and os.path.realpath(path) not in mapped:
        raise LlamaRpcError(f"libllama uses {mapped.pop()}, not {path}")
    return GgmlApi(lib, path)


def _unbuffer_c_stdout() -> None:
    """Make C's stdout unbuffered so the server's banner reaches a pipe at once."""
    libc = ctypes.CDLL(None)
    stdout = ctypes.c_void_p.in_dll(libc, "stdout")
    libc.setvbuf.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t]
    libc.setvbuf(stdout, None, 2, 0)  # _IONBF


def serve_forever(host: str, port: int, threads: int) -> None:
    """Run the ggml RPC server on host:port with this machine's GPUs as the build registers
    them (CUDA, Metal), else its CPU device. Never returns unless the server fails to start
    (then it returns after printing why)."""
    api = load_ggml()
    start = ctypes.CFUNCTYPE(
        None,
        ctypes.c_char_p,  # endpoint "host:port"
        ctypes.c_char_p,  # cache_dir (NULL: no local tensor cache)
        ctypes.c_size_t,  # n_threads
        ctypes.c_size_t,  # n_devices
        ctypes.POINTER(ctypes.c_void_p),  # ggml_backend_dev_t * devices
    )(api.rpc_proc("ggml_backend_rpc_start_server"))
    chosen = api.server_devices()
    if not chosen:
        raise LlamaRpcError("ggml reports no GPU and no CPU device")
    log.info("serving %s", ", ".join(api.dev_description(d) for d in chosen))
    devices = (ctypes.c_void_p * len(chosen))(*chosen)
    _unbuffer_c_stdout()
    start(f"{host}:{port}".encode(), None, threads, len(chosen), devices)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RpcEndpoint:
    """Where a running llama.cpp RPC server listens, and the protocol it speaks."""

    host: str
    port: int
    protocol_version: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class LlamaRpcServer:
    """A ggml RPC server in a child process.

    `port=0` picks a free port (the server binds it a moment later; if another process takes
    it in between, start() tries again with a new one). start() returns once the server
    accepts TCP connections; stop() kills the process.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, threads: int | None = None) -> None:
        self.host = host
        self._requested_port = port
        self._port = port
        self.threads = threads or os.cpu_count() or 1
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lines: deque[str] = deque(maxlen=200)
        self._version: tuple[int, int, int] | None = None
        self._banner = threading.Event()

    @property
    def port(self) -> int:
        return self._port

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self._port}"

    @property
    def protocol_version(self) -> int:
        """The protocol major version the running server announced."""
        if self._version is None:
            raise LlamaRpcError("the server has not started")
        return self._version[0]

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def info(self) -> RpcEndpoint:
        return RpcEndpoint(self.host, self._port, self.protocol_version)

    def output(self) -> str:
        """The server's recent output (banner, connections, errors)."""
        return "\n".join(self._lines)

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 30.0) -> LlamaRpcServer:
        attempts = 3 if self._requested_port == 0 else 1
        for attempt in range(attempts):
            self._port = self._requested_port or _free_port(self.host)
            try:
                self._start_once(timeout)
                return self
            except LlamaRpcError:
                self.stop()
                if attempt + 1 == attempts:
                    raise
                log.info("RPC server on %s did not start, retrying on another port", self.endpoint)
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        self._banner.clear()
        self._version = None
        self._lines.clear()
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        cmd = [
            sys.executable,
            "-m",
            "node.llama_rpc",
            "--host",
            self.host,
            "--port",
            str(self._port),
            "--threads",
            str(self.threads),
        ]
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        self._reader = threading.Thread(
            target=self._read, args=(self._proc,), name=f"llama-rpc-{self._port}", daemon=True
        )
        self._reader.start()
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                self._reader.join(timeout=2)
                raise LlamaRpcError(
                    f"llama.cpp RPC server on {self.endpoint} exited with {self._proc.returncode}:"
                    f"\n{self.output()}"
                )
            if self._banner.is_set() and self._accepts_connections():
                break
            if time.monotonic() > deadline:
                raise LlamaRpcError(
                    f"llama.cpp RPC server on {self.endpoint} not ready within {timeout:.0f}s:"
                    f"\n{self.output()}"
                )
            time.sleep(0.02)
        assert self._version is not None
        if self._version[0] != RPC_PROTOCOL_MAJOR:
            raise LlamaRpcError(
                f"RPC server speaks protocol v{self._version[0]}, LayerLink expects "
                f"v{RPC_PROTOCOL_MAJOR}: install llama-cpp-python 0.3.36"
            )
        log.info(
            "llama.cpp RPC server v%d.%d.%d on %s (pid %d)",
            *self._version,
            self.endpoint,
            self._proc.pid,
        )

    def _accepts_connections(self) -> bool:
        # A probe connection is accepted and closed at once; the server then waits for
        # the next client, so probing does not take the one client slot.
        try:
            with socket.create_connection((self.host, self._port), timeout=0.5):
                return True
        except OSError:
            return False

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._lines.append(line)
            m = _BANNER.search(line)
            if m:
                self._version = (int(m[1]), int(m[2]), int(m[3]))
                self._banner.set()
            log.debug("rpc %s: %s", self._port, line)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if proc.stdout is not None:
            proc.stdout.close()

    def kill(self) -> None:
        """Kill the server abruptly (SIGKILL), as a crashed machine would vanish."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)

    def __enter__(self) -> LlamaRpcServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m node.llama_rpc",
        description="Run llama.cpp's ggml RPC server (no authentication: bind the cluster "
        "interface only).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    parser.add_argument("--port", type=int, required=True, help="TCP port")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        serve_forever(args.host, args.port, args.threads)
    except LlamaRpcError as e:
        log.error("%s", e)
        return 2
    return 1  # the server only returns when it could not start (it printed why)


if __name__ == "__main__":
    sys.exit(main())
