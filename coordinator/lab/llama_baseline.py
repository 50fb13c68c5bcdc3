"""The llama.cpp baseline: greedy generation on a GGUF model, locally or over ggml RPC servers.

Every speed claim LayerLink makes is measured next to llama.cpp on the same weights. This
module runs llama.cpp (through llama-cpp-python's C API) in a **child process**, because a
llama.cpp client whose RPC server disappears aborts the whole process: the parent survives,
reports which servers stopped answering, and never waits longer than its timeout.

In the child, before the model loads, each server endpoint is added with
`ggml_backend_rpc_add_server` and registered with `ggml_backend_register` on the libggml
copy that libllama links (`node.llama_rpc.load_ggml`), so llama.cpp's default device
selection would see them too (RPC devices first). The model then loads with the RPC devices
also listed explicitly, in the order given, so that local GPUs of a CUDA build cannot shift
the split, and with a layer split computed from the requested per-server layer counts. The layer -> device assignment is read back from llama.cpp's own
load log, so a result proves where the layers were, not where they were asked to be.

Layer ranges: with servers S0..Sk-1 holding c0..ck-1 layers, and n layers in the model, the
first n - sum(c) layers stay in the client process (CPU), then S0 holds the next c0, and so
on; the output layer (final norm + lm_head, reported as layer n) goes to the last server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

log = logging.getLogger(__name__)

_LAYER_LINE = re.compile(r"layer\s+(\d+) assigned to device (\S+?),")
_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")


class LlamaBaselineError(RuntimeError):
    """llama.cpp failed, timed out, or lost an RPC server; the message says which."""


@dataclass(frozen=True)
class LayerPlacement:
    """Where llama.cpp put one layer. `layer == n_layers` is the output layer."""

    layer: int
    device: str  # ggml device name: "CPU", "RPC0", ...
    endpoint: str | None  # "host:port" of the RPC server, None when in the client process


@dataclass(frozen=True)
class BaselineResult:
    """Greedy tokens and timings of one llama.cpp run.

    prefill_s: the prompt's forward pass plus picking the first generated token.
    decode_s: one entry per later token (forward pass of the previous token + argmax),
    so len(decode_s) == len(tokens) - 1. The warm-up run, if any, is not included.
    """

    tokens: tuple[int, ...]
    prompt_tokens: int
    prefill_s: float
    decode_s: tuple[float, ...]
    n_layers: int
    placements: tuple[LayerPlacement, ...]
    servers: tuple[str, ...]
    buffers_mib: tuple[tuple[str, float], ...]  # (device, model weights on it) as llama.cpp logs

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second from the median decode step."""
        return 1.0 / median(self.decode_s) if self.decode_s else 0.0

    def layers_on(self, endpoint: str | None) -> list[int]:
        """Repeating layers (not the output layer) placed on `endpoint` (None: the client)."""
        return [
            p.layer for p in self.placements if p.endpoint == endpoint and p.layer < self.n_layers
        ]


def run_llama(
    model: Path,
    prompt: Sequence[int],
    n_gen: int,
    servers: Sequence[str] = (),
    layers_per_server: Sequence[int] | None = None,
    threads: int | None = None,
    warmup: bool = True,
    timeout_s: float = 120.0,
    on_progress: Callable[[str], None] | None = None,
) -> BaselineResult:
    """Greedy-generate `n_gen` tokens after `prompt` (token ids) with llama.cpp.

    With `servers` ("host:port" of running ggml RPC servers, each used by this client only),
    `layers_per_server[i]` layers go to server i (default: an even split of all layers).
    `on_progress` is called in this process with "loaded" and "prefilled" as the child passes
    those points. Raises LlamaBaselineError on any failure, at the latest after `timeout_s`.
    """
    if n_gen < 1 or not prompt:
        raise ValueError("need a non-empty prompt and n_gen >= 1")
    if layers_per_server is not None and len(layers_per_server) != len(servers):
        raise ValueError("layers_per_server needs one count per server")
    if layers_per_server is not None and any(c < 1 for c in layers_per_server):
        raise ValueError("every server needs at least one layer")
    request = {
        "model": str(Path(model).resolve()),
        "prompt": [int(t) for t in prompt],
        "n_gen": int(n_gen),
        "servers": list(servers),
        "layers_per_server": list(layers_per_server) if layers_per_server is not None else None,
        "threads": int(threads or os.cpu_count() or 1),
        "warmup": bool(warmup),
    }
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    # On abort ggml attaches gdb to print a backtrace (seconds, pages of output); the error
    # line before it says what happened.
    env.setdefault("GGML_NO_BACKTRACE", "1")
    read_fd, write_fd = os.pipe()
    with tempfile.TemporaryFile() as output:
        proc = subprocess.Popen(
            [sys.executable, "-m", "coordinator.lab.llama_baseline", str(write_fd)],
            stdin=subprocess.PIPE,
            stdout=output,
            stderr=subprocess.STDOUT,
            pass_fds=(write_fd,),
            env=env,
        )
        os.close(write_fd)
        try:
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(request).encode())
            proc.stdin.close()
            result = _collect(proc, read_fd, time.monotonic() + timeout_s, on_progress)
        except LlamaBaselineError as e:
            message = str(e)
            dead = unreachable(servers)
            if dead:
                message += f"; RPC server(s) not answering: {', '.join(dead)}"
            output.seek(0)
            tail = output.read().decode(errors="replace")[-3000:]
            raise LlamaBaselineError(
                f"{message}\n--- llama.cpp output (tail) ---\n{tail}"
            ) from None
        finally:
            os.close(read_fd)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    return result


def _collect(
    proc: subprocess.Popen[bytes],
    fd: int,
    deadline: float,
    on_progress: Callable[[str], None] | None,
) -> BaselineResult:
    """Read the child's event lines until its result, its death or the deadline."""
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            raise LlamaBaselineError(
                "llama.cpp did not finish in time and was killed (a ggml RPC server serves one "
                "client at a time: is another client using it? is a server stopped?)"
            )
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:  # the child closed its end: finished or died
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            event = json.loads(line)
            if event["event"] == "result":
                return _result_from(event)
            if event["event"] == "error":
                raise LlamaBaselineError(str(event["message"]))
            if on_progress is not None:
                on_progress(str(event["event"]))
    code = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    raise LlamaBaselineError(f"llama.cpp client died ({how}) before finishing")


def _result_from(event: dict[str, Any]) -> BaselineResult:
    return BaselineResult(
        tokens=tuple(event["tokens"]),
        prompt_tokens=int(event["prompt_tokens"]),
        prefill_s=float(event["prefill_s"]),
        decode_s=tuple(event["decode_s"]),
        n_layers=int(event["n_layers"]),
        placements=tuple(LayerPlacement(int(p[0]), str(p[1]), p[2]) for p in event["placements"]),
        servers=tuple(event["servers"]),
        buffers_mib=tuple((str(d), float(m)) for d, m in event["buffers_mib"]),
    )


def unreachable(servers: Sequence[str], timeout: float = 1.0) -> list[str]:
    """The endpoints among `servers` that refuse TCP connections now."""
    dead = []
    for ep in servers:
        host, _, port = ep.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                pass
        except OSError:
            dead.append(ep)
    return dead


def tensor_split(n_layers: int, counts: Sequence[int]) -> tuple[int, list[float]]:
    """(n_gpu_layers, split weights) that put exactly counts[i] layers on device i.

    llama.cpp offloads the last n_gpu_layers of the n_layers + 1 "layers" (the +1 is the
    output layer) and gives layer il to the first device whose cumulative split fraction
    exceeds (il - first_offloaded) / n_gpu_layers. Boundaries are put half a layer before
    each count's end, so float rounding cannot move a layer across a boundary.
    """
    local = n_layers - sum(counts)
    if local < 0:
        raise ValueError(f"{sum(counts)} layers requested, the model has {n_layers}")
    n_gpu = n_layers + 1 - local
    cuts, total = [0.0], 0
    for c in counts[:-1]:
        total += c
        cuts.append(total - 0.5)
    cuts.append(float(n_gpu))
    return n_gpu, [b - a for a, b in zip(cuts, cuts[1:], strict=False)]


def even_counts(n_layers: int, parts: int) -> list[int]:
    base, extra = divmod(n_layers, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ----------------------------------------------------------------------------------------
# The child process: everything below runs inside `python -m coordinator.lab.llama_baseline`.


class _Events:
    def __init__(self, fd: int) -> None:
        self._f = os.fdopen(fd, "wb", buffering=0)

    def send(self, event: str, **fields: Any) -> None:
        self._f.write(json.dumps({"event": event, **fields}).encode() + b"\n")


def _block_count(model: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(model)
    arch = reader.fields["general.architecture"].contents()
    return int(reader.fields[f"{arch}.block_count"].contents())


def _child(request: dict[str, Any], events: _Events) -> None:  # noqa: C901 - one linear script
    import ctypes

    import llama_cpp as L

    from node.llama_rpc import load_ggml

    log_lines: list[str] = []

    @L.llama_log_callback  # type: ignore[untyped-decorator]
    def on_log(level: int, text: bytes, user_data: object) -> None:
        line = text.decode(errors="replace")
        log_lines.append(line)
        if level >= 3:  # warnings and errors also go to the output the parent keeps
            sys.stderr.write(line)

    api = load_ggml()
    L.llama_log_set(on_log, None)
    L.llama_backend_init()

    servers: list[str] = request["servers"]
    model_path = Path(request["model"])
    n_layers = _block_count(model_path)
    device_endpoint: dict[str, str] = {}
    devices: list[int] = []
    add_server = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(
        api.rpc_proc("ggml_backend_rpc_add_server")
    )
    for ep in servers:
        reg = add_server(ep.encode())
        if not reg:
            raise LlamaBaselineError(f"RPC server {ep} reports no devices")
        api.lib.ggml_backend_register(reg)
        n_dev = api.lib.ggml_backend_reg_dev_count(reg)
        if n_dev != 1:
            raise LlamaBaselineError(f"RPC server {ep} has {n_dev} devices; LayerLink starts one")
        dev = int(api.lib.ggml_backend_reg_dev_get(reg, 0))
        devices.append(dev)
        device_endpoint[api.dev_name(dev)] = api.dev_description(dev)

    params = L.llama_model_default_params()
    keep: list[object] = []  # ctypes arrays must outlive the load call
    if servers:
        counts = request["layers_per_server"] or even_counts(n_layers, len(servers))
        n_gpu, split = tensor_split(n_layers, counts)
        splits = (ctypes.c_float * L.llama_max_devices())(*split)
        dev_list = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
        keep += [splits, dev_list]
        params.n_gpu_layers = n_gpu
        params.split_mode = L.LLAMA_SPLIT_MODE_LAYER
        params.tensor_split = splits
        params.devices = ctypes.cast(dev_list, ctypes.c_void_p)
    else:
        params.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(model_path).encode(), params)
    if not model:
        raise LlamaBaselineError(f"llama.cpp could not load {model_path}")

    prompt: list[int] = request["prompt"]
    n_gen: int = request["n_gen"]
    threads: int = request["threads"]
    cparams = L.llama_context_default_params()
    cparams.n_ctx = len(prompt) + n_gen + 8
    cparams.n_batch = max(len(prompt), 32)
    cparams.n_ubatch = cparams.n_batch
    cparams.n_threads = threads
    cparams.n_threads_batch = threads
    cparams.no_perf = True
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise LlamaBaselineError("llama.cpp could not create a context")
    sampler = L.llama_sampler_init_greedy()
    events.send("loaded")

    def step(tokens: list[int]) -> int:
        arr = (L.llama_token * len(tokens))(*tokens)
        rc = L.llama_decode(ctx, L.llama_batch_get_one(arr, len(tokens)))
        if rc != 0:
            raise LlamaBaselineError(f"llama_decode returned {rc}")
        return int(L.llama_sampler_sample(sampler, ctx, -1))

    if request["warmup"]:
        step([prompt[-1]] if len(prompt) > 1 else prompt)
        step([prompt[0]])
        L.llama_memory_clear(L.llama_get_memory(ctx), True)

    t0 = time.perf_counter()
    token = step(prompt)
    prefill_s = time.perf_counter() - t0
    events.send("prefilled")
    out = [token]
    decode_s: list[float] = []
    for _ in range(n_gen - 1):
        t0 = time.perf_counter()
        token = step([token])
        decode_s.append(time.perf_counter() - t0)
        out.append(token)

    placements = []
    buffers = []
    for line in log_lines:
        if m := _LAYER_LINE.search(line):
            dev_name = m[2]
            placements.append((int(m[1]), dev_name, device_endpoint.get(dev_name)))
        elif m := _BUFFER_LINE.search(line):
            buffers.append((m[1], float(m[2])))
    events.send(
        "result",
        tokens=out,
        prompt_tokens=len(prompt),
        prefill_s=prefill_s,
        decode_s=decode_s,
        n_layers=n_layers,
        placements=placements,
        servers=servers,
        buffers_mib=buffers,
    )
    L.llama_sampler_free(sampler)
    L.llama_free(ctx)
    L.llama_model_free(model)
    del keep


def _child_main(argv: list[str]) -> int:
    events = _Events(int(argv[0]))
    request = json.loads(sys.stdin.read())
    try:
        _child(request, events)
    except Exception as e:  # reported to the parent, which raises it as LlamaBaselineError
        events.send("error", message=f"{type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(_child_main(sys.argv[1:]))
