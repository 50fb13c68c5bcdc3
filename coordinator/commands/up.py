"""`coordinator up`: find the nodes, plan, load the stages and serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from coordinator import console
from coordinator.commands._common import (
    add_discovery_args,
    add_model_args,
    add_placement_args,
    add_replica_args,
    discover,
    serving_mode,
)
from coordinator.errors import UserError
from coordinator.httpsec import add_tls_args, tls_files, url_scheme
from coordinator.pipeline import GenerationParams, Pipeline, PipelineError
from coordinator.plan import Plan
from coordinator.router import ReplicaRouter
from coordinator.session import (
    ModelInfo,
    SessionError,
    load_tokenizer,
    measured_plan,
    measured_serving_plan,
    open_pipeline,
    read_model,
    select_plan,
)
from coordinator.supervisor import Supervisor
from node.mdns import NodeRecord

log = logging.getLogger(__name__)
READY_PREFIX = "LAYERLINK_COORDINATOR_READY"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("up", help="plan and load the model on the cluster, then serve the API")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=8000, help="HTTP port (default: 8000; 0 picks a free one)"
    )
    p.add_argument(
        "--context", type=int, default=2048, help="context length per request (default: 2048)"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=256,
        help="tokens generated when a request names no max_tokens (default: 256)",
    )
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=16,
        metavar="N",
        help="requests running on the pipeline at once (default: 16)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting for a slot before new ones get HTTP 429 (default: 64)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("LAYERLINK_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1 (default: $LAYERLINK_API_KEY; none)",
    )
    p.add_argument(
        "--probe-json",
        metavar="FILE",
        help="a `coordinator probe --json` result to show as the dashboard's link matrix "
        "until the coordinator measures the cluster itself",
    )
    p.add_argument(
        "--check-tokens",
        type=int,
        default=32,
        metavar="N",
        help="after loading, generate N tokens and print measured next to predicted "
        "tokens/s (default: 32; 0: skip)",
    )
    p.add_argument(
        "--reprobe-debounce",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="re-probe the cluster this long after its mDNS membership last changed (default: 2)",
    )
    add_discovery_args(p)
    add_placement_args(p)
    add_replica_args(p)
    add_tls_args(p)
    p.set_defaults(func=run)


async def serve(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    from coordinator.api import Admission, ApiState, create_app
    from coordinator.dashboard.state import NodeMonitor, NodeTarget
    from coordinator.metrics import ServingMetrics
    from coordinator.shipboard import ShipBoard

    for flag, value, least in (
        ("--context", args.context, 2),
        ("--max-tokens", args.max_tokens, 1),
        ("--max-concurrent", args.max_concurrent, 1),
        ("--max-queue", args.max_queue, 0),
        ("--concurrency", args.concurrency, 1),
        ("--check-tokens", args.check_tokens, 0),
    ):
        if value < least:
            raise UserError(f"{flag} must be at least {least}")
    if not 0 <= args.port <= 65535:
        raise UserError("--port must be from 0 to 65535 (0 picks a free one)")
    if not 0 <= args.reprobe_debounce < float("inf"):  # NaN fails too
        raise UserError("--reprobe-debounce must be a number of seconds >= 0")
    replicated = serving_mode(args) and args.placement == "planned"
    probe = read_probe(args.probe_json) if args.probe_json else None
    tls_cert, tls_key = tls_files(args)
    try:
        model = read_model(args.model)
        tokenizer = load_tokenizer(model)
    except SessionError as e:
        raise UserError(str(e)) from None
    records = await discover(args, create_secret=True)
    metrics = ServingMetrics()
    board = ShipBoard()
    # The API answers 503 until a plan is loaded; the dashboard shows the nodes and the
    # weights being shipped meanwhile.
    state = ApiState(
        model_name=model.name,
        tokenizer=tokenizer,
        pipeline=None,
        context_length=args.context,
        default_max_tokens=args.max_tokens,
        vocab_size=model.vocab_size,
        metrics=metrics,
        admission=Admission(args.max_concurrent, args.max_queue),
        monitor=NodeMonitor([NodeTarget(r.name, r.address) for r in records], metrics=metrics),
        probe=probe,
        api_key=args.api_key,
        shipping=board,
        model_info=model,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise UserError(f"cannot bind HTTP {args.host}:{args.port}: {e.strerror}") from None
    port = sock.getsockname()[1]
    # Listen before announcing READY: early connections wait in the backlog until uvicorn
    # accepts them, instead of being refused.
    sock.listen(2048)
    config = uvicorn.Config(
        create_app(state),
        log_level="warning",
        timeout_graceful_shutdown=2,
        ssl_certfile=tls_cert,
        ssl_keyfile=tls_key,
    )
    scheme = url_scheme(args)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    console.info(f"dashboard at {scheme}://{args.host}:{port}/ (the API opens once loaded)")

    def phase(name: str) -> None:
        state.phase = name  # GET /health names it until the model is served
        log.info("loading: %s", name)

    async def load_one(plan: Plan) -> Pipeline:
        pipeline = await open_pipeline(plan, model, board=board, on_phase=phase)
        try:
            phase("warming up")
            await warm_up(pipeline, tokenizer)
            if args.check_tokens:
                phase("checking speed")
                await check_speed(pipeline, tokenizer, plan, args.check_tokens)
        except UserError:
            await pipeline.close()
            raise
        return pipeline

    shares: dict[str, int] = {}  # plan id -> the requests its replica was planned for

    async def load() -> tuple[list[Pipeline], list[Plan], Any]:
        phase("planning")
        if replicated:
            splan, choice, measured = await measured_serving_plan(
                model,
                records,
                args.concurrency,
                args.context,
                replicas=args.replicas,
                min_tps=args.min_tps,
            )
            show_candidates(choice)
            plans = list(splan.replicas)
            shares.update({p.plan_id: m for p, m in zip(plans, splan.shares, strict=False)})
            state.serving = {
                "replicas": len(plans),
                "shape": choice.chosen.shape if choice.chosen is not None else "",
                "concurrency": splan.concurrency,
                "aggregate_tps": splan.aggregate_tps,
                "per_request_tps": splan.per_request_tps,
                "shares": list(splan.shares),
                "explanation": splan.explanation,
            }
        else:
            plan, measured = await select_plan(
                model, records, args.placement, args.objective, args.concurrency, args.context
            )
            plans = [plan]
        pipelines: list[Pipeline] = []
        try:
            for i, plan in enumerate(plans):
                if len(plans) > 1:
                    console.info(f"replica {i + 1} of {len(plans)}")
                show_plan(plan, args.context)
                pipelines.append(await load_one(plan))
        except BaseException:
            for p in pipelines:
                await p.close()
            raise
        return pipelines, plans, measured

    try:
        pipelines, plans, measured = await _while_serving(serving, load())
    except (SessionError, PipelineError) as e:
        await _stop(server, serving)
        raise UserError(str(e)) from None
    except BaseException:
        await _stop(server, serving)
        raise
    if measured is not None:
        state.probe = {**measured.to_json(), "measured_at": time.time()}

    def replanner(share: int) -> Any:
        async def replan(remaining: list[NodeRecord]) -> Plan:
            if replicated and len(plans) > 1:
                # A replica is re-planned over its own remaining nodes, for its share.
                m = await measured_plan(model, remaining, "throughput", max(1, share), args.context)
                new_plan = m.plan
            else:
                new_plan, _ = await select_plan(
                    model, remaining, args.placement, args.objective, args.concurrency, args.context
                )
            show_plan(new_plan)
            return new_plan

        return replan

    async def reopen(new_plan: Plan) -> Pipeline:
        return await open_pipeline(new_plan, model, show_progress=False, board=board)

    # Each replica serves on its pipeline; when a stage dies its Supervisor re-plans it over
    # the replica's remaining nodes and resumes requests (coordinator/supervisor.py).
    supervisors: list[Supervisor] = []
    for plan, pipe in zip(plans, pipelines, strict=True):
        own = {s.node_id for s in plan.stages}
        mine = [r for r in records if r.node_id in own] if len(plans) > 1 else records
        sup = Supervisor(mine, replanner(shares.get(plan.plan_id, args.concurrency)), reopen)
        await sup.start(pipe)
        supervisors.append(sup)
    front: Supervisor | ReplicaRouter = (
        supervisors[0] if len(supervisors) == 1 else ReplicaRouter(supervisors)
    )
    state.phase = "serving"
    state.pipeline = front
    if state.monitor is not None:
        state.monitor.plan_of = lambda: front.plan  # alerts logged even with no dashboard open
    prober = membership_prober(args, model, records, state, front)
    console.info(
        f"serving {model.name} on {scheme}://{args.host}:{port}/v1, dashboard at "
        f"{scheme}://{args.host}:{port}/ (Ctrl-C to stop)"
    )
    console.text(f"{READY_PREFIX} {scheme}://{args.host}:{port}")
    try:
        if prober is not None:
            await prober.start()
        await serving
    finally:
        if prober is not None:
            await prober.close()
        await front.close()
        served_summary(front.plan or plans[0], metrics)
    return 0


async def _while_serving(serving: asyncio.Task[None], work: Any) -> Any:
    """Await `work` while the HTTP server runs; the server stopping first (Ctrl-C) stops it."""
    task = asyncio.ensure_future(work)
    await asyncio.wait({serving, task}, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        error = None if serving.cancelled() else serving.exception()
        why = f": {type(error).__name__}: {error}" if error is not None else ""
        raise UserError(f"the HTTP server stopped before the model was loaded{why}")
    return task.result()


async def _stop(server: Any, serving: asyncio.Task[None]) -> None:
    server.should_exit = True
    await asyncio.gather(serving, return_exceptions=True)


def show_candidates(choice: Any) -> None:
    """The serving candidates the planner weighed (coordinator/replicas.py) and its choice."""
    rows = []
    for c in choice.candidates:
        mark = "*" if c is choice.chosen else ""
        if c.fits:
            shares = " ".join(str(m) for m in c.shares)
            rows.append(
                [mark, c.shape, shares, f"{c.aggregate_tps:.1f}", f"{c.per_request_tps:.1f}"]
            )
        else:
            rows.append([mark, c.shape, "-", "-", "-"])
    console.table(
        f"serving {choice.concurrency} request(s) in flight: candidates",
        ["", "shape", "requests each", "tok/s in all", "tok/s per request"],
        rows,
    )
    console.info(f"chosen: {choice.explanation}")


def show_plan(plan: Plan, context: int | None = None) -> None:
    """The plan as a table, and what the cost model expects of it (when it was planned)."""
    console.table(
        f"plan {plan.plan_id}",
        ["stage", "node", "address", "layers"],
        [[i, s.node_name, s.address, f"[{s.start}, {s.end})"] for i, s in enumerate(plan.stages)],
    )
    p = plan.predicted
    if p is None:
        console.info(f"{plan.explanation} (not planned from measurements: no prediction)")
        return
    console.info(
        f"predicted: decode {p.decode_tps:.1f} tokens/s per stream, TTFT {p.ttft_s * 1e3:.0f} ms"
        + (f" for a {min(512, context // 2)}-token prompt" if context else "")
        + f", {p.throughput_tps:.1f} tokens/s in all; bottleneck: {p.bottleneck}"
    )
    console.info(f"why: {plan.explanation}")


async def check_speed(pipeline: Pipeline, tokenizer: Any, plan: Plan, tokens: int) -> float:
    """One greedy generation of `tokens` tokens after the warm-up: measured decode tokens/s,
    printed next to the prediction."""
    prompt = list(tokenizer.encode("How fast is this cluster?")) or [0]
    params = GenerationParams(max_tokens=tokens, temperature=0.0, step_timeout_s=30.0)
    try:
        result = await pipeline.generate(prompt, params)
    except PipelineError as e:
        raise UserError(f"the speed check failed: {e}") from None
    measured = result.decode_tps
    text = f"measured: decode {measured:.1f} tokens/s over {len(result.tokens)} tokens"
    if plan.predicted is not None and measured > 0:
        pred = plan.predicted.decode_tps
        text += f" (predicted {pred:.1f}: {100.0 * (pred / measured - 1.0):+.0f}%)"
    console.info(text)
    log.info("speed check: %s", text)
    return measured


def served_summary(plan: Plan, metrics: Any) -> None:
    """At shutdown: the decode speed requests saw, next to the prediction."""
    speeds = sorted(r.decode_tps for r in metrics.recent if r.decode_tps > 0)
    if not speeds:
        return
    median = speeds[len(speeds) // 2]
    text = f"served {len(speeds)} request(s): median decode {median:.1f} tokens/s"
    if plan.predicted is not None:
        text += f", predicted {plan.predicted.decode_tps:.1f} per stream"
    console.info(text)
    log.info("%s", text)


def membership_prober(
    args: argparse.Namespace,
    model: ModelInfo,
    records: list[Any],
    state: Any,
    supervisor: Supervisor | ReplicaRouter | None = None,
) -> Any:
    """Re-probe when the mDNS membership changes (not with a static --node list: there is
    nothing to watch); results go to the API state's `probe`."""
    if args.node:
        return None
    from coordinator.calibrate import probe_dtypes, stream_dtype
    from coordinator.discovery import Browser
    from coordinator.probe import probe_cluster
    from coordinator.reprobe import MembershipProber

    dtype = stream_dtype(model.config, model.path)

    def store(doc: dict[str, Any]) -> None:
        state.probe = doc
        names = ", ".join(str(n.get("name")) for n in doc.get("nodes", []))
        console.info(f"re-probed the cluster after a membership change: {names}")

    async def probe(nodes: Any) -> Any:
        result = await probe_cluster(nodes, dtypes=probe_dtypes(dtype))
        if supervisor is not None:
            # A node that joined (or came back) is used when the new plan predicts faster.
            try:
                await supervisor.consider(list(nodes))
            except Exception as e:  # re-planning is an optimisation: serving goes on
                log.warning("re-planning after a membership change failed: %s", e)
        return result

    return MembershipProber(
        Browser(args.cluster, args.mdns_interface),
        probe,
        store,
        known=records if state.probe is not None else [],
        debounce_s=args.reprobe_debounce,
    )


async def warm_up(pipeline: Pipeline, tokenizer: Any, attempts: int = 3) -> None:
    """A short generation before serving: the first request pays no start-up costs, and a
    pipeline that cannot produce a token fails here, with a message, instead of later."""
    prompt = list(tokenizer.encode("warm up")) or [0]
    params = GenerationParams(max_tokens=2, temperature=0.0, step_timeout_s=10.0)
    error: PipelineError | None = None
    for attempt in range(1, attempts + 1):
        try:
            await pipeline.generate(prompt, params)
            return
        except PipelineError as e:
            error = e
            log.warning("warm-up generation %d/%d failed: %s", attempt, attempts, e)
    raise UserError(f"the stages loaded but the pipeline produced no token: {error}")


def read_probe(path: str) -> dict[str, Any]:
    """A saved `coordinator probe --json` result (nodes and links); anything else is a
    UserError naming the field."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("links", []), list):
        raise UserError(f"{path} is not a probe result (an object with a 'links' list)")
    for key in ("nodes", "errors"):
        if not isinstance(doc.get(key, []), list):
            raise UserError(f"{path}: {key!r} must be a list")
    for key in ("seconds", "measured_at"):
        if key in doc and not _is_number(doc[key]):
            raise UserError(f"{path}: {key!r} must be a number")
    for i, node in enumerate(doc.get("nodes", [])):
        if not isinstance(node, dict) or not isinstance(node.get("id"), str):
            raise UserError(f"{path}: nodes[{i}] must be an object with an 'id' string")
    for i, link in enumerate(doc.get("links", [])):
        if not isinstance(link, dict):
            raise UserError(f"{path}: links[{i}] must be an object")
        for key in ("src", "dst"):
            if not isinstance(link.get(key), str):
                raise UserError(f"{path}: links[{i}].{key} must be a node id (a string)")
        for key in ("latency_us", "bandwidth_gbs"):
            if not _is_number(link.get(key)) or link[key] < 0:
                raise UserError(f"{path}: links[{i}].{key} must be a number >= 0")
    return doc


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(serve(args))
