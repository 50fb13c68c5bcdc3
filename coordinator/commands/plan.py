"""`coordinator plan`: choose stages and predict tokens/s, for the live cluster (--model PATH)
or for hardware you do not have (--what-if FILE).

Planning itself is pure (coordinator.planner); this module only reads inputs and prints."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from coordinator import console
from coordinator.calibrate import LiveCalibration
from coordinator.commands._common import add_discovery_args, add_replica_args, serving_mode
from coordinator.costmodel import GIB, Cluster, ModelSpec, Workload
from coordinator.errors import UserError
from coordinator.planner import OBJECTIVES, PlanChoice, plan
from coordinator.replicas import ServingChoice, plan_serving
from coordinator.whatif import (
    WhatIfError,
    brief_table_markdown,
    choice_json,
    load,
    serving_json,
    serving_table_markdown,
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "plan",
        help="choose devices and layer ranges and predict tokens/s (live cluster or what-if)",
        description=(
            "Plan a model over the live cluster (--model PATH) or over hardware described in a "
            "JSON file (--what-if FILE); see docs/planning.md."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--what-if", metavar="FILE", help="plan hardware described in FILE (JSON)")
    src.add_argument(
        "--model",
        metavar="PATH",
        help="plan this model (folder, GGUF file, ollama:NAME or repo id) on the live cluster",
    )
    src.add_argument(
        "--brief-table",
        action="store_true",
        help="print the what-if table of docs/planning.md (markdown)",
    )
    src.add_argument(
        "--serving-table",
        nargs="+",
        metavar="FILE",
        help="print docs/planning.md's replicas table for these what-if files (markdown)",
    )
    p.add_argument(
        "--levels",
        default="1,6,24",
        metavar="M,M,...",
        help="--serving-table: the numbers of concurrent users (default: 1,6,24)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--objective", choices=OBJECTIVES, default="latency")
    p.add_argument("--concurrency", type=int, default=None, metavar="M", help="requests in flight")
    p.add_argument("--context", type=int, default=None, help="KV-cache size in tokens")
    p.add_argument("--prompt-tokens", type=int, default=None, help="prompt length for TTFT")
    add_replica_args(p)
    # Discovery options for the live cluster, as `coordinator probe` takes them.
    add_discovery_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.concurrency is not None and args.concurrency < 1:
        raise UserError("--concurrency must be >= 1")
    replicas = serving_mode(args)
    if args.brief_table:
        # Markdown for docs/planning.md: one line per row, never wrapped to the terminal.
        console.console.print(brief_table_markdown(), soft_wrap=True, markup=False, highlight=False)
        return 0
    if args.serving_table:
        try:
            levels = [int(x) for x in args.levels.split(",")]
        except ValueError:
            raise UserError(
                f"--levels must be numbers separated by commas, not {args.levels!r}"
            ) from None
        if not levels or min(levels) < 1:
            raise UserError("--levels must be >= 1")
        try:
            table = serving_table_markdown(args.serving_table, levels)
        except WhatIfError as e:
            raise UserError(str(e)) from e
        console.console.print(table, soft_wrap=True, markup=False, highlight=False)
        return 0
    if args.what_if:
        try:
            w = load(args.what_if)
        except WhatIfError as e:
            raise UserError(str(e)) from e
        model, cluster, workload = w.model, w.cluster, w.workload
    else:
        from coordinator.session import SessionError, read_model

        try:
            info = read_model(args.model)  # a folder, a GGUF, ollama:NAME or a repo id
            model = ModelSpec.from_config_dir(info.path, info.name)
        except (SessionError, ValueError) as e:
            raise UserError(str(e)) from e
        cluster, _ = live_cluster(args)
        cal = LiveCalibration.load()
        workload = replace(Workload(), sample_s=cal.token_overhead_s, ring_hop=cal.ring_hop)

    try:
        workload = replace(
            workload,
            concurrency=_given(args.concurrency, workload.concurrency),
            context=_given(args.context, workload.context),
            prompt_tokens=_given(args.prompt_tokens, workload.prompt_tokens),
        )
    except ValueError as e:
        raise UserError(str(e)) from e
    if replicas:
        try:
            serving = plan_serving(
                model, cluster, workload, replicas=args.replicas, min_tps=args.min_tps
            )
        except ValueError as e:
            raise UserError(f"--replicas: {e}") from e
        if args.json:
            console.print_json(serving_json(serving, cluster))
        else:
            show_serving(serving, cluster)
        return 0
    choice = plan_cluster(model, cluster, workload, args.objective)
    if args.json:
        console.print_json(choice_json(choice, cluster))
    else:
        show(choice, cluster)
    return 0


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def plan_cluster(
    model: ModelSpec, cluster: Cluster, workload: Workload, objective: str = "latency"
) -> PlanChoice:
    """The planning step shared by live and what-if use: pure, no discovery."""
    return plan(model, cluster, workload, objective)


def live_cluster(
    args: argparse.Namespace,
) -> tuple[Cluster, Mapping[str, tuple[str, str, str, str]]]:
    """Discovery + probe (devices timed in the model's dtype): the measured Cluster with the
    fitted live constants applied (coordinator/calibrate.py) and, per device id, (node_id,
    node_name, address, device label) for `planner.to_plan`."""
    import asyncio

    from coordinator.calibrate import live_cluster as calibrated
    from coordinator.calibrate import probe_dtypes, stream_dtype
    from coordinator.commands._common import discover
    from coordinator.probe import probe_cluster
    from coordinator.session import SessionError, device_map, read_model

    try:
        info = read_model(args.model)
        dtype = stream_dtype(info.config, info.path)
    except SessionError as e:
        raise UserError(str(e)) from None

    async def measure() -> tuple[list[Any], dict[str, Any]]:
        records = await discover(args)
        probe = await probe_cluster(records, dtypes=probe_dtypes(dtype))
        return records, probe.to_json()

    records, probe_json = asyncio.run(measure())
    cluster = calibrated(probe_json, dtype, LiveCalibration.load())
    return cluster, device_map(probe_json, records)


def show(choice: PlanChoice, cluster: Cluster) -> None:
    cost = choice.cost
    if cost is None or not choice.fits:
        console.error(choice.explanation)
        return
    rows = []
    hops = list(cost.hops)
    for i, (s, m) in enumerate(zip(cost.stages, cost.memory, strict=True)):
        hop = "-"
        if i < len(hops):
            to = "ring to stage 1" if i == len(cost.stages) - 1 else hops[i].kind
            hop = f"{hops[i].total_s * 1e3:.2f} ({to})"
        rows.append(
            [
                i + 1,
                s.label,
                f"[{s.start}, {s.end})",
                f"{s.total_s * 1e3:.2f}",
                hop,
                f"{m.total_bytes / GIB:.1f} / {m.free_bytes / GIB:.1f}",
            ]
        )
    console.table(
        f"{choice.model}: {len(cost.stages)} stage(s), objective {choice.objective}",
        ["stage", "device", "layers", "ms/token", "next hop ms", "GiB used / free"],
        rows,
    )
    console.text(
        f"predicted: {cost.decode_tps:.1f} tok/s decode (one stream), TTFT {cost.ttft_s:.2f} s, "
        f"{cost.throughput_tps:.1f} tok/s at {cost.concurrency} request(s) in flight"
    )
    console.text(f"bottleneck: {cost.bottleneck}")
    console.text(f"why: {choice.explanation}")


def show_serving(serving: ServingChoice, cluster: Cluster) -> None:
    """Every candidate weighed, then each replica of the chosen one as `show` prints it."""
    rows = []
    for c in serving.candidates:
        mark = "*" if c is serving.chosen else ""
        if not c.fits:
            rows.append([mark, c.replicas, c.grouping, c.shape, "-", "-", "-"])
            continue
        rows.append(
            [
                mark,
                c.replicas,
                c.grouping,
                c.shape,
                " ".join(str(m) for m in c.shares),
                f"{c.aggregate_tps:.1f}",
                f"{c.per_request_tps:.1f}",
            ]
        )
    console.table(
        f"{serving.model}: candidates for {serving.concurrency} request(s) in flight"
        + (f", every request >= {serving.min_tps:g} tok/s" if serving.min_tps else ""),
        ["", "replicas", "grouping", "shape", "requests each", "tok/s in all", "tok/s per request"],
        rows,
    )
    chosen = serving.chosen
    if chosen is None or not chosen.fits:
        console.error(serving.explanation)
        return
    for i, pipe in enumerate(chosen.at_shares()):
        if len(chosen.pipelines) > 1:
            console.text(f"replica {i + 1} of {chosen.replicas}: {chosen.shares[i]} request(s)")
        show(pipe, cluster)
    console.text(
        f"predicted in all: {chosen.aggregate_tps:.1f} tok/s, "
        f"{chosen.per_request_tps:.1f} tok/s per request (the slowest)"
    )
    console.text(f"chosen: {serving.explanation}")
