"""Benchmarks: LayerLink's decode speed next to mlx_lm and llama.cpp, on the same weights and
the same layer split, measured in one run so that ratios between them are comparable.

What the numbers mean (every run generates exactly `gen_tokens` tokens, no stop token):

- ms_per_token: time from the first generated token to the last, divided by the tokens after
  the first (prefill excluded); the median over repeats. decode_tps = 1000 / ms_per_token.
- ttft_s: prompt in -> first token out (prefill and one sample); prefill_tps = prompt / TTFT.
- per_hop_ms: (ms/token with k stages - ms/token with 1 stage of the same system and the same
  deployment) / (k - 1). Both 1-stage references already pay one client <-> worker round trip
  (LayerLink: coordinator <-> one node; llama.cpp: client <-> one RPC server holding every
  layer), so the difference is what the k - 1 added stage boundaries cost per token.
- Warm-up: every configuration generates once before it is timed (llama.cpp: the client's own
  warm-up decode, inside its process), and that run is not counted.
- Repeats are interleaved: repeat r of every configuration runs before repeat r + 1 of any, so
  a burst of load from other processes falls on all of them alike. Medians, never means.

llama.cpp with k stages: k RPC servers hold the layers (the same counts as LayerLink's k nodes)
and its client holds none, as LayerLink's coordinator holds none. Where the layers really went
is read back from llama.cpp's load log (and, for LayerLink, from each node's GetInfo), and a run
whose layers are not where they were asked to be is reported as an error.

Failures (a node or RPC server gone, a timeout) end that configuration with an error in the
report; the others go on. Nothing here waits without a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import grpc

from coordinator.lab import ringfloor
from coordinator.pipeline import GenerationParams, Pipeline, PipelineError
from coordinator.plan import Plan, Stage
from coordinator.session import ModelInfo, even_counts

log = logging.getLogger(__name__)

SYSTEM_MLX_LM = "mlx_lm"
SYSTEM_LAYERLINK = "layerlink"
SYSTEM_LLAMA = "llama.cpp"
SYSTEM_FLOOR = "floor"  # a bare ring of processes (coordinator/lab/ringfloor.py)

DEPLOY_IN_PROCESS = "in-process"  # the engine alone, in this process
DEPLOY_LOOPBACK = "loopback"  # worker processes on 127.0.0.1
DEFAULT_SAMPLE_TIMEOUT_S = 120.0
# One thread per llama.cpp process by default: ggml's CPU workers spin while they wait, and on
# a small machine shared by several server processes (or other jobs) extra threads slowed
# decode by 10-100x in our runs. Pass more threads on a quiet machine with cores to spare.
LLAMA_THREADS_NOTE = "llama.cpp: 1 thread per process (client and each RPC server) unless set"
FIRST_PROMPT_ID = 3  # synthetic models keep ids 0..2 for <s>, </s>, <pad>

Events = Callable[[str], None]


class BenchError(RuntimeError):
    """One configuration could not be measured; the message says which and why."""


def json_worker(
    work: Callable[[dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]],
) -> int:
    """The body of a lab worker process (`python -m ... --worker`): one JSON request on stdin,
    `work` run on it, one JSON reply on stdout (an error reply when it fails)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    request = json.loads(sys.stdin.read())
    try:
        reply: dict[str, Any] = asyncio.run(work(request))
    except (BenchError, ValueError, OSError) as e:
        reply = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    return 0


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class NodeRef:
    """A LayerLink node a benchmark places a stage on."""

    name: str
    address: str  # host:port of the gRPC server that serves the device
    node_id: str
    device: str = "0"  # the device's label on its node (a node may serve several)


@dataclass(frozen=True)
class Sample:
    """One timed generation."""

    prompt_tokens: int
    tokens: int
    ttft_s: float
    decode_s: float  # first generated token -> last generated token

    @property
    def ms_per_token(self) -> float:
        return self.decode_s / max(1, self.tokens - 1) * 1e3


@dataclass(frozen=True)
class Placed:
    """Layers [start, end) as the system reports holding them (not as asked)."""

    where: str  # node name or RPC endpoint; "client" for llama.cpp's own process
    start: int
    end: int


@dataclass(frozen=True)
class RunSpec:
    model: str
    system: str  # SYSTEM_*
    deployment: str  # DEPLOY_IN_PROCESS, DEPLOY_LOOPBACK, or a link label ("1 GbE", ...)
    stages: int
    layers: tuple[int, ...]  # layer count per stage, in pipeline order

    @property
    def label(self) -> str:
        return f"{self.model}/{self.system}/{self.deployment}/{self.stages}"


@dataclass(frozen=True)
class RunResult:
    spec: RunSpec
    samples: tuple[Sample, ...] = ()
    placement: tuple[Placed, ...] = ()
    error: str = ""
    per_hop_ms: float | None = None
    predicted_tps: float | None = None

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.samples)

    @property
    def ms_per_token(self) -> float | None:
        if not self.samples:
            return None
        return statistics.median(s.ms_per_token for s in self.samples)

    @property
    def decode_tps(self) -> float | None:
        ms = self.ms_per_token
        return 1e3 / ms if ms else None

    @property
    def decode_tps_range(self) -> tuple[float, float] | None:
        if not self.samples:
            return None
        tps = [1e3 / s.ms_per_token for s in self.samples]
        return min(tps), max(tps)

    @property
    def ttft_s(self) -> float | None:
        return statistics.median(s.ttft_s for s in self.samples) if self.samples else None

    @property
    def prefill_tps(self) -> float | None:
        if not self.samples:
            return None
        return statistics.median(s.prompt_tokens / s.ttft_s for s in self.samples)

    def to_json(self) -> dict[str, Any]:
        rng = self.decode_tps_range
        return {
            "model": self.spec.model,
            "system": self.spec.system,
            "deployment": self.spec.deployment,
            "stages": self.spec.stages,
            "layers": list(self.spec.layers),
            "repeats": len(self.samples),
            "ms_per_token": _r(self.ms_per_token, 4),
            "decode_tps": _r(self.decode_tps, 2),
            "decode_tps_min": _r(rng[0], 2) if rng else None,
            "decode_tps_max": _r(rng[1], 2) if rng else None,
            "prefill_tps": _r(self.prefill_tps, 1),
            "ttft_s": _r(self.ttft_s, 5),
            "per_hop_ms": _r(self.per_hop_ms, 4),
            "predicted_tps": _r(self.predicted_tps, 2),
            "placement": [{"where": p.where, "layers": [p.start, p.end]} for p in self.placement],
            "samples": [
                {
                    "prompt_tokens": s.prompt_tokens,
                    "tokens": s.tokens,
                    "ttft_s": s.ttft_s,
                    "decode_s": s.decode_s,
                }
                for s in self.samples
            ],
            "error": self.error or None,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> RunResult:
        spec = RunSpec(
            model=str(d["model"]),
            system=str(d["system"]),
            deployment=str(d["deployment"]),
            stages=int(d["stages"]),
            layers=tuple(int(x) for x in d["layers"]),
        )
        return RunResult(
            spec=spec,
            samples=tuple(
                Sample(
                    int(s["prompt_tokens"]),
                    int(s["tokens"]),
                    float(s["ttft_s"]),
                    float(s["decode_s"]),
                )
                for s in d.get("samples", [])
            ),
            placement=tuple(
                Placed(str(p["where"]), int(p["layers"][0]), int(p["layers"][1]))
                for p in d.get("placement", [])
            ),
            error=str(d.get("error") or ""),
            per_hop_ms=d.get("per_hop_ms"),
            predicted_tps=d.get("predicted_tps"),
        )


def _r(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def ranges(counts: Sequence[int]) -> list[tuple[int, int]]:
    """Half-open layer ranges [start, end) from per-stage counts."""
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


def with_per_hop(results: Sequence[RunResult]) -> list[RunResult]:
    """Fill per_hop_ms of every k-stage run from the 1-stage run of the same model, system and
    reference deployment (`per_hop_reference`)."""
    out = []
    for r in results:
        ref = per_hop_reference(results, r)
        if r.spec.stages > 1 and ref is not None and r.ok and ref.ok:
            assert r.ms_per_token is not None and ref.ms_per_token is not None
            hop = (r.ms_per_token - ref.ms_per_token) / (r.spec.stages - 1)
            r = replace(r, per_hop_ms=hop)
        out.append(r)
    return out


def per_hop_reference(results: Sequence[RunResult], r: RunResult) -> RunResult | None:
    """The unsplit run a k-stage run is compared with: 1 stage, same model and system, and
    a worker process (never the in-process engine): on loopback when there is one."""
    candidates = [
        x
        for x in results
        if x.spec.model == r.spec.model
        and x.spec.system == r.spec.system
        and x.spec.stages == 1
        and x.spec.deployment != DEPLOY_IN_PROCESS
    ]
    same = [x for x in candidates if x.spec.deployment == r.spec.deployment]
    loop = [x for x in candidates if x.spec.deployment == DEPLOY_LOOPBACK]
    pick = same or loop or candidates
    return pick[0] if pick else None


# --------------------------------------------------------------------------------------------
# Runners: one configuration each, set up once, sampled `repeats` times


class Runner(Protocol):
    spec: RunSpec

    async def setup(self) -> None: ...

    async def sample(self) -> Sample: ...

    def placement(self) -> tuple[Placed, ...]: ...

    async def close(self) -> None: ...


def prompt_ids(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of n token ids (no special tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hi = max(FIRST_PROMPT_ID + 1, min(vocab_size, 32000))
    return [int(x) for x in rng.integers(FIRST_PROMPT_ID, hi, size=n)]


class MlxLmRunner:
    """mlx_lm generating in this process: the engine's own limit, no network at all."""

    def __init__(self, spec: RunSpec, model_dir: Path, prompt: list[int], gen_tokens: int) -> None:
        self.spec = spec
        self.model_dir = model_dir
        self.prompt = prompt
        self.gen_tokens = gen_tokens
        self._model: Any = None

    async def setup(self) -> None:
        from mlx_lm import load

        try:
            self._model = load(str(self.model_dir))[0]
        except (OSError, ValueError) as e:
            raise BenchError(f"mlx_lm could not load {self.model_dir}: {e}") from None
        self._generate(min(self.gen_tokens, 8))  # warm-up, not counted

    def _generate(self, n: int) -> Sample:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        def greedy(logits: mx.array) -> mx.array:
            return mx.argmax(logits, axis=-1)

        t0 = time.perf_counter()
        t_first = t_end = t0
        count = 0
        steps = generate_step(mx.array(self.prompt), self._model, max_tokens=n, sampler=greedy)
        for tok, _ in steps:
            int(tok)  # the token is on the host: the clock may be read
            count += 1
            t_end = time.perf_counter()
            if count == 1:
                t_first = t_end
        return Sample(len(self.prompt), count, t_first - t0, t_end - t_first)

    async def sample(self) -> Sample:
        return self._generate(self.gen_tokens)

    def placement(self) -> tuple[Placed, ...]:
        return (Placed("in-process", 0, sum(self.spec.layers)),)

    async def close(self) -> None:
        self._model = None


class LayerLinkRunner:
    """A LayerLink pipeline over real nodes, one stage per node in the order given."""

    def __init__(
        self,
        spec: RunSpec,
        model: ModelInfo,
        nodes: Sequence[NodeRef],
        prompt: list[int],
        gen_tokens: int,
        timeout_s: float = DEFAULT_SAMPLE_TIMEOUT_S,
    ) -> None:
        if len(nodes) != len(spec.layers):
            raise ValueError(f"{len(spec.layers)} stages need as many nodes, got {len(nodes)}")
        self.spec = spec
        self.model = model
        self.nodes = list(nodes)
        self.prompt = prompt
        self.params = GenerationParams(max_tokens=gen_tokens, step_timeout_s=timeout_s)
        stages = tuple(
            Stage(
                node_id=n.node_id,
                node_name=n.name,
                address=n.address,
                start=s,
                end=e,
                device=n.device,
            )  # fmt: skip
            for n, (s, e) in zip(nodes, ranges(spec.layers), strict=True)
        )
        self.plan = Plan(
            model=model.name,
            num_layers=model.num_layers,
            stages=stages,
            explanation=f"benchmark split {list(spec.layers)}",
        )
        self._pipeline: Pipeline | None = None
        self._placed: tuple[Placed, ...] = ()

    async def setup(self) -> None:
        pipeline = Pipeline(self.plan, str(self.model.path))
        self._pipeline = pipeline
        try:
            await pipeline.load()
            await pipeline.open()
            self._placed = await self._read_placement(pipeline)
            await pipeline.generate(self.prompt, replace(self.params, max_tokens=8))  # warm-up
        except (PipelineError, grpc.aio.AioRpcError, OSError) as e:
            raise BenchError(
                f"LayerLink {self.spec.stages}-stage pipeline: {_grpc_text(e)}"
            ) from None

    async def _read_placement(self, pipeline: Pipeline) -> tuple[Placed, ...]:
        """Every node's own account of the layers it holds for this plan."""
        placed = []
        for s in self.plan.stages:
            info = await pipeline.clients[s.address].get_info()
            mine = [st for st in info.stages if st.plan_id == self.plan.plan_id]
            if not mine:
                raise BenchError(f"node {s.node_name} does not report plan {self.plan.plan_id}")
            placed.append(Placed(s.node_name, int(mine[0].start), int(mine[0].end)))
        asked = [(s.start, s.end) for s in self.plan.stages]
        if [(p.start, p.end) for p in placed] != asked:
            raise BenchError(f"nodes hold {placed}, the plan asked for {asked}")
        return tuple(placed)

    async def sample(self) -> Sample:
        assert self._pipeline is not None
        try:
            r = await self._pipeline.generate(self.prompt, self.params)
        except (PipelineError, grpc.aio.AioRpcError, OSError) as e:
            raise BenchError(
                f"LayerLink {self.spec.stages}-stage pipeline: {_grpc_text(e)}"
            ) from None
        return Sample(r.prompt_tokens, len(r.tokens), r.ttft_s, r.decode_s)

    def placement(self) -> tuple[Placed, ...]:
        return self._placed

    async def close(self) -> None:
        if self._pipeline is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._pipeline.close(), 15.0)
            self._pipeline = None


class FloorRunner:
    """The same split as a bare ring of worker processes (coordinator/lab/ringfloor.py): what
    splitting costs on this machine before any framework."""

    def __init__(self, spec: RunSpec, model_dir: Path, prompt: list[int], gen_tokens: int) -> None:
        self.spec = spec
        self.model_dir = model_dir
        self.prompt = prompt
        self.gen_tokens = gen_tokens
        self._procs: list[subprocess.Popen[str]] = []
        self.last_ids: list[int] = []  # the tokens of the last generation

    async def setup(self) -> None:
        await asyncio.to_thread(self._start)
        await asyncio.to_thread(self._generate, min(self.gen_tokens, 8))  # warm-up

    def _start(self) -> None:
        from node.cpus import local_cpus

        ports = [_free_port() for _ in self.spec.layers]
        k = len(ports)
        for i, (start, end) in enumerate(ranges(self.spec.layers)):
            argv = [sys.executable, "-m", "coordinator.lab.ringfloor",
                    "--model", str(self.model_dir), "--start", str(start), "--end", str(end), "--index", str(i), "--count",
                    str(k), "--listen", str(ports[i]), "--next", str(ports[(i + 1) % k])]  # fmt: skip
            # Placed on the cores as the local nodes are (node/cpus.py), for a like-for-like floor.
            pinned = local_cpus(i)
            if pinned is not None:
                argv += ["--cpus", pinned]
            self._procs.append(
                subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        for p in self._procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith(ringfloor.READY):
                raise BenchError(f"ring worker exited before its ring was connected ({p.poll()})")

    def _generate(self, n: int) -> Sample:
        head = self._procs[0]
        assert head.stdin is not None and head.stdout is not None
        head.stdin.write(f"gen {n} {' '.join(map(str, self.prompt))}\n")
        head.stdin.flush()
        line = head.stdout.readline()
        if not line:
            raise BenchError(f"ring worker 0 exited ({head.poll()})")
        d = json.loads(line)
        self.last_ids = [int(t) for t in d["ids"]]
        return Sample(len(self.prompt), int(d["tokens"]), float(d["ttft_s"]), float(d["decode_s"]))

    async def sample(self) -> Sample:
        return await asyncio.to_thread(self._generate, self.gen_tokens)

    def placement(self) -> tuple[Placed, ...]:
        return tuple(Placed(f"ring{i}", s, e) for i, (s, e) in enumerate(ranges(self.spec.layers)))

    async def close(self) -> None:
        for p in self._procs:
            p.kill()
            p.wait()
        self._procs = []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _grpc_text(e: BaseException) -> str:
    if isinstance(e, grpc.aio.AioRpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e)


class LlamaRunner:
    """llama.cpp's client in a child process (coordinator.lab.llama_baseline), in one process or
    with its layers on ggml RPC servers (k servers for k stages; the client keeps none)."""

    def __init__(
        self,
        spec: RunSpec,
        gguf: Path,
        servers: Sequence[str],
        prompt: list[int],
        gen_tokens: int,
        threads: int | None = None,
        timeout_s: float = DEFAULT_SAMPLE_TIMEOUT_S,
        on_event: Events | None = None,
    ) -> None:
        if servers and len(servers) != len(spec.layers):
            raise ValueError(f"{len(spec.layers)} stages need as many RPC servers")
        self.spec = spec
        self.gguf = gguf
        self.servers = list(servers)
        self.prompt = prompt
        self.gen_tokens = gen_tokens
        self.threads = threads
        self.timeout_s = timeout_s
        self.on_event = on_event
        self._placed: tuple[Placed, ...] = ()

    async def setup(self) -> None:
        reason = baseline_unavailable()
        if reason:
            raise BenchError(reason)
        if not self.gguf.is_file():
            raise BenchError(f"no GGUF model at {self.gguf}")

    async def sample(self) -> Sample:
        from coordinator.lab.llama_baseline import LlamaBaselineError, run_llama

        label = self.spec.label

        def progress(stage: str) -> None:
            if self.on_event is not None:
                self.on_event(f"{label}: {stage}")

        try:
            r = await asyncio.to_thread(
                run_llama,
                self.gguf,
                self.prompt,
                self.gen_tokens,
                servers=self.servers,
                layers_per_server=list(self.spec.layers) if self.servers else None,
                threads=self.threads,
                warmup=True,
                timeout_s=self.timeout_s,
                on_progress=progress,
            )
        except (LlamaBaselineError, ValueError) as e:
            first = str(e).split("\n--- llama.cpp output", 1)[0]
            raise BenchError(f"llama.cpp {self.spec.stages}-stage run: {first}") from None
        self._placed = self._check_placement(r)
        decode_s = sum(r.decode_s)
        return Sample(r.prompt_tokens, len(r.tokens), r.prefill_s, decode_s)

    def _check_placement(self, r: Any) -> tuple[Placed, ...]:
        """The layers each device holds, from llama.cpp's own load log, checked against the
        split asked for."""
        placed: list[Placed] = []
        if not self.servers:
            client = r.layers_on(None)
            if client != list(range(r.n_layers)):
                raise BenchError(f"llama.cpp in one process holds layers {client}")
            return (Placed("client", 0, r.n_layers),)
        if r.layers_on(None):
            raise BenchError(f"llama.cpp kept layers {r.layers_on(None)} in its client")
        for ep, (start, end) in zip(self.servers, ranges(self.spec.layers), strict=True):
            got = r.layers_on(ep)
            if got != list(range(start, end)):
                raise BenchError(
                    f"llama.cpp put layers {got} on RPC server {ep}, asked for [{start}, {end})"
                )
            placed.append(Placed(ep, start, end))
        return tuple(placed)

    def placement(self) -> tuple[Placed, ...]:
        return self._placed

    async def close(self) -> None:
        return None


async def measure(
    runners: Sequence[Runner],
    repeats: int,
    on_event: Events | None = None,
    sample_timeout_s: float = DEFAULT_SAMPLE_TIMEOUT_S,
    between_rounds: Callable[[int], Awaitable[None]] | None = None,
) -> list[RunResult]:
    """Set up every runner, then sample them round-robin `repeats` times; close them all.

    `between_rounds(r)` runs before round r (e.g. to measure something under the same load
    as the samples). A runner that fails keeps its samples so far and its error; the others
    go on."""
    say = on_event or (lambda _m: None)
    samples: dict[int, list[Sample]] = {i: [] for i in range(len(runners))}
    errors: dict[int, str] = {}
    try:
        for i, r in enumerate(runners):
            say(f"{r.spec.label}: setting up")
            try:
                await asyncio.wait_for(r.setup(), sample_timeout_s * 2)
            except BenchError as e:
                errors[i] = str(e)
            except TimeoutError:
                errors[i] = f"set-up did not finish within {sample_timeout_s * 2:.0f}s"
        for rep in range(repeats):
            if between_rounds is not None:
                await between_rounds(rep)
            for i, r in enumerate(runners):
                if i in errors:
                    continue
                say(f"{r.spec.label}: repeat {rep + 1}/{repeats}")
                try:
                    s = await asyncio.wait_for(r.sample(), sample_timeout_s + 10.0)
                except BenchError as e:
                    errors[i] = str(e)
                    log.warning("%s failed: %s", r.spec.label, e)
                    continue
                except TimeoutError:
                    errors[i] = f"a generation did not finish within {sample_timeout_s:.0f}s"
                    continue
                samples[i].append(s)
    finally:
        for r in runners:
            await r.close()
    results = [
        RunResult(
            spec=r.spec,
            samples=tuple(samples[i]),
            placement=r.placement(),
            error=errors.get(i, ""),
        )
        for i, r in enumerate(runners)
    ]
    return with_per_hop(results)


# --------------------------------------------------------------------------------------------
# Local workers, the baseline's availability, the machine, the raw socket


def baseline_unavailable() -> str:
    """Why the llama.cpp baseline cannot run here; empty when it can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return (
            "llama.cpp baseline not installed: llama-cpp-python is missing "
            "(`make install` builds it with -DGGML_RPC=ON)"
        )
    if (
        importlib.util.find_spec("coordinator.lab.llama_baseline") is None
        or importlib.util.find_spec("node.llama_rpc") is None
    ):
        return "llama.cpp baseline not available in this build (coordinator.lab.llama_baseline)"
    from node.llama_rpc import LlamaRpcError, llama_cpp_dir

    try:
        lib = llama_cpp_dir() / "lib"
    except LlamaRpcError as e:
        return str(e)
    if lib.is_dir() and not any("ggml-rpc" in p.name for p in lib.iterdir()):
        return "llama.cpp baseline unavailable: llama-cpp-python was built without GGML_RPC=ON"
    return ""


def gguf_for(model_dir: Path, scratch: Path) -> Path:
    """The model's GGUF (model.gguf beside the weights, else an f32 export into scratch)."""
    beside = model_dir / "model.gguf"
    if beside.is_file():
        return beside
    from coordinator.lab.gguf_export import export_gguf

    out = scratch / f"{model_dir.name}.gguf"
    if not out.is_file():
        log.info("exporting %s to GGUF for llama.cpp", model_dir)
        export_gguf(model_dir, out, "f32")
    return out


@contextlib.contextmanager
def local_workers(
    nodes: int,
    rpc_servers: int,
    log_dir: Path,
    rpc_threads: int | None = None,
    cpu_policy: str | None = None,
) -> Iterator[tuple[list[NodeRef], list[str]]]:
    """Start `nodes` cluster-node processes and `rpc_servers` ggml RPC servers on 127.0.0.1;
    stop all of them on exit. `cpu_policy`: the nodes' placement on the cores (node/cpus.py;
    default: the local clusters' own)."""
    from coordinator.lab.localcluster import LocalCluster

    log_dir.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(
        nodes,
        f"bench{os.getpid()}",
        log_dir=log_dir,
        name_prefix="bench",
        extra_args=[],
        cpu_policy=cpu_policy,
    )
    servers: list[Any] = []
    try:
        if nodes:
            cluster.start()
        if rpc_servers:
            from node.llama_rpc import LlamaRpcError, LlamaRpcServer

            try:
                for _ in range(rpc_servers):
                    servers.append(LlamaRpcServer("127.0.0.1", 0, threads=rpc_threads).start())
            except LlamaRpcError as e:
                raise BenchError(f"could not start a llama.cpp RPC server: {e}") from None
        refs = [NodeRef(n.name, n.address, n.node_id) for n in cluster.nodes]
        yield refs, [s.endpoint for s in servers]
    finally:
        for s in servers:
            s.stop()
        cluster.stop()


_ECHO_CHILD = """
import socket, sys
n = int(sys.argv[1])
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1)
sys.stdout.write(f"{srv.getsockname()[1]}\\n")
sys.stdout.flush()
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(n)
view = memoryview(buf)
while True:
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if k == 0:
            sys.exit(0)
        got += k
    conn.sendall(buf)
"""


@dataclass(frozen=True)
class SocketRtt:
    message_bytes: int
    rounds: int
    median_us: float
    p10_us: float
    p90_us: float


def raw_socket_rtt(message_bytes: int = 8192, rounds: int = 2000, warmup: int = 200) -> SocketRtt:
    """Round trip of a message_bytes ping-pong over TCP on loopback between this process and a
    child process (TCP_NODELAY, blocking sockets): the floor a hop can approach."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _ECHO_CHILD, str(message_bytes)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=10.0) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg = os.urandom(message_bytes)
            buf = bytearray(message_bytes)
            view = memoryview(buf)
            times: list[float] = []
            for i in range(warmup + rounds):
                t0 = time.perf_counter()
                s.sendall(msg)
                got = 0
                while got < message_bytes:
                    k = s.recv_into(view[got:])
                    if k == 0:
                        raise BenchError("the echo process closed the socket")
                    got += k
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1e6)
    finally:
        proc.kill()
        proc.wait()
    times.sort()
    return SocketRtt(
        message_bytes=message_bytes,
        rounds=rounds,
        median_us=statistics.median(times),
        p10_us=times[len(times) // 10],
        p90_us=times[(len(times) * 9) // 10],
    )


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total_bytes() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def machine_info() -> dict[str, Any]:
    """What ran the benchmark: enough to tell two result files' machines apart."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "mem_total_bytes": _mem_total_bytes(),
        "python": platform.python_version(),
        "mlx": _version("mlx"),
        "mlx_lm": _version("mlx-lm"),
        "llama_cpp_python": _version("llama_cpp_python"),
        "grpcio": _version("grpcio"),
        "git_commit": _git_commit(),
        "loadavg_start": [round(x, 2) for x in load] if load else None,
        "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def end_load(machine: dict[str, Any]) -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {**machine, "loadavg_end": [round(x, 2) for x in load] if load else None}


# --------------------------------------------------------------------------------------------
# `coordinator bench`: one model, one split, LayerLink and/or llama.cpp


@dataclass(frozen=True)
class BenchSettings:
    model_dir: Path
    systems: tuple[str, ...] = (SYSTEM_LAYERLINK, SYSTEM_LLAMA)
    stages: int = 2
    prompt_tokens: int = 32
    gen_tokens: int = 64
    repeats: int = 5
    threads: int = 1  # llama.cpp in one process (see LLAMA_THREADS_NOTE)
    rpc_threads: int = 1  # each RPC server, and the client that drives them
    sample_timeout_s: float = DEFAULT_SAMPLE_TIMEOUT_S
    layer_counts: tuple[int, ...] = field(default=())

    def check(self, num_layers: int) -> tuple[int, ...]:
        """The per-stage layer counts, after validating every setting."""
        if not self.systems:
            raise ValueError("choose at least one system")
        if not 1 <= self.stages <= num_layers:
            raise ValueError(f"--stages must be between 1 and the model's {num_layers} layers")
        if self.prompt_tokens < 1:
            raise ValueError("--prompt-tokens must be at least 1")
        if self.gen_tokens < 2:
            raise ValueError("--gen-tokens must be at least 2 (decode speed needs two tokens)")
        if self.repeats < 1:
            raise ValueError("--repeats must be at least 1")
        counts = self.layer_counts or tuple(even_counts(num_layers, self.stages))
        if len(counts) != self.stages or sum(counts) != num_layers or min(counts) < 1:
            raise ValueError(f"layer counts {list(counts)} must be {self.stages} positive numbers "
                             f"summing to {num_layers}")  # fmt: skip
        return counts


def bench_runners(
    settings: BenchSettings,
    model: ModelInfo,
    model_label: str,
    nodes: Sequence[NodeRef],
    rpc_endpoints: Sequence[str],
    gguf: Path | None,
    deployment: str = DEPLOY_LOOPBACK,
    include_mlx_lm: bool = False,
    include_in_process_llama: bool = True,
    stage_counts: Sequence[int] | None = None,
    on_event: Events | None = None,
    include_floor: bool = False,
) -> list[Runner]:
    """The configurations of one comparison: for each system its 1-stage reference and its
    splits (stage_counts, default: 1 and settings.stages), same layer counts in both."""
    prompt = prompt_ids(model.vocab_size, settings.prompt_tokens)
    n = model.num_layers
    ks = sorted(set(stage_counts or (1, settings.stages)))
    counts_for = {
        k: settings.layer_counts
        if (settings.layer_counts and k == settings.stages)
        else tuple(even_counts(n, k))
        for k in ks
    }
    gen, timeout = settings.gen_tokens, settings.sample_timeout_s
    runners: list[Runner] = []
    if include_mlx_lm:
        spec = RunSpec(model_label, SYSTEM_MLX_LM, DEPLOY_IN_PROCESS, 1, (n,))
        runners.append(MlxLmRunner(spec, model.path, prompt, gen))
    if SYSTEM_LAYERLINK in settings.systems:
        for k in ks:
            spec = RunSpec(model_label, SYSTEM_LAYERLINK, deployment, k, counts_for[k])
            runners.append(LayerLinkRunner(spec, model, nodes[:k], prompt, gen, timeout))
    if include_floor:
        for k in ks:  # k = 1 too: a ring of one process, the floor's own unsplit reference
            spec = RunSpec(model_label, SYSTEM_FLOOR, deployment, k, counts_for[k])
            runners.append(FloorRunner(spec, model.path, prompt, gen))
    if SYSTEM_LLAMA in settings.systems and gguf is not None:
        if include_in_process_llama:
            spec = RunSpec(model_label, SYSTEM_LLAMA, DEPLOY_IN_PROCESS, 1, (n,))
            runners.append(
                LlamaRunner(spec, gguf, (), prompt, gen, settings.threads, timeout, on_event)
            )
        for k in ks:
            spec = RunSpec(model_label, SYSTEM_LLAMA, deployment, k, counts_for[k])
            runners.append(
                LlamaRunner(
                    spec,
                    gguf,
                    rpc_endpoints[:k],
                    prompt,
                    gen,
                    settings.rpc_threads,
                    timeout,
                    on_event,
                )
            )
    return runners


def unavailable_runs(
    settings: BenchSettings, model_label: str, num_layers: int, reason: str
) -> list[RunResult]:
    """Placeholder rows for llama.cpp when the baseline cannot run, with the reason."""
    counts = tuple(even_counts(num_layers, settings.stages))
    return [
        RunResult(
            RunSpec(model_label, SYSTEM_LLAMA, DEPLOY_LOOPBACK, settings.stages, counts),
            error=reason,
        )  # fmt: skip
    ]


def bench_report(
    settings: BenchSettings,
    model: ModelInfo,
    results: Sequence[RunResult],
    machine: dict[str, Any],
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    return {
        "model": {
            "path": str(model.path),
            "name": model.name,
            "layers": model.num_layers,
            "hidden_size": model.hidden_size,
        },  # fmt: skip
        "settings": {
            "stages": settings.stages,
            "prompt_tokens": settings.prompt_tokens,
            "gen_tokens": settings.gen_tokens,
            "repeats": settings.repeats,
            "interleaved": True,
            "warmup_excluded": True,
            "llama_threads": settings.threads,
            "llama_rpc_threads": settings.rpc_threads,
            "local_cpus": local_cpu_policy(),
        },
        "runs": [r.to_json() for r in results],
        "machine": end_load(machine),
        "notes": list(notes),
    }


# --------------------------------------------------------------------------------------------
# `make bench`: the suite of issue 9


# The real model of the suite: the bundled SmolLM2-135M-Instruct GGUF (coordinator/bundled.py).
REAL_MODEL = "smollm2"
# The cost model's prediction of the real model's LayerLink rows must land within this.
PREDICTION_TARGET = 0.25


@dataclass(frozen=True)
class SuiteSettings:
    models: tuple[str, ...] = ("tiny", "small", REAL_MODEL)
    stage_counts: tuple[int, ...] = (1, 2, 3)
    prompt_tokens: int = 32
    gen_tokens: int = 64
    repeats: int = 5
    llama: bool = True
    threads: int = 1  # llama.cpp in one process (see LLAMA_THREADS_NOTE)
    rpc_threads: int = 1  # each RPC server, and the client that drives them
    model_root: Path | None = None  # where the synthetic models live (default: the cache)


@dataclass(frozen=True)
class Check:
    name: str
    value: float | None
    target: str
    met: bool | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": _r(self.value, 4), "target": self.target,
                "met": self.met, "detail": self.detail}  # fmt: skip


def suite_model(preset: str, root: Path | None) -> Path:
    """The synthetic llama model of a preset, with its GGUF, written once and reused; for
    REAL_MODEL, the bundled GGUF (converted on first use by read_model)."""
    from coordinator.lab.synth import synthesize
    from node.identity import cache_dir

    if preset == REAL_MODEL:
        from coordinator.bundled import INSTALL_HINT, smollm2_gguf

        real = smollm2_gguf()
        if real is None:
            raise BenchError(f"the real model is not installed: {INSTALL_HINT}")
        return real

    path = (root or cache_dir() / "models") / f"bench-{preset}-llama"
    if not (path / "config.json").is_file() or not (path / "model.gguf").is_file():
        log.info("synthesizing the %s model at %s", preset, path)
        synthesize(path, preset=preset, arch="llama", seed=0, gguf=True)
    return path


def _find(
    results: Sequence[RunResult], model: str, system: str, stages: int, deployment: str
) -> RunResult | None:
    for r in results:
        s = r.spec
        if (s.model, s.system, s.stages, s.deployment) == (model, system, stages, deployment):
            return r
    return None


def suite_checks(results: Sequence[RunResult], rtt_us: float) -> list[Check]:
    """Issue 9's and issue 13's acceptance ratios, computed from this run (reported, never
    asserted); a LayerLink run's `predicted_tps` is the cost model's tokens/s for it."""
    checks: list[Check] = []
    predicted = [r for r in results if r.spec.system == SYSTEM_LAYERLINK and r.predicted_tps]
    for run in sorted(predicted, key=lambda r: (r.spec.model, r.spec.stages)):
        if not run.decode_tps or run.predicted_tps is None:
            continue
        label, k, tps = run.spec.model, run.spec.stages, run.predicted_tps
        err = abs(tps - run.decode_tps) / run.decode_tps
        met = err <= PREDICTION_TARGET if label == REAL_MODEL else None
        checks.append(Check(f"{label}: LayerLink {k} stages, predicted vs measured tokens per s",
                            err, f"<= {PREDICTION_TARGET:.0%}" if met is not None else "report",
                            met, f"{tps:.2f} predicted vs {run.decode_tps:.2f} measured tok/s"))  # fmt: skip
    for label in sorted({r.spec.model for r in results}):
        r1 = _find(results, label, SYSTEM_LAYERLINK, 1, DEPLOY_LOOPBACK)
        r3 = _find(results, label, SYSTEM_LAYERLINK, 3, DEPLOY_LOOPBACK)
        f1 = _find(results, label, SYSTEM_FLOOR, 1, DEPLOY_LOOPBACK)
        f3 = _find(results, label, SYSTEM_FLOOR, 3, DEPLOY_LOOPBACK)
        if not (r1 and r3 and f1 and f3 and r1.decode_tps and r3.decode_tps and f1.decode_tps):
            continue
        ours = r3.decode_tps / r1.decode_tps
        theirs = (f3.decode_tps or 0.0) / f1.decode_tps
        real = label == REAL_MODEL
        checks.append(Check(f"{label}: LayerLink 3/1 stages minus the floor's 3/1 stages, tokens per s",
                            ours - theirs, ">= 0" if real else "report", ours >= theirs if real else None,
                            f"LayerLink {ours:.3f} vs floor {theirs:.3f}"))  # fmt: skip
    ll1 = _find(results, "small", SYSTEM_LAYERLINK, 1, DEPLOY_LOOPBACK)
    ref = _find(results, "small", SYSTEM_MLX_LM, 1, DEPLOY_IN_PROCESS)
    if ll1 and ref and ll1.ms_per_token and ref.ms_per_token:
        v = ll1.ms_per_token / ref.ms_per_token
        checks.append(Check("small: LayerLink 1 stage / mlx_lm, ms per token", v, "<= 1.05",
                            v <= 1.05, f"{ll1.ms_per_token:.2f} ms vs {ref.ms_per_token:.2f} ms"))  # fmt: skip
    for r in results:
        s = r.spec
        if s.system != SYSTEM_LAYERLINK or s.stages < 2 or r.per_hop_ms is None:
            continue
        # A per-hop figure <= 0 means the split ran faster than the unsplit run: the hop cost
        # is below this run's noise, and no ratio can be judged from it.
        noise = " (<= 0: below this run's noise)" if r.per_hop_ms <= 0 else ""
        v = r.per_hop_ms * 1e3 / rtt_us
        checks.append(Check(f"{s.model}: LayerLink {s.stages} stages, per hop / raw socket RTT",
                            v, "<= 2", v <= 2.0 if not noise else None,
                            f"{r.per_hop_ms * 1e3:.0f} us vs {rtt_us:.0f} us{noise}"))  # fmt: skip
        other = _find(results, s.model, SYSTEM_LLAMA, s.stages, s.deployment)
        if other is not None and other.per_hop_ms is not None:
            if other.per_hop_ms <= 0:
                noise = " (llama.cpp's <= 0: below this run's noise)"
            v2 = r.per_hop_ms / other.per_hop_ms if other.per_hop_ms else None
            checks.append(Check(f"{s.model}: LayerLink / llama.cpp RPC per hop, {s.stages} stages",
                                v2, "<= 0.2", v2 <= 0.2 if v2 is not None and not noise else None,
                                f"{r.per_hop_ms:.3f} ms vs {other.per_hop_ms:.3f} ms{noise}"))  # fmt: skip
    t1 = _find(results, "tiny", SYSTEM_LAYERLINK, 1, DEPLOY_LOOPBACK)
    t3 = _find(results, "tiny", SYSTEM_LAYERLINK, 3, DEPLOY_LOOPBACK)
    if t1 and t3 and t1.decode_tps and t3.decode_tps:
        v = t3.decode_tps / t1.decode_tps
        checks.append(Check("tiny: LayerLink 3 stages / 1 stage, tokens per s", v, ">= 0.85",
                            v >= 0.85, f"{t3.decode_tps:.1f} vs {t1.decode_tps:.1f} tok/s"))  # fmt: skip
    # Against the machine's floor (a bare ring of processes, the same split): what any
    # split reaches here, and LayerLink's cost above it per hop (k hops per token: k - 1
    # between stages and the ring back to stage 0). Reported, no target.
    f3 = _find(results, "tiny", SYSTEM_FLOOR, 3, DEPLOY_LOOPBACK)
    if t1 and f3 and t1.decode_tps and f3.decode_tps:
        v = f3.decode_tps / t1.decode_tps
        checks.append(Check("tiny: floor 3 stages / LayerLink 1 stage, tokens per s", v,
                            "report", None, f"{f3.decode_tps:.1f} vs {t1.decode_tps:.1f} tok/s"))  # fmt: skip
    for r in results:
        s = r.spec
        if s.system != SYSTEM_LAYERLINK or s.stages < 2 or r.ms_per_token is None:
            continue
        floor = _find(results, s.model, SYSTEM_FLOOR, s.stages, s.deployment)
        if floor is None or floor.ms_per_token is None:
            continue
        above = (r.ms_per_token - floor.ms_per_token) / s.stages
        checks.append(Check(f"{s.model}: LayerLink {s.stages} stages above the floor, ms per hop",
                            above, "report", None,
                            f"{r.ms_per_token:.2f} vs {floor.ms_per_token:.2f} ms per token"))  # fmt: skip
    return checks


async def run_suite(
    settings: SuiteSettings, scratch: Path, on_event: Events | None = None
) -> dict[str, Any]:
    """Everything of `make bench` in one invocation: machine, raw socket RTT (before, between
    and after the models), and every model x system x stage count, repeats interleaved per model."""
    from coordinator.session import read_model

    say = on_event or (lambda _m: None)
    machine = machine_info()
    kmax = max(settings.stage_counts)
    reason = baseline_unavailable() if settings.llama else "llama.cpp runs not requested"
    notes = (
        [reason]
        if reason
        else [f"{LLAMA_THREADS_NOTE} (here: {settings.threads}, RPC {settings.rpc_threads})"]
    )
    models = {p: read_model(suite_model(p, settings.model_root)) for p in settings.models}
    agreement: dict[str, Any] = {}
    # The raw socket round trip is measured before, between and after the models' runs, so
    # that it sees the same machine state they do; its median is the reference.
    say("raw socket round trip")
    rtts = [raw_socket_rtt()]
    results: list[RunResult] = []
    systems = (SYSTEM_LAYERLINK, SYSTEM_LLAMA) if not reason else (SYSTEM_LAYERLINK,)
    n_rpc = kmax if not reason else 0
    with local_workers(kmax, n_rpc, scratch / "logs", settings.rpc_threads) as (
        nodes,
        endpoints,
    ):
        for preset, model in models.items():
            path = model.path
            bs = BenchSettings(
                model_dir=path,
                systems=systems,
                stages=kmax,
                prompt_tokens=settings.prompt_tokens,
                gen_tokens=settings.gen_tokens,
                repeats=settings.repeats,
                threads=settings.threads,
                rpc_threads=settings.rpc_threads,
            )
            runners = bench_runners(
                bs,
                model,
                preset,
                nodes,
                endpoints,
                path / "model.gguf" if not reason and (path / "model.gguf").is_file() else None,
                include_mlx_lm=True,
                stage_counts=settings.stage_counts,
                on_event=on_event,
                include_floor=True,
            )
            measured = await measure(runners, settings.repeats, on_event)
            rtts.append(raw_socket_rtt())
            predicted = _predictions(model, preset, settings)
            results += [
                replace(r, predicted_tps=predicted.get((preset, r.spec.stages)))
                if r.spec.system == SYSTEM_LAYERLINK
                else r
                for r in measured
            ]
            if preset == REAL_MODEL and not reason:
                say(f"{preset}: greedy agreement with llama.cpp")
                from coordinator.lab.agreement import greedy_agreement

                agreement[preset] = greedy_agreement(
                    path, path / "model.gguf", threads=settings.threads, on_progress=say
                ).to_json()
    rtt_us = statistics.median(r.median_us for r in rtts)
    checks = suite_checks(results, rtt_us)
    return {
        "machine": end_load(machine),
        "command": "make bench  (coordinator bench-suite --out bench/results/latest.json)",
        "settings": {
            "models": list(settings.models),
            "stage_counts": list(settings.stage_counts),
            "prompt_tokens": settings.prompt_tokens,
            "gen_tokens": settings.gen_tokens,
            "repeats": settings.repeats,
            "interleaved": True,
            "warmup_excluded": True,
            "statistic": "median over repeats",
            "llama_threads": settings.threads,
            "llama_rpc_threads": settings.rpc_threads,
            "local_cpus": local_cpu_policy(),
        },
        "raw_socket_rtt_us": round(rtt_us, 2),
        "raw_socket": {
            "message_bytes": rtts[0].message_bytes,
            "rounds": rtts[0].rounds,
            "measurements_us": [round(r.median_us, 2) for r in rtts],
            "p10_us": [round(r.p10_us, 2) for r in rtts],
            "p90_us": [round(r.p90_us, 2) for r in rtts],
        },
        "runs": [r.to_json() for r in results],
        "agreement": agreement,
        "checks": [c.to_json() for c in checks],
        "notes": notes,
    }


def local_cpu_policy() -> str:
    """How the local nodes and floor workers are placed on the cores (node/cpus.py)."""
    from node import cpus

    return os.environ.get(cpus.ENV) or cpus.DEFAULT_POLICY


def _predictions(
    model: ModelInfo, label: str, settings: SuiteSettings
) -> dict[tuple[str, int], float]:
    """The cost model's LayerLink decode tokens/s for each stage count (even splits, loopback)."""
    from coordinator.lab.experiment import make_predictor

    predict, note = make_predictor(model, settings.prompt_tokens, settings.gen_tokens)
    if predict is None:
        log.warning("%s: %s", label, note)
        return {}
    out = {}
    for k in settings.stage_counts:
        tps = predict(even_counts(model.num_layers, k), None)
        if tps is not None:
            out[(label, k)] = tps
    return out


def scratch_dir() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="layerlink-bench-")
