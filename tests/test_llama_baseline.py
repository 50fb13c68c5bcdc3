"""The llama.cpp baseline: same greedy tokens as mlx_lm, layers really on RPC servers, and a
dead or stuck server gives a clear error instead of a crash or a hang."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python (built with GGML_RPC=ON) is not installed"
)

from coordinator.lab.llama_baseline import (  # noqa: E402
    BaselineResult,
    LlamaBaselineError,
    run_llama,
    tensor_split,
)
from node.llama_rpc import (  # noqa: E402
    RPC_PROTOCOL_MAJOR,
    LlamaRpcServer,
    installed_protocol_version,
)

N_TOKENS = 32
PROMPT_TEXT = "The harbour town woke slowly on the first cold morning"

ModelFactory = Callable[..., Path]


def mlx_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, _ = load(str(model_dir))
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=make_sampler(0.0))
    return [int(t) for (t, _), _i in zip(steps, range(n), strict=False)]


def prompt_ids(model_dir: Path) -> list[int]:
    from tokenizers import Tokenizer

    ids: list[int] = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(PROMPT_TEXT).ids
    return ids


@pytest.fixture(scope="module")
def llama_model(model_factory: ModelFactory) -> Path:
    return model_factory("tiny", "llama", gguf=True)


@pytest.fixture(scope="module")
def local_run(llama_model: Path) -> BaselineResult:
    return run_llama(llama_model / "model.gguf", prompt_ids(llama_model), N_TOKENS, threads=2)


@pytest.fixture
def servers() -> Iterator[tuple[LlamaRpcServer, LlamaRpcServer]]:
    a = LlamaRpcServer("127.0.0.1", 0, threads=1)
    b = LlamaRpcServer("127.0.0.1", 0, threads=1)
    try:
        a.start()
        b.start()
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_rpc_server_lifecycle() -> None:
    server = LlamaRpcServer("127.0.0.1", 0, threads=1).start()
    try:
        assert server.port > 0
        assert server.protocol_version == RPC_PROTOCOL_MAJOR
        installed = installed_protocol_version()
        if installed is not None:
            assert installed[0] == server.protocol_version
        with socket.create_connection(("127.0.0.1", server.port), timeout=2):
            pass
        pid = server.pid
        assert pid is not None
    finally:
        server.stop()
    assert not server.running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server.port), timeout=2):
        pass


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_process_matches_mlx_lm(model_factory: ModelFactory, arch: str) -> None:
    model_dir = model_factory("tiny", arch, gguf=True)
    prompt = prompt_ids(model_dir)
    want = mlx_greedy(model_dir, prompt, N_TOKENS)
    got = run_llama(model_dir / "model.gguf", prompt, N_TOKENS, threads=2)
    assert list(got.tokens) == want
    assert len(set(want)) >= 8
    assert got.prompt_tokens == len(prompt)
    assert len(got.decode_s) == N_TOKENS - 1 and got.prefill_s > 0
    assert {p.device for p in got.placements} == {"CPU"}
    assert got.layers_on(None) == list(range(got.n_layers))


@pytest.mark.parametrize("counts", [[4, 4], [3, 5]])
def test_layers_on_two_rpc_servers(
    llama_model: Path,
    local_run: BaselineResult,
    servers: tuple[LlamaRpcServer, LlamaRpcServer],
    counts: list[int],
) -> None:
    a, b = servers
    got = run_llama(
        llama_model / "model.gguf",
        prompt_ids(llama_model),
        N_TOKENS,
        servers=[a.endpoint, b.endpoint],
        layers_per_server=counts,
        threads=1,
    )
    assert got.layers_on(a.endpoint) == list(range(counts[0]))
    assert got.layers_on(b.endpoint) == list(range(counts[0], 8))
    assert got.layers_on(None) == []
    (output,) = [p for p in got.placements if p.layer == got.n_layers]
    assert output.endpoint == b.endpoint
    on_servers = {dev: mib for dev, mib in got.buffers_mib if dev.startswith("RPC")}
    assert any(a.endpoint in dev and mib > 1 for dev, mib in on_servers.items()), got.buffers_mib
    assert any(b.endpoint in dev and mib > 1 for dev, mib in on_servers.items()), got.buffers_mib
    assert got.tokens == local_run.tokens


def test_first_layers_can_stay_in_the_client(
    llama_model: Path, local_run: BaselineResult, servers: tuple[LlamaRpcServer, LlamaRpcServer]
) -> None:
    a, _ = servers
    got = run_llama(
        llama_model / "model.gguf",
        prompt_ids(llama_model),
        N_TOKENS,
        servers=[a.endpoint],
        layers_per_server=[5],
        threads=1,
    )
    assert got.layers_on(None) == [0, 1, 2]
    assert got.layers_on(a.endpoint) == [3, 4, 5, 6, 7]
    assert got.tokens == local_run.tokens


def test_killed_server_gives_clear_error(
    llama_model: Path, servers: tuple[LlamaRpcServer, LlamaRpcServer]
) -> None:
    a, b = servers
    events: list[str] = []

    def kill_b_after_prefill(event: str) -> None:
        events.append(event)
        if event == "prefilled":
            b.kill()

    start = time.monotonic()
    with pytest.raises(LlamaBaselineError) as err:
        run_llama(
            llama_model / "model.gguf",
            prompt_ids(llama_model),
            1900,
            servers=[a.endpoint, b.endpoint],
            threads=1,
            timeout_s=60,
            on_progress=kill_b_after_prefill,
        )
    # "died" (not "did not finish in time"): the client's death was noticed, not the timeout.
    print(f"the dead server was reported after {time.monotonic() - start:.1f} s")
    assert events == ["loaded", "prefilled"]
    message = str(err.value)
    assert "died" in message
    assert b.endpoint in message and a.endpoint not in message.split("\n")[0]
    assert a.running()


def test_stuck_server_times_out(
    llama_model: Path, servers: tuple[LlamaRpcServer, LlamaRpcServer]
) -> None:
    a, _ = servers
    assert a.pid is not None
    os.kill(a.pid, signal.SIGSTOP)  # accepts TCP (kernel backlog) but never answers
    try:
        start = time.monotonic()
        with pytest.raises(LlamaBaselineError, match="did not finish in time"):
            run_llama(
                llama_model / "model.gguf",
                prompt_ids(llama_model),
                4,
                servers=[a.endpoint],
                threads=1,
                timeout_s=3,
            )
        # The message is the timeout's own: the 3 s deadline stopped the stuck run.
        print(f"stopped after {time.monotonic() - start:.1f} s")
    finally:
        os.kill(a.pid, signal.SIGCONT)


def _simulate_llama_cpp_split(n_layers: int, counts: list[int]) -> list[int]:
    """Device index per layer (-1: client CPU), by llama.cpp's rule in float32."""
    n_gpu, split = tensor_split(n_layers, counts)
    cum = np.cumsum(np.array(split, dtype=np.float32), dtype=np.float32)
    cum = (cum / np.float32(cum[-1])).astype(np.float32)
    first = n_layers + 1 - n_gpu
    out = []
    for il in range(n_layers + 1):
        if il < first:
            out.append(-1)
            continue
        pos = np.float32(il - first) / np.float32(n_gpu)
        out.append(int(np.searchsorted(cum, pos, side="right")))
    return out


@pytest.mark.parametrize(
    ("n_layers", "counts"),
    [
        (8, [4, 4]),
        (8, [3, 5]),
        (8, [1, 7]),
        (12, [5, 4, 3]),
        (80, [27, 26, 27]),
        (32, [7]),
        (61, [1, 1, 1, 58]),
    ],
)
def test_tensor_split_gives_exact_counts(n_layers: int, counts: list[int]) -> None:
    placed = _simulate_llama_cpp_split(n_layers, counts)
    local = n_layers - sum(counts)
    assert placed[:local] == [-1] * local
    for i, c in enumerate(counts):
        assert placed[:n_layers].count(i) == c
    assert placed[n_layers] == len(counts) - 1  # output layer on the last server


def test_second_libggml_copy_is_refused() -> None:
    import subprocess
    import sys

    code = (
        "import ctypes, llama_cpp\n"
        "from node.llama_rpc import LlamaRpcError, llama_cpp_dir, load_ggml\n"
        "ctypes.CDLL(str(llama_cpp_dir() / 'lib' / 'libggml.so'))  # the copy libllama does not use\n"
        "try:\n"
        "    load_ggml()\n"
        "except LlamaRpcError as e:\n"
        "    print('refused:', e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused: two copies of libggml" in proc.stdout


def test_server_offers_the_builds_gpus_before_its_cpu() -> None:
    """On a CUDA or Metal build the baseline's servers run on the GPU, as LayerLink's MLX
    does (today's machines have only the CPU device: this checks the choice itself)."""
    from node import llama_rpc as r

    CPU, GPU, IGPU = r.GGML_BACKEND_DEVICE_TYPE_CPU, r.GGML_BACKEND_DEVICE_TYPE_GPU, r.GGML_BACKEND_DEVICE_TYPE_IGPU
    choose_server_devices = r.choose_server_devices
    assert choose_server_devices([(1, CPU, "CPU"), (2, GPU, "CUDA0"), (3, GPU, "CUDA1")]) == [2, 3]
    assert choose_server_devices([(1, CPU, "CPU"), (4, IGPU, "Metal")]) == [4]
    assert choose_server_devices([(1, CPU, "CPU"), (5, GPU, "RPC[10.0.0.2:50052]")]) == [1]
    assert choose_server_devices([(1, CPU, "CPU"), (6, 3, "BLAS")]) == [1]
