"""A coordinator session: from discovered nodes to a loaded, streaming pipeline.

Shared by `coordinator up`, `run`, `demo` and the benchmarks: find nodes, read the model,
choose a plan, load the stages with a progress display, and open the pipeline.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from coordinator.nodeclient import NodeClient
from coordinator.pipeline import Pipeline
from coordinator.plan import Plan, ServingPlan, Stage, split_by_weights
from node.mdns import NodeRecord

if TYPE_CHECKING:
    from coordinator.shipboard import ShipBoard

log = logging.getLogger(__name__)


class SessionError(RuntimeError):
    """Something the user must fix (no nodes, bad model folder, too few layers, ...)."""


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    config: dict[str, Any]
    gguf: Path | None = None  # the GGUF file the folder was converted from, if any


def read_model(path: str | Path) -> ModelInfo:
    """A model folder, a GGUF file, `ollama:NAME[:TAG]` or a Hugging Face repo id
    (coordinator/modelsource.py); a model the stage engine cannot run exactly is refused
    here, before any node is touched."""
    from coordinator.modelsource import ModelSourceError, resolve_model
    from node.architectures import shape_error, unsupported_reason

    try:
        source = resolve_model(str(path))
    except ModelSourceError as e:
        raise SessionError(str(e)) from None
    p = source.path
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise SessionError(f"{p} has no config.json: not a model folder")
    try:
        config = json.loads(cfg_path.read_text())
    except OSError as e:
        raise SessionError(f"cannot read {cfg_path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise SessionError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise SessionError(f"{cfg_path} does not hold a JSON object")
    reason = unsupported_reason(config)
    if reason is not None:
        raise SessionError(f"{source.name}: {reason}")
    problem = shape_error(config)
    if problem is not None:
        raise SessionError(f"{cfg_path}: {problem}")
    if not any(p.glob("*.safetensors")):
        raise SessionError(f"{p} has no *.safetensors weights: not a model folder LayerLink reads")
    cfg = config.get("text_config", config)
    try:
        return ModelInfo(
            path=p.resolve(),
            name=source.name,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=int(cfg["hidden_size"]),
            vocab_size=int(cfg["vocab_size"]),
            config=config,
            gguf=source.gguf,
        )
    except KeyError as e:
        raise SessionError(f"{cfg_path} lacks {e}") from None


async def node_infos(records: list[NodeRecord]) -> dict[str, Any]:
    """GetInfo from every node, concurrently; a node that does not answer is an error."""

    async def one(rec: NodeRecord) -> Any:
        async with NodeClient(rec.address) as c:
            try:
                return await c.get_info(timeout=10.0)
            except grpc.aio.AioRpcError as e:
                raise SessionError(
                    f"node {rec.name} at {rec.address} did not answer: {e.code().name}"
                ) from None

    infos = await asyncio.gather(*(one(r) for r in records))
    return {r.node_id: i for r, i in zip(records, infos, strict=True)}


@dataclass(frozen=True)
class StageDevice:
    """A device a node runs stages on, where its stages are served, and its free memory."""

    record: NodeRecord
    device: str  # the device's label on its node ("0", "1", ...)
    address: str  # host:port of the process that serves its stages
    mem_free_bytes: int


def stage_devices(record: NodeRecord, info: Any) -> list[StageDevice]:
    """Every device a node runs stages on (NodeInfo.devices[*].runs_stages, served by the
    node's own process or by a device worker of its own); a node from before that field
    runs them on its first device."""
    from coordinator.probe import stage_servers

    by_label = {str(d.index): d for d in info.devices}
    return [
        StageDevice(record, label, address, int(by_label[label].mem_free_bytes))
        for label, address in stage_servers(record.address, info).items()
    ]


async def all_stage_devices(records: list[NodeRecord]) -> list[StageDevice]:
    """The devices of every node that run stages, nodes by name, devices in their order."""
    infos = await node_infos(records)
    ordered = sorted(records, key=lambda r: (r.name, r.node_id))
    return [d for r in ordered for d in stage_devices(r, infos[r.node_id])]


async def memory_plan(
    model: ModelInfo, records: list[NodeRecord], max_stages: int | None = None
) -> Plan:
    """Contiguous layer ranges proportional to the free memory of each device the nodes run
    stages on (the placement used until measurements are available; the planner replaces
    it): a PC with `--devices 3` holds three stages, one per GPU, each sized by that GPU."""
    if not records:
        raise SessionError("no nodes to place the model on")
    targets = await all_stage_devices(records)
    targets = targets[: min(max_stages or len(targets), model.num_layers)]
    free = [max(1, t.mem_free_bytes) for t in targets]
    ranges = split_by_weights(model.num_layers, [float(f) for f in free])
    return Plan(
        model=model.name,
        num_layers=model.num_layers,
        stages=_stages_on(targets, ranges),
        explanation="layers split in proportion to each device's free memory",
    )


def _stages_on(targets: list[StageDevice], ranges: list[tuple[int, int]]) -> tuple[Stage, ...]:
    return tuple(
        Stage(
            node_id=t.record.node_id,
            node_name=t.record.name,
            address=t.address,
            start=s,
            end=e,
            device=t.device,
        )  # fmt: skip
        for t, (s, e) in zip(targets, ranges, strict=True)
    )


async def even_plan(model: ModelInfo, records: list[NodeRecord]) -> Plan:
    """mlx-lm's split over every device the nodes run stages on: equal layer counts."""
    if not records:
        raise SessionError("no nodes to place the model on")
    targets = (await all_stage_devices(records))[: model.num_layers]
    counts = even_counts(model.num_layers, len(targets))
    ranges, start = [], 0
    for n in counts:
        ranges.append((start, start + n))
        start += n
    return Plan(
        model=model.name,
        num_layers=model.num_layers,
        stages=_stages_on(targets, ranges),
        explanation=f"fixed split {counts}",
    )


def fixed_plan(model: ModelInfo, records: list[NodeRecord], layer_counts: list[int]) -> Plan:
    """A plan with explicit layer counts per node (each on its first device), in the given
    node order."""
    if (
        len(layer_counts) != len(records)
        or sum(layer_counts) != model.num_layers
        or min(layer_counts) < 1
    ):
        raise SessionError(
            f"layer counts {layer_counts} must be positive, one per node, summing to {model.num_layers}"
        )
    stages, start = [], 0
    for r, n in zip(records, layer_counts, strict=True):
        stages.append(
            Stage(
                node_id=r.node_id, node_name=r.name, address=r.address, start=start, end=start + n
            )
        )
        start += n
    return Plan(
        model=model.name,
        num_layers=model.num_layers,
        stages=tuple(stages),
        explanation=f"fixed split {layer_counts}",
    )


def even_counts(num_layers: int, n: int) -> list[int]:
    base, extra = divmod(num_layers, n)
    return [base + (1 if i < extra else 0) for i in range(n)]


async def open_pipeline(
    plan: Plan,
    model: ModelInfo,
    show_progress: bool = True,
    ship: bool = True,
    board: ShipBoard | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> Pipeline:
    """Ship each node the tensors of its stages it lacks (`ship`; progress on the terminal
    and to the dashboard's `board`), load every stage of the plan and open its streams;
    `on_phase` hears each step's name ("shipping weights", "loading stages")."""
    phase = on_phase or (lambda name: None)
    pipeline = Pipeline(plan, str(model.path))
    if ship:
        phase("shipping weights")
        from coordinator.shipping import ShipError, ship_plan

        if board is not None:
            board.begin(plan.plan_id)
        try:
            shipped = await ship_plan(
                plan,
                model.path,
                model.name,
                model.num_layers,
                model.config,
                show_progress,
                board=board,
            )
        except ShipError as e:
            if board is not None:
                board.fail(str(e))
            raise SessionError(str(e)) from None
        pipeline.weights_ids = {s.stage_index: s.weights_id for s in shipped if s.weights_id}
    phase("loading stages")
    try:
        if show_progress:
            from rich.progress import Progress

            with Progress(transient=True) as progress:
                n = len(plan.stages)
                task = progress.add_task(f"loading {n} stage(s)", total=n)
                await pipeline.load(lambda i, r: progress.advance(task))
        else:
            await pipeline.load()
        await pipeline.open()
    except BaseException:
        # A start or re-plan that fails part-way leaves no stage resident on any node.
        await pipeline.close()
        raise
    return pipeline


def encode_prompt(tokenizer: Any, text: str, chat: bool) -> list[int]:
    """Token ids of `text`; with `chat`, as one user turn in the model's chat template."""
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True
        )
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer.encode(text)]


def answer_text(tokenizer: Any, tokens: list[int]) -> str:
    """The text of generated tokens, without the end-of-turn token that stopped them."""
    stops = set(tokenizer.eos_token_ids)
    if tokens and tokens[-1] in stops:
        tokens = tokens[:-1]
    return str(tokenizer.decode(tokens))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")


def load_tokenizer(model: ModelInfo) -> Any:
    """The model's tokenizer; a folder without one (or with a broken one) is a SessionError."""
    from mlx_lm.utils import load_tokenizer as _load

    if not any((model.path / name).is_file() for name in TOKENIZER_FILES):
        raise SessionError(
            f"{model.path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}): copy the "
            "tokenizer files of the model into the folder"
        )
    try:
        return _load(model.path)
    except Exception as e:  # transformers raises many kinds for a broken tokenizer
        raise SessionError(
            f"cannot load the tokenizer in {model.path}: {type(e).__name__}: {e}"
        ) from None


@dataclass(frozen=True)
class MeasuredPlan:
    """A plan chosen by the planner from fresh measurements, with what it predicts."""

    plan: Plan
    choice: Any  # coordinator.planner.PlanChoice
    probe: Any  # coordinator.probe.ProbeResult


def device_map(
    probe_json: dict[str, Any], records: list[NodeRecord]
) -> dict[str, tuple[str, str, str, str]]:
    """Device id as `Cluster.from_probe_json` names it -> (node_id, node name, address, label)."""
    by_id = {r.node_id: r for r in records}
    names: dict[str, str] = {}
    out: dict[str, tuple[str, str, str, str]] = {}
    for node in probe_json.get("nodes", []):
        node_id = str(node["id"])
        name = str(node.get("name") or node_id)
        if name in names.values():
            name = f"{name}-{node_id[:6]}"
        names[node_id] = name
        rec = by_id.get(node_id)
        if rec is None:
            continue
        for i, d in enumerate(node.get("devices", [])):
            label = str(d.get("index", i))
            # A device served by a worker process of its node has an address of its own.
            out[f"{name}/{label}"] = (
                node_id,
                rec.name,
                str(d.get("address") or rec.address),
                label,
            )
    return out


@dataclass(frozen=True)
class Measured:
    """What planning on the live cluster starts from: the model's shapes, the measured
    cluster with the fitted constants, the workload, and the probe it came from."""

    spec: Any  # coordinator.costmodel.ModelSpec
    cluster: Any  # coordinator.costmodel.Cluster
    workload: Any  # coordinator.costmodel.Workload
    probe: Any  # coordinator.probe.ProbeResult
    devices: dict[str, tuple[str, str, str, str]]  # for planner.to_plan


async def measure(
    model: ModelInfo,
    records: list[NodeRecord],
    concurrency: int = 1,
    context: int = 2048,
    prompt_tokens: int | None = None,
) -> Measured:
    """Probe the nodes and links. `prompt_tokens` (default: min(512, context / 2)) is the
    prompt the TTFT is predicted for."""
    from coordinator.calibrate import (
        LiveCalibration,
        live_cluster,
        live_workload,
        probe_dtypes,
        stream_dtype,
    )
    from coordinator.costmodel import ModelSpec
    from coordinator.probe import probe_cluster

    # Devices are timed in the dtype the model's weights stream in; the fitted constants
    # (coordinator/data/calibration.csv, `coordinator validate-planner --calibrate`) add what
    # the probe cannot see: achieved-vs-probed factors and per-layer/hop/token overheads.
    dtype = stream_dtype(model.config, model.path)
    probe = await probe_cluster(records, dtypes=probe_dtypes(dtype))
    probe_json = probe.to_json()
    cal = LiveCalibration.load()
    cluster = live_cluster(probe_json, dtype, cal)
    if not cluster.devices:
        raise SessionError("the probe could not time any device: " + "; ".join(probe.errors))
    spec = ModelSpec.from_config_dir(model.path)
    prompt = min(context, prompt_tokens) if prompt_tokens else min(512, context // 2)
    workload = live_workload(cal, context, max(1, prompt), concurrency)
    return Measured(spec, cluster, workload, probe, device_map(probe_json, records))


async def measured_plan(
    model: ModelInfo,
    records: list[NodeRecord],
    objective: str = "latency",
    concurrency: int = 1,
    context: int = 2048,
    prompt_tokens: int | None = None,
) -> MeasuredPlan:
    """Probe the nodes and links, then let the planner choose devices, order and ranges."""
    from coordinator import planner

    m = await measure(model, records, concurrency, context, prompt_tokens)
    choice = planner.plan(m.spec, m.cluster, m.workload, objective)
    if not choice.fits:
        raise SessionError(f"the model does not fit on the cluster: {choice.explanation}")
    plan = planner.to_plan(choice, model.num_layers, m.devices)
    return MeasuredPlan(plan=plan, choice=choice, probe=m.probe)


async def measured_serving_plan(
    model: ModelInfo,
    records: list[NodeRecord],
    concurrency: int,
    context: int = 2048,
    *,
    replicas: int | None = None,
    min_tps: float | None = None,
    prompt_tokens: int | None = None,
) -> tuple[ServingPlan, Any, Any]:
    """Probe the nodes and links, then compare one pipeline, replicas and mixes for
    `concurrency` requests (coordinator/replicas.py): (the serving plan, the ServingChoice
    with every candidate, the probe result)."""
    from coordinator.replicas import plan_serving, to_serving_plan

    m = await measure(model, records, concurrency, context, prompt_tokens)
    try:
        choice = plan_serving(m.spec, m.cluster, m.workload, replicas=replicas, min_tps=min_tps)
    except ValueError as e:
        raise SessionError(f"--replicas: {e}") from None
    if not choice.fits:
        raise SessionError(f"the model does not fit on the cluster: {choice.explanation}")
    return to_serving_plan(choice, model.num_layers, m.devices), choice, m.probe


PLACEMENTS = ("planned", "memory", "even")


async def choose_plan(
    model: ModelInfo,
    records: list[NodeRecord],
    placement: str,
    objective: str = "latency",
    concurrency: int = 1,
    context: int = 2048,
    prompt_tokens: int | None = None,
) -> Plan:
    """The plan for `coordinator up`/`run`: measured and planned (default), or a naive split."""
    chosen = await select_plan(
        model, records, placement, objective, concurrency, context, prompt_tokens
    )
    return chosen[0]


async def select_plan(
    model: ModelInfo,
    records: list[NodeRecord],
    placement: str,
    objective: str = "latency",
    concurrency: int = 1,
    context: int = 2048,
    prompt_tokens: int | None = None,
) -> tuple[Plan, Any]:
    """`choose_plan`, with the probe result it planned from (a coordinator.probe.ProbeResult;
    None for the naive splits, which measure nothing)."""
    if placement == "planned":
        m = await measured_plan(model, records, objective, concurrency, context, prompt_tokens)
        return m.plan, m.probe
    if placement == "memory":
        return await memory_plan(model, records), None
    if placement == "even":
        return await even_plan(model, records), None
    raise SessionError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)}")
