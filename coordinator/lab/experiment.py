"""The split-penalty experiment: what splitting a model across stages costs, over one host and
over a (namespace) LAN at several link rates, for LayerLink and for llama.cpp RPC side by side.

Rows, per system (k = the number of stages, same layer counts in both systems):

    one process   the engine alone: mlx_lm in this process / llama.cpp in its client process
    1 stage       one worker: LayerLink coordinator + 1 node / llama.cpp client + 1 RPC server
    one host      k workers on 127.0.0.1 (the "PCIe" case of a multi-GPU PC, minus the PCIe)
    LAN           k workers in network namespaces joined by a bridge, unshaped veth links
    LAN <rate>    the same, every worker's link held to 10 GbE, 1 GB/s, 2.5 GbE, 1 GbE (tbf)
    one PC        (optional) k real nodes of one machine, one per GPU: a PCIe hop
    cluster       (optional) k real nodes on a real LAN

Each namespace condition also measures a 1-stage row over the same link, interleaved with the
k-stage row, so that load from other processes drifting between conditions cancels out:

per-hop ms = (ms/token of the k-stage row - ms/token of the same system's 1-stage row of the
same condition, else of the "1 stage" loopback row) / (k - 1).

The namespace rows need root (coordinator/lab/lan.py builds the LAN). LayerLink nodes and
llama.cpp RPC servers run inside the node namespaces; the measuring process (LayerLink's
coordinator and the llama.cpp client) runs in the LAN's hub namespace, which holds the bridge,
via `python -m coordinator.lab.experiment --worker` under `ip netns exec`. Nothing touches the
host's own network namespace.

Where the cost model (coordinator.costmodel) is present, LayerLink rows carry its predicted
tokens/s for the same split, from this machine's measured weight-streaming bandwidth and the
calibration constants (coordinator/data/calibration.csv); links are taken at their shaped rate
(unshaped: 10 GB/s, a memory copy).
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import re
import selectors
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from coordinator.calibrate import (
    LiveCalibration,
    device_ids,
    live_cluster,
    live_workload,
    stream_dtype,
)
from coordinator.costmodel import ModelSpec, Placement, predict
from coordinator.lab import bench, latency
from coordinator.lab.bench import (
    DEPLOY_IN_PROCESS,
    DEPLOY_LOOPBACK,
    SYSTEM_LAYERLINK,
    SYSTEM_LLAMA,
    BenchError,
    BenchSettings,
    NodeRef,
    RunResult,
    json_worker,
)
from coordinator.lab.lan import DATA_PORT_OFFSET, NODE_PORT, Lan, NodeProcess, unavailable_reason
from coordinator.lab.validation import session_probe
from coordinator.session import ModelInfo, even_counts, read_model

log = logging.getLogger(__name__)

RPC_PORT = 50152  # inside each node namespace; the namespaces keep it from colliding
UNSHAPED_BPS = 10e9  # bytes/s assumed for an unshaped link in the prediction
REPO = Path(__file__).resolve().parents[2]
_BANNER = re.compile(r"Starting RPC server v\d+")


@dataclass(frozen=True)
class Link:
    """A namespace-LAN condition: the direct veth link (one_way_ms None) or a wire relay in
    front of every port another namespace connects to, adding one_way_ms (+/- jitter_ms) each
    way; unshaped (rate None) or every worker's link held to a rate."""

    key: str
    label: str
    rate_bit_s: int | None
    one_way_ms: float | None = None
    jitter_ms: float = 0.0
    kind: str = ""  # what the condition stands for ("wired LAN")

    @property
    def relayed(self) -> bool:
        return self.one_way_ms is not None

    @property
    def deployment(self) -> str:
        return "LAN" if self.rate_bit_s is None and not self.relayed else f"LAN {self.label}"

    @property
    def rtt_ms(self) -> float | None:
        """The round trip the relays add (2 x one-way)."""
        return None if self.one_way_ms is None else 2.0 * self.one_way_ms


_1GBE = 1_000_000_000
LINKS: tuple[Link, ...] = (
    Link("lan", "unshaped", None),
    Link("10gbe", "10 GbE", 10_000_000_000),
    Link("riser", "1 GB/s", 8_000_000_000),  # a PCIe x1-riser-like 1 GB/s
    Link("2.5gbe", "2.5 GbE", 2_500_000_000),
    Link("1gbe", "1 GbE", _1GBE),
    # Latency (one-way, each direction), through the wire relays (coordinator/lab/wire.py).
    # "relay0" is the relay adding nothing: its difference to "lan" is the emulator's own cost.
    Link("relay0", "relay 0 ms", None, 0.0, kind="the relay alone"),
    Link("tb", "0.05 ms", None, 0.05, kind="Thunderbolt-like"),
    Link("wired", "0.25 ms", None, 0.25, kind="wired LAN"),
    Link("busy", "1 ms", None, 1.0, kind="busy LAN"),
    Link("wifi", "3±1 ms", None, 3.0, 1.0, kind="Wi-Fi"),
    Link("wifi-far", "10±3 ms", None, 10.0, 3.0, kind="Wi-Fi far from the access point"),
    Link("tb-1gbe", "0.05 ms 1 GbE", _1GBE, 0.05, kind="Thunderbolt-like at 1 GbE"),
    Link("wired-1gbe", "0.25 ms 1 GbE", _1GBE, 0.25, kind="wired LAN at 1 GbE"),
    Link("busy-1gbe", "1 ms 1 GbE", _1GBE, 1.0, kind="busy LAN at 1 GbE"),
    Link("wifi-1gbe", "3±1 ms 1 GbE", _1GBE, 3.0, 1.0, kind="Wi-Fi at 1 GbE"),
    Link("wifi-far-1gbe", "10±3 ms 1 GbE", _1GBE, 10.0, 3.0, kind="far Wi-Fi at 1 GbE"),
)
LINK_BY_DEPLOYMENT = {x.deployment: x for x in LINKS}


@dataclass(frozen=True)
class ExperimentSettings:
    model_dir: Path
    out_dir: Path
    stages: int = 2
    prompt_tokens: int = 64
    gen_tokens: int = 64
    repeats: int = 5
    links: tuple[str, ...] = tuple(x.key for x in LINKS)
    netns: bool = True  # run the namespace rows when possible
    threads: int = 1
    rpc_threads: int = 1
    sample_timeout_s: float = bench.DEFAULT_SAMPLE_TIMEOUT_S
    command: str = ""
    # Real machines (optional): k nodes of one PC (one per GPU) and k nodes on a LAN, each with
    # the llama.cpp RPC servers to use for the same split (empty: LayerLink only).
    pc_nodes: tuple[NodeRef, ...] = ()  # one per stage device (a node with --devices k: k)
    pc_rpc: tuple[str, ...] = ()
    # No PC named: the 'one PC' rows on a node of this machine with k CPU devices.
    local_pc: bool = False
    lan_nodes: tuple[NodeRef, ...] = ()
    lan_rpc: tuple[str, ...] = ()

    def bench_settings(self, systems: tuple[str, ...]) -> BenchSettings:
        return BenchSettings(
            model_dir=self.model_dir,
            systems=systems,
            stages=self.stages,
            prompt_tokens=self.prompt_tokens,
            gen_tokens=self.gen_tokens,
            repeats=self.repeats,
            threads=self.threads,
            rpc_threads=self.rpc_threads,
            sample_timeout_s=self.sample_timeout_s,
        )


def condition_of(r: RunResult) -> str:
    """The row's condition, as the report and the plots name it."""
    d = r.spec.deployment
    if d == DEPLOY_IN_PROCESS:
        return "one process"
    if d == DEPLOY_LOOPBACK:
        return "1 stage" if r.spec.stages == 1 else "one host"
    return d


DEPLOY_ONE_PC = "one PC"  # real nodes of one machine, one per GPU: the PCIe case
DEPLOY_CLUSTER = "cluster"  # real nodes on a real LAN
CONDITION_ORDER = (
    "one process",
    "1 stage",
    "one host",
    DEPLOY_ONE_PC,
    DEPLOY_CLUSTER,
    *(x.deployment for x in LINKS),
)


def select_links(keys: Sequence[str]) -> tuple[Link, ...]:
    by_key = {x.key: x for x in LINKS}
    unknown = [k for k in keys if k not in by_key]
    if unknown:
        raise ValueError(f"unknown link(s) {unknown}; choose from {list(by_key)}")
    return tuple(x for x in LINKS if x.key in keys)


# --------------------------------------------------------------------------------------------
# Prediction (LayerLink rows), where the cost model is present


Predictor = Callable[[Sequence[int], "int | None"], "float | None"]


def make_predictor(
    model: ModelInfo, prompt_tokens: int, gen_tokens: int
) -> tuple[Predictor | None, str]:
    """A function (layer counts, link rate in bit/s or None) -> predicted decode tokens/s,
    and a note saying what it rests on (or why there is none)."""
    try:
        from coordinator import catalog, costmodel
        from coordinator.calibrate import HALF_DTYPES, computed_as, stream_dtype
        from node import computedtype, devicebench
    except ImportError as e:
        return None, f"no prediction: the cost model is not available ({e})"
    try:
        spec = costmodel.ModelSpec.from_config_dir(model.path, model.name)
        # Priced in the dtype the nodes compute in (node/computedtype.py).
        dtype, factor = computed_as(stream_dtype(model.config, model.path), computedtype.policy())
        stream = devicebench.stream_bandwidth(dtype, 64 << 20).gbs / factor
        tflops = devicebench.matmul_tflops("float16" if dtype in HALF_DTYPES else "float32")
        per_layer_s = catalog.calibration("cpu_per_layer_overhead_us") * 1e-6
        latency_s = catalog.calibration("same_host_latency_us") * 1e-6
        overhead_s = catalog.calibration("hop_overhead_us") * 1e-6
    except (ValueError, KeyError, OSError) as e:
        return None, f"no prediction: {e}"
    workload = costmodel.Workload(
        context=prompt_tokens + gen_tokens + 8, prompt_tokens=prompt_tokens
    )

    def predict(counts: Sequence[int], rate_bit_s: int | None) -> float | None:
        devices = tuple(
            costmodel.DeviceSpec(
                id=f"w{i}/0",
                node=f"w{i}",
                name="CPU",
                kind="cpu",
                mem_free_bytes=1 << 40,
                stream_gbs=stream,
                matmul_tflops=tflops,
                per_layer_overhead_s=per_layer_s,
            )  # fmt: skip
            for i in range(len(counts))
        )
        bw = rate_bit_s / 8 if rate_bit_s else UNSHAPED_BPS
        links = tuple(
            costmodel.LinkSpec(f"w{i}", f"w{j}", latency_s, bw, overhead_s)
            for i in range(len(counts))
            for j in range(len(counts))
            if i != j
        )
        placements = [
            costmodel.Placement(f"w{i}/0", s, e) for i, (s, e) in enumerate(bench.ranges(counts))
        ]
        try:
            cost = costmodel.predict(spec, costmodel.Cluster(devices, links), placements, workload)
        except (ValueError, KeyError) as e:
            log.warning("prediction failed: %s", e)
            return None
        return float(cost.decode_tps)

    note = (
        f"predicted tok/s: coordinator.costmodel with this machine's measured {dtype} weight "
        f"streaming ({stream:.2f} GB/s), per-layer overhead {per_layer_s * 1e3:.2f} ms, hop "
        f"latency {latency_s * 1e6:.0f} us + overhead {overhead_s * 1e6:.0f} us "
        "(calibration.csv); unshaped links taken as 10 GB/s"
    )
    return predict, note


# --------------------------------------------------------------------------------------------
# The namespace LAN


def netns_unavailable() -> str:
    """Why the namespace rows cannot run here; empty when they can."""
    return unavailable_reason()


def _wait_banners(procs: Sequence[Any], timeout_s: float = 60.0) -> None:
    """Wait for each RPC server's start banner, then keep draining its output."""
    deadline = time.monotonic() + timeout_s
    sel = selectors.DefaultSelector()
    pending = {}
    for p in procs:
        assert p.process.stdout is not None
        sel.register(p.process.stdout, selectors.EVENT_READ)
        pending[p.process.stdout] = p
    try:
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(
                    "llama.cpp RPC server(s) in the namespaces did not start: "
                    + ", ".join(p.name for p in pending.values())
                )
            for key, _ in sel.select(timeout=min(left, 0.5)):
                p = pending[key.fileobj]
                line = p.process.stdout.readline()
                if not line:
                    raise BenchError(f"RPC server {p.name} exited:\n{p.log()}")
                if _BANNER.search(line):
                    sel.unregister(key.fileobj)
                    del pending[key.fileobj]
    finally:
        sel.close()
    for p in procs:
        threading.Thread(target=_drain, args=(p.process.stdout,), daemon=True).start()


def _drain(stream: Any) -> None:
    for _ in stream:
        pass


def run_worker(
    cmd_prefix: list[str], request: dict[str, Any], log_path: Path, timeout_s: float
) -> dict[str, Any]:
    """Run `python -m coordinator.lab.experiment --worker` (under cmd_prefix, e.g. `ip netns exec
    HUB`) with a JSON request; its reply comes back as JSON on stdout: {runs: [RunResult], and
    where the request asked for a probe, probe: ProbeResult, device_rounds: [...]}."""
    argv = [*cmd_prefix, sys.executable, "-m", "coordinator.lab.experiment", "--worker"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with log_path.open("a") as err:
        try:
            done = subprocess.run(
                argv, input=json.dumps(request), stdout=subprocess.PIPE, stderr=err, text=True,
                timeout=timeout_s, cwd=REPO, env=env,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise BenchError(
                f"the measuring process did not finish within {timeout_s:.0f}s"
            ) from None
    if done.returncode != 0 or not done.stdout.strip():
        tail = log_path.read_text(errors="replace")[-2000:]
        raise BenchError(f"the measuring process failed (exit {done.returncode}):\n{tail}")
    reply: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if "error" in reply:
        raise BenchError(str(reply["error"]))
    return reply


async def _worker(request: dict[str, Any]) -> dict[str, Any]:
    """Probe the LayerLink nodes' links and devices (when asked), then measure every runner,
    re-timing the devices before each round of samples (as `validate-planner` does)."""
    model = read_model(request["model_dir"])
    settings = BenchSettings(
        model_dir=model.path,
        systems=tuple(request["systems"]),
        stages=int(request["stages"]),
        prompt_tokens=int(request["prompt_tokens"]),
        gen_tokens=int(request["gen_tokens"]),
        repeats=int(request["repeats"]),
        rpc_threads=int(request["rpc_threads"]),
        sample_timeout_s=float(request["sample_timeout_s"]),
    )
    nodes = [NodeRef(n["name"], n["address"], n["node_id"]) for n in request["nodes"]]
    gguf = Path(request["gguf"]) if request.get("gguf") else None
    reply: dict[str, Any] = {}
    between: Callable[[int], Any] | None = None
    dtype = request.get("dtype")
    if dtype and nodes:
        from coordinator.discovery import resolve_static
        from coordinator.lab.validation import device_figures
        from coordinator.probe import probe_cluster

        try:
            records = await resolve_static([n.address for n in nodes])
        except (ConnectionError, ValueError) as e:
            raise BenchError(str(e)) from None
        probe = await probe_cluster(records, dtypes=[dtype])
        if probe.errors:
            log.warning("probe errors: %s", "; ".join(probe.errors))
        reply["probe"] = probe.to_json()
        rounds: list[dict[str, Any]] = []
        reply["device_rounds"] = rounds

        async def remeasure(_round: int) -> None:
            rounds.append(await device_figures(records, dtype))

        between = remeasure
    runners = bench.bench_runners(
        settings, model, request["model_label"], nodes, request["rpc"], gguf,
        deployment=request["deployment"], include_in_process_llama=False,
        stage_counts=[1, settings.stages],
    )  # fmt: skip
    runs = await bench.measure(
        runners, settings.repeats, None, settings.sample_timeout_s, between_rounds=between
    )
    reply["runs"] = [r.to_json() for r in runs]
    return reply


def worker_main() -> int:
    """Entry point of `python -m coordinator.lab.experiment --worker` (JSON in, JSON out)."""
    return json_worker(_worker)


# Ports inside each node namespace. Direct conditions: the node and the RPC server on the
# namespace's LAN address. Relayed conditions: a second node and RPC server on 127.0.0.1,
# reached only through the wire relays on the LAN address at the same port numbers.
RELAYED_NODE_PORT = 50161
RELAYED_RPC_PORT = 50162


@dataclass(frozen=True)
class LinkFigures:
    """One namespace condition as emulated and as the probe measured it (the cross-namespace
    links among the LayerLink nodes of the condition; medians)."""

    deployment: str
    one_way_ms: float | None
    jitter_ms: float
    rate_bit_s: int | None
    probe_latency_us: float | None = None
    probe_bandwidth_gbs: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "condition": self.deployment,
            "emulated_one_way_ms": self.one_way_ms,
            "jitter_ms": self.jitter_ms,
            "link_gbit_s": self.rate_bit_s / 1e9 if self.rate_bit_s else None,
            "probe_latency_us": self.probe_latency_us,
            "probe_bandwidth_gbs": self.probe_bandwidth_gbs,
        }


@dataclass(frozen=True)
class NetnsRows:
    rows: list[RunResult]
    links: dict[str, LinkFigures]


@dataclass
class _Workers:
    """One set of k LayerLink nodes and k RPC servers in the namespaces: the client-facing
    addresses (the relays' for the relayed set) and the node ids."""

    nodes: list[NodeRef]
    rpc: list[str]
    ports: list[int]  # the ports relays must stand in front of (relayed set)


def _start_workers(lan: Lan, k: int, systems: tuple[str, ...], rpc_threads: int,
                   relayed: bool) -> _Workers:  # fmt: skip
    host = "127.0.0.1" if relayed else ""
    port = RELAYED_NODE_PORT if relayed else NODE_PORT
    rpc_port = RELAYED_RPC_PORT if relayed else RPC_PORT
    suffix = "w" if relayed else ""
    procs = (
        [lan.start_node(i, name=f"exp{i}{suffix}", port=port, host=host) for i in range(k)]
        if SYSTEM_LAYERLINK in systems
        else []
    )
    rpcs = []
    if SYSTEM_LLAMA in systems:
        for i in range(k):
            argv = [sys.executable, "-m", "node.llama_rpc", "--host", host or lan.nodes[i].ip,
                    "--port", str(rpc_port), "--threads", str(rpc_threads)]  # fmt: skip
            rpcs.append(lan.start(i, argv, f"rpc{i}{suffix}", rpc_port, {"PYTHONUNBUFFERED": "1"}))
    if procs:
        lan.wait_ready(procs)
    _wait_banners(rpcs)
    ports = ([port, port + DATA_PORT_OFFSET] if procs else []) + ([rpc_port] if rpcs else [])
    return _Workers(
        [NodeRef(p.name, p.address, p.node_id) for p in procs],
        [p.address for p in rpcs],
        ports,
    )


def _start_relays(lan: Lan, k: int, ports: Sequence[int], link: Link) -> list[NodeProcess]:
    """A relay on each namespace's LAN address in front of each port (served on 127.0.0.1):
    every cross-namespace connection crosses exactly one relay, which delays both
    directions by the link's one-way delay."""
    assert link.one_way_ms is not None
    relays = [
        lan.start_wire(i, p, p, link.one_way_ms * 1e3, "127.0.0.1", link.jitter_ms * 1e3)
        for i in range(k)
        for p in ports
    ]
    lan.wait_ready(relays)
    return relays


def netns_rows(
    settings: ExperimentSettings,
    model: ModelInfo,
    gguf: Path | None,
    systems: tuple[str, ...],
    links: Sequence[Link],
    say: Callable[[str], None],
) -> NetnsRows:
    """k nodes and k RPC servers in namespaces; one measuring process per link condition.
    LayerLink rows carry the cost model's prediction from that condition's probe."""
    k = settings.stages
    results: list[RunResult] = []
    figures: dict[str, LinkFigures] = {}
    dtype = stream_dtype(model.config, model.path) if SYSTEM_LAYERLINK in systems else None
    with Lan(k) as lan:
        say(f"namespace LAN: {k} node namespaces, hub {lan.hub}")
        sets: dict[bool, _Workers] = {}
        shaped: int | None = None
        log_path = lan.workdir / "worker.log"
        for link in links:
            if link.relayed not in sets:
                sets[link.relayed] = _start_workers(
                    lan, k, systems, settings.rpc_threads, link.relayed
                )
            workers = sets[link.relayed]
            if link.rate_bit_s != shaped:
                for i in range(k):
                    if link.rate_bit_s is None:
                        lan.unshape(i)
                    else:
                        lan.shape(i, link.rate_bit_s)
                shaped = link.rate_bit_s
            relays = _start_relays(lan, k, workers.ports, link) if link.relayed else []
            say(f"namespace LAN, {link.label}: measuring")
            request = {
                "model_dir": str(model.path),
                "model_label": model.name,
                "systems": list(systems),
                "stages": k,
                "prompt_tokens": settings.prompt_tokens,
                "gen_tokens": settings.gen_tokens,
                "repeats": settings.repeats,
                "rpc_threads": settings.rpc_threads,
                "sample_timeout_s": settings.sample_timeout_s,
                "nodes": [
                    {"name": n.name, "address": n.address, "node_id": n.node_id}
                    for n in workers.nodes
                ],
                "rpc": workers.rpc,
                "gguf": str(gguf) if gguf else None,
                "deployment": link.deployment,
                "dtype": dtype,
            }
            budget = 300.0 + 4 * settings.repeats * settings.sample_timeout_s
            fig = LinkFigures(link.deployment, link.one_way_ms, link.jitter_ms, link.rate_bit_s)
            try:
                reply = run_worker(lan.hub_cmd([]), request, log_path, budget)
                runs = [RunResult.from_json(r) for r in reply["runs"]]
                if "probe" in reply and dtype is not None:
                    probe = session_probe(reply["probe"], reply.get("device_rounds", []), dtype)
                    ids = [n.node_id for n in workers.nodes]
                    fig = _probed(fig, probe, ids)
                    runs = [_predict_row(r, model, probe, ids, dtype, settings) for r in runs]
                results += runs
            except BenchError as e:
                for system in systems:
                    spec = bench.RunSpec(model.name, system, link.deployment, k,
                                         tuple(even_counts(model.num_layers, k)))  # fmt: skip
                    results.append(RunResult(spec, error=str(e)))
            finally:
                for relay in relays:
                    lan.stop(relay)
            figures[link.deployment] = fig
    return NetnsRows(results, figures)


def _probed(fig: LinkFigures, probe: dict[str, Any], node_ids: Sequence[str]) -> LinkFigures:
    """The condition's figures with the probe's medians over its links among node_ids."""
    mine = [lk for lk in probe.get("links", []) if lk["src"] in node_ids and lk["dst"] in node_ids]
    if not mine:
        return fig
    lat = statistics.median(float(lk["latency_us"]) for lk in mine)
    bws = [float(lk.get("bandwidth_gbs") or 0.0) for lk in mine]
    bw = statistics.median(bws) if all(b > 0 for b in bws) else None
    return replace(fig, probe_latency_us=lat, probe_bandwidth_gbs=bw)


def _predict_row(
    r: RunResult,
    model: ModelInfo,
    probe: dict[str, Any],
    node_ids: Sequence[str],
    dtype: str,
    settings: ExperimentSettings,
) -> RunResult:
    """A LayerLink row with the cost model's decode tokens/s for its split, on the probed
    cluster (links and devices) with the live calibration (coordinator/calibrate.py)."""
    if r.spec.system != SYSTEM_LAYERLINK:
        return r
    try:
        spec = ModelSpec.from_config_dir(model.path, model.name)
        cal = LiveCalibration.load()
        devices = device_ids(probe)
        placements = []
        for node_id, (start, end) in zip(node_ids, bench.ranges(r.spec.layers), strict=False):
            placements.append(Placement(devices[node_id][0], start, end))
        workload = live_workload(
            cal, settings.prompt_tokens + settings.gen_tokens + 8, settings.prompt_tokens
        )
        cost = predict(spec, live_cluster(probe, dtype, cal), placements, workload)
    except (ValueError, KeyError, IndexError, OSError) as e:
        log.warning("no prediction for %s: %s", r.spec.label, e)
        return r
    return replace(r, predicted_tps=float(cost.decode_tps))


# --------------------------------------------------------------------------------------------
# The experiment


@dataclass(frozen=True)
class ExperimentResult:
    rows: tuple[RunResult, ...]
    machine: dict[str, Any]
    notes: tuple[str, ...]
    settings: ExperimentSettings
    files: tuple[Path, ...] = ()
    links: tuple[LinkFigures, ...] = ()  # the namespace conditions, emulated and probed


async def _loopback_rows(
    settings: ExperimentSettings, model: ModelInfo, gguf: Path | None, systems: tuple[str, ...],
    scratch: Path, say: Callable[[str], None],
) -> list[RunResult]:  # fmt: skip
    k = settings.stages
    n_nodes = k if SYSTEM_LAYERLINK in systems else 0
    n_rpc = k if SYSTEM_LLAMA in systems else 0
    with bench.local_workers(n_nodes, n_rpc, scratch / "logs", settings.rpc_threads) as (
        nodes,
        eps,
    ):
        runners = bench.bench_runners(
            settings.bench_settings(systems), model, model.name, nodes, eps, gguf,
            include_mlx_lm=SYSTEM_LAYERLINK in systems, on_event=say,
        )  # fmt: skip
        return await bench.measure(runners, settings.repeats, say, settings.sample_timeout_s)


async def resolve_nodes(addresses: Sequence[str], devices: bool = False) -> tuple[NodeRef, ...]:
    """NodeRefs for nodes named by address (their name and id from GetInfo); `devices`: one
    per device each node runs stages on (a PC's node with `--devices N` gives N)."""
    import grpc

    from coordinator.nodeclient import NodeClient
    from coordinator.probe import stage_servers

    refs: list[NodeRef] = []
    for address in addresses:
        async with NodeClient(address) as client:
            try:
                info = await client.get_info()
            except grpc.aio.AioRpcError as e:
                raise BenchError(f"node {address} did not answer: {e.code().name}") from None
        if not devices:
            refs.append(NodeRef(info.name, address, info.node_id))
            continue
        refs += [
            NodeRef(info.name, served, info.node_id, label)
            for label, served in stage_servers(address, info).items()
        ]
    return tuple(refs)


async def _local_pc_rows(
    settings: ExperimentSettings, model: ModelInfo, gguf: Path | None, scratch: Path,
    say: Callable[[str], None],
) -> list[RunResult]:  # fmt: skip
    """The 'one PC' rows on this machine: one node started with `--devices k` (CPU devices:
    its own process and k - 1 device workers), the hops between its devices through host
    memory. LayerLink only (llama.cpp's RPC servers have no such node)."""
    from coordinator.lab.localcluster import LocalCluster

    k = settings.stages
    (scratch / "pc-logs").mkdir(exist_ok=True)
    with LocalCluster(0, f"pc-{os.getpid()}", log_dir=scratch / "pc-logs",
                      extra_args=["--no-advertise"]) as cluster:  # fmt: skip
        node = cluster.start_node("pc", extra_args=["--devices", str(k)])
        refs = await resolve_nodes([node.address], devices=True)
        return await _real_rows(
            settings, model, gguf, (SYSTEM_LAYERLINK,), DEPLOY_ONE_PC, refs, (), say
        )


async def _real_rows(
    settings: ExperimentSettings, model: ModelInfo, gguf: Path | None, systems: tuple[str, ...],
    deployment: str, nodes: Sequence[NodeRef], rpc: Sequence[str], say: Callable[[str], None],
) -> list[RunResult]:  # fmt: skip
    """1 stage (first node) and k stages on real nodes, interleaved; llama.cpp where servers
    were named."""
    use = tuple(s for s in systems if s != SYSTEM_LLAMA or rpc)
    runners = bench.bench_runners(
        settings.bench_settings(use), model, model.name, nodes, rpc, gguf,
        deployment=deployment, include_in_process_llama=False,
        stage_counts=[1, settings.stages], on_event=say,
    )  # fmt: skip
    return await bench.measure(runners, settings.repeats, say, settings.sample_timeout_s)


def split_penalty(
    settings: ExperimentSettings,
    systems: tuple[str, ...] = (SYSTEM_LAYERLINK, SYSTEM_LLAMA),
    on_event: Callable[[str], None] | None = None,
) -> ExperimentResult:
    """Measure every row, write results.json, results.csv, the plots and report.md."""
    say = on_event or (lambda _m: None)
    model = read_model(settings.model_dir)
    counts = even_counts(model.num_layers, settings.stages)
    if settings.stages < 2 or settings.stages > model.num_layers:
        raise ValueError(f"--stages must be between 2 and the model's {model.num_layers} layers")
    for what, group in (("--node", settings.lan_nodes), ("--pc-rpc", settings.pc_rpc),
                        ("--rpc", settings.lan_rpc)):  # fmt: skip
        if group and len(group) != settings.stages:
            raise ValueError(f"{what} must be given {settings.stages} times (once per stage)")
    if settings.pc_nodes and len(settings.pc_nodes) < settings.stages:
        raise ValueError(
            f"--pc-node: {len(settings.pc_nodes)} device(s) run stages there, --stages is "
            f"{settings.stages} (name the PC's node once, started with --devices "
            f"{settings.stages}, or one node per GPU)"
        )
    settings = replace(settings, pc_nodes=settings.pc_nodes[: settings.stages])
    links = select_links(settings.links)
    notes: list[str] = []
    machine = bench.machine_info()
    reason = bench.baseline_unavailable() if SYSTEM_LLAMA in systems else ""
    if reason:
        notes.append(f"llama.cpp rows skipped: {reason}")
        systems = tuple(s for s in systems if s != SYSTEM_LLAMA)
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    figures: tuple[LinkFigures, ...] = ()
    with bench.scratch_dir() as tmp:
        scratch = Path(tmp)
        gguf = bench.gguf_for(model.path, scratch) if SYSTEM_LLAMA in systems else None
        say("one process, 1 stage and one host (loopback)")
        rows = asyncio.run(_loopback_rows(settings, model, gguf, systems, scratch, say))
        ns_reason = "" if settings.netns else "namespace rows not requested (--no-netns)"
        if not ns_reason and links:
            ns_reason = netns_unavailable()
        for deployment, nodes, rpc in (
            (DEPLOY_ONE_PC, settings.pc_nodes, settings.pc_rpc),
            (DEPLOY_CLUSTER, settings.lan_nodes, settings.lan_rpc),
        ):
            if nodes:
                say(f"{deployment}: {', '.join(n.address for n in nodes)}")
                rows += asyncio.run(
                    _real_rows(settings, model, gguf, systems, deployment, nodes, rpc, say)
                )
                if SYSTEM_LLAMA in systems and not rpc:
                    notes.append(f"{deployment}: no llama.cpp RPC servers named, LayerLink only")
        if settings.local_pc and not settings.pc_nodes and SYSTEM_LAYERLINK in systems:
            say(f"one PC: a node of this machine with {settings.stages} devices")
            rows += asyncio.run(_local_pc_rows(settings, model, gguf, scratch, say))
            notes.append(
                f"'one PC' rows: one node of this machine started with --devices "
                f"{settings.stages} (CPU devices: its process and {settings.stages - 1} device "
                "worker(s)); each hop between its devices goes through host memory (loopback), "
                "as a hop between two GPUs of a PC does (plus the GPUs' copies); LayerLink only"
            )
        if ns_reason:
            notes.append(f"namespace-LAN rows skipped: {ns_reason}")
        elif links:
            ns = netns_rows(settings, model, gguf, systems, links, say)
            rows += ns.rows
            figures = tuple(ns.links.values())
    rows = bench.with_per_hop(rows)
    predictor, pnote = make_predictor(model, settings.prompt_tokens, settings.gen_tokens)
    notes.append(pnote)
    if predictor is not None:
        # This machine's figures predict the loopback rows; the namespace rows were predicted
        # from their own condition's probe; real machines are not predicted from here.
        rows = [
            replace(r, predicted_tps=predictor(r.spec.layers, None))
            if r.spec.system == SYSTEM_LAYERLINK and r.spec.deployment == DEPLOY_LOOPBACK
            else r
            for r in rows
        ]
    if figures:
        notes.append(
            "namespace rows' predicted tok/s: coordinator.costmodel on that condition's probe "
            "(each link's measured latency and bandwidth through the relays, the devices timed "
            "before every round) with the live calibration: " + LiveCalibration.load().describe()
        )
    rows.sort(
        key=lambda r: (_order(r), r.spec.stages, r.spec.system != SYSTEM_LAYERLINK, r.spec.system)
    )
    result = ExperimentResult(
        tuple(rows), bench.end_load(machine), tuple(notes), settings, links=figures
    )
    files = write_outputs(result, counts)
    return replace(result, files=tuple(files))


def _order(r: RunResult) -> int:
    c = condition_of(r)
    return CONDITION_ORDER.index(c) if c in CONDITION_ORDER else len(CONDITION_ORDER)


def _rate_gbit(r: RunResult) -> float | None:
    for x in LINKS:
        if x.deployment == r.spec.deployment and x.rate_bit_s:
            return x.rate_bit_s / 1e9
    return None


def row_json(r: RunResult, figures: Sequence[LinkFigures] = ()) -> dict[str, Any]:
    """The row as results.json holds it: the condition, its link (rate; emulated one-way
    delay and jitter; the probe's latency and bandwidth where probed), the measurement and
    the prediction's relative error."""
    link = LINK_BY_DEPLOYMENT.get(r.spec.deployment)
    probed = {f.deployment: f for f in figures}.get(r.spec.deployment)
    measured, predicted = r.decode_tps, r.predicted_tps
    error = predicted / measured - 1.0 if measured and predicted else None
    return {
        "condition": condition_of(r),
        "link_gbit_s": _rate_gbit(r),
        "one_way_ms": link.one_way_ms if link else None,
        "jitter_ms": link.jitter_ms if link and link.relayed else None,
        "probe_latency_us": probed.probe_latency_us if probed else None,
        "probe_bandwidth_gbs": probed.probe_bandwidth_gbs if probed else None,
        **r.to_json(),
        "prediction_error": round(error, 4) if error is not None else None,
    }


# --------------------------------------------------------------------------------------------
# Outputs: results.json, results.csv, plots, report.md

CSV_FIELDS = ("condition", "system", "deployment", "stages", "layers", "link_gbit_s",
              "one_way_ms", "jitter_ms", "probe_latency_us", "probe_bandwidth_gbs", "repeats",
              "decode_tps", "decode_tps_min", "decode_tps_max", "ms_per_token", "ttft_s",
              "prefill_tps", "per_hop_ms", "predicted_tps", "prediction_error",
              "error")  # fmt: skip


def write_outputs(result: ExperimentResult, counts: Sequence[int]) -> list[Path]:
    out = result.settings.out_dir
    rows = [row_json(r, result.links) for r in result.rows]
    doc: dict[str, Any] = {
        "experiment": "split-penalty",
        "command": result.settings.command,
        "model": str(result.settings.model_dir),
        "stages": result.settings.stages,
        "layers": list(counts),
        "settings": {
            "prompt_tokens": result.settings.prompt_tokens,
            "gen_tokens": result.settings.gen_tokens,
            "repeats": result.settings.repeats,
            "llama_threads": result.settings.threads,
            "llama_rpc_threads": result.settings.rpc_threads,
            "statistic": "median over interleaved repeats, warm-up excluded",
        },
        "machine": result.machine,
        "notes": list(result.notes),
        "links": [f.to_json() for f in result.links],
        "rows": rows,
    }
    doc["latency"] = latency.analyse(rows)
    files = [out / "results.json", out / "results.csv"]
    files[0].write_text(json.dumps(doc, indent=2) + "\n")
    with files[1].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({**row, "layers": "+".join(str(c) for c in row["layers"])})
    files += plot(rows, out)
    if doc["latency"]["points"]:
        files.append(latency.plot(rows, out / "latency.png", _title(doc)))
    files.append(out / "report.md")
    files[-1].write_text(report_markdown(doc))
    return files


SYSTEM_STYLE = {
    SYSTEM_LAYERLINK: ("LayerLink", "tab:blue"),
    SYSTEM_LLAMA: ("llama.cpp RPC", "tab:orange"),
}


def _series(
    rows: list[dict[str, Any]], system: str, key: str, conditions: list[str]
) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for i, c in enumerate(conditions):
        for r in rows:
            # Namespace conditions also hold a 1-stage row (the per-hop reference measured
            # in the same window, over the same link): the plots show the k-stage rows.
            split = r["stages"] > 1 or c == "1 stage"
            if r["system"] == system and r["condition"] == c and split and r.get(key) is not None:
                xs.append(i)
                ys.append(float(r[key]))
    return xs, ys


def plot(rows: list[dict[str, Any]], out: Path) -> list[Path]:
    """decode.png (tokens/s and per-hop ms vs link, both systems) and ttft.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = {r["condition"] for r in rows}
    conditions = [c for c in CONDITION_ORDER if c in present and c != "one process"]
    hop_conditions = [c for c in conditions if c != "1 stage"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for system, (name, color) in SYSTEM_STYLE.items():
        xs, ys = _series(rows, system, "decode_tps", conditions)
        if xs:
            ax1.plot(xs, ys, "o-", color=color, label=name)
        xs, ys = _series(rows, system, "predicted_tps", conditions)
        if xs:
            ax1.plot(xs, ys, "x--", color=color, alpha=0.6, label=f"{name} predicted")
        xs, ys = _series(rows, system, "per_hop_ms", hop_conditions)
        if xs:
            ax2.plot(xs, ys, "o-", color=color, label=name)
    ax1.set_xticks(range(len(conditions)), conditions, rotation=30, ha="right")
    ax1.set_ylabel("decode tokens/s (median)")
    ax1.set_yscale("log")
    ax1.set_title("decode speed")
    ax2.set_xticks(range(len(hop_conditions)), hop_conditions, rotation=30, ha="right")
    ax2.set_ylabel("per-hop overhead, ms per token")
    ax2.axhline(0.0, color="grey", linewidth=0.5)
    ax2.set_title("per-hop overhead vs 1 stage")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    decode = out / "decode.png"
    fig.savefig(decode, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system, (name, color) in SYSTEM_STYLE.items():
        xs, ys = _series(rows, system, "ttft_s", conditions)
        if xs:
            ax.plot(xs, [y * 1e3 for y in ys], "o-", color=color, label=name)
    ax.set_xticks(range(len(conditions)), conditions, rotation=30, ha="right")
    ax.set_ylabel("time to first token, ms (median)")
    ax.set_title("TTFT")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    ttft = out / "ttft.png"
    fig.savefig(ttft, dpi=110)
    plt.close(fig)
    return [decode, ttft]


def _cell(x: Any, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def comparison_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per condition: is LayerLink's per-hop overhead below llama.cpp RPC's?"""
    lines = []
    for c in CONDITION_ORDER:
        hops = {
            r["system"]: r
            for r in rows
            if r["condition"] == c and r["per_hop_ms"] is not None and not r["error"]
        }
        ll, lc = hops.get(SYSTEM_LAYERLINK), hops.get(SYSTEM_LLAMA)
        if not ll or not lc:
            continue
        a, b = ll["per_hop_ms"], lc["per_hop_ms"]
        verdict = "lower" if a < b else "NOT lower"
        lines.append(
            f"- {c}: LayerLink {a:.3f} ms per hop, llama.cpp RPC {b:.3f} ms: LayerLink's is {verdict}."
        )
    return lines


def report_markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    s = doc["settings"]
    lines = [
        "# Split-penalty experiment",
        "",
        f"Model `{doc['model']}`, {doc['stages']} stages (layers {'+'.join(map(str, doc['layers']))}), "
        f"{s['gen_tokens']} generated tokens after a {s['prompt_tokens']}-token prompt, "
        f"median of {s['repeats']} interleaved repeats, warm-up excluded.",
        "",
        "Reproduce:",
        "",
        "```",
        doc["command"] or "coordinator experiment split-penalty --model MODEL --out DIR",
        "```",
        "",
        "## Results",
        "",
        "| condition | system | stages | layers | tok/s | range | ms/token | TTFT ms | prefill tok/s | per-hop ms | predicted tok/s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        ttft = r["ttft_s"]
        rng = (f"{r['decode_tps_min']:.1f}–{r['decode_tps_max']:.1f}"
               if r["decode_tps_min"] is not None else "–")  # fmt: skip
        err = (r["error"] or "").replace("|", "/").replace("\n", " ")[:160]
        lines.append(
            f"| {r['condition']} | {r['system']} | {r['stages']} | "
            f"{'+'.join(map(str, r['layers']))} | {_cell(r['decode_tps'], '.1f')} | {rng} | "
            f"{_cell(r['ms_per_token'], '.2f')} | {_cell(ttft * 1e3 if ttft else None, '.1f')} | "
            f"{_cell(r['prefill_tps'], '.0f')} | {_cell(r['per_hop_ms'], '.3f')} | "
            f"{_cell(r['predicted_tps'], '.1f')} | {err} |"
        )
    comp = comparison_lines(doc["rows"])
    lines += ["", "per-hop ms = (ms/token of the k-stage row - ms/token of the same system's "
              "1-stage row of the same condition, measured interleaved with it) / (stages - 1); "
              "the one-host row uses the loopback 1-stage row.", ""]  # fmt: skip
    if comp:
        lines += ["## Per-hop overhead, LayerLink vs llama.cpp RPC", "", *comp, ""]
    lines += latency_markdown(doc)
    lines += [
        "## Plots",
        "",
        "![decode tokens/s and per-hop overhead](decode.png)",
        "",
        "![time to first token](ttft.png)",
        "",
        "## Machine",
        "",
        f"- {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, "
        f"{(m.get('mem_total_bytes') or 0) / 2**30:.0f} GiB; {m.get('platform')}",
        f"- python {m.get('python')}, mlx {m.get('mlx')}, mlx-lm {m.get('mlx_lm')}, "
        f"llama-cpp-python {m.get('llama_cpp_python')}, commit {m.get('git_commit')}",
        f"- load average {m.get('loadavg_start')} at the start, {m.get('loadavg_end')} at the end; "
        f"{m.get('time_utc')}",
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in doc["notes"]],
        "",
    ]
    return "\n".join(lines)


def render(out: Path) -> list[Path]:
    """report.md and latency.png again from out/results.json (its analysis recomputed by this
    code): for a run whose report predates a change in the analysis."""
    path = out / "results.json"
    doc = json.loads(path.read_text())
    doc["latency"] = latency.analyse(doc["rows"])
    path.write_text(json.dumps(doc, indent=2) + "\n")
    files = [path]
    if doc["latency"]["points"]:
        files.append(latency.plot(doc["rows"], out / "latency.png", _title(doc)))
    (out / "report.md").write_text(report_markdown(doc))
    return [*files, out / "report.md"]


def _title(doc: dict[str, Any]) -> str:
    layers = "+".join(str(c) for c in doc.get("layers", []))
    return f"{Path(doc['model']).name}, {doc['stages']} stages ({layers} layers)"


def latency_markdown(doc: dict[str, Any]) -> list[str]:
    """The latency section of report.md: the conditions as emulated and probed, the
    generated paragraph, the slopes and the chart (nothing when no latency row ran)."""
    lat = doc.get("latency") or {}
    if not any((lat.get("points") or {}).values()):
        return []
    lines = [
        "## Latency",
        "",
        lat["paragraph"],
        "",
        "| condition | emulated one-way ms | jitter ms | rate Gbit/s | probed one-way us | "
        "probed GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for f in doc.get("links", []):
        lines.append(
            f"| {f['condition']} | {_cell(f['emulated_one_way_ms'], 'g')} | "
            f"{_cell(f['jitter_ms'] or None, 'g')} | {_cell(f['link_gbit_s'], 'g')} | "
            f"{_cell(f['probe_latency_us'], '.0f')} | {_cell(f['probe_bandwidth_gbs'], '.2f')} |"
        )
    lines += ["", "| system | per-hop ms per ms RTT | ± (std. error) | ms/token per ms RTT | "
              "per-hop ms at 0 |", "|---|---|---|---|---|"]  # fmt: skip
    for system, f in lat["slopes"].items():
        lines.append(
            f"| {system} | {_cell(f['per_hop_ms_per_ms_rtt'], '.3f')} | "
            f"{_cell(f.get('per_hop_ms_per_ms_rtt_stderr'), '.3f')} | "
            f"{_cell(f['ms_per_token_per_ms_rtt'], '.3f')} | {_cell(f['per_hop_ms_at_0'], '.3f')} |"
        )
    lines += [
        "",
        "Latency rows go through wire relays (coordinator/lab/wire.py) on each namespace's LAN "
        "address, one in front of every port another namespace connects to: each "
        "cross-namespace connection crosses one relay, delayed by the one-way figure in each "
        "direction. Slopes are least-squares lines over the split rows against RTT = 2 x "
        "one-way, the relay at 0 ms included.",
        "",
        "![decode tokens/s, per-hop ms and TTFT against link latency](latency.png)",
        "",
    ]
    return lines


def command_line(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        sys.exit(worker_main())
    sys.exit("usage: python -m coordinator.lab.experiment --worker  (JSON request on stdin)")
