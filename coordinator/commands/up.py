"""`coordinator up`: find the nodes, plan, load the stages and serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from coordinator import console
from coordinator.commands._common import add_discovery_args, add_model_args, discover
from coordinator.errors import UserError
from coordinator.pipeline import GenerationParams, Pipeline, PipelineError
from coordinator.session import SessionError, load_tokenizer, memory_plan, open_pipeline, read_model

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
        help="a `coordinator probe --json` result to show as the dashboard's link matrix",
    )
    add_discovery_args(p)
    p.set_defaults(func=run)


async def serve(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    from coordinator.api import Admission, ApiState, create_app
    from coordinator.dashboard.state import NodeMonitor, NodeTarget
    from coordinator.metrics import ServingMetrics

    for flag, value, least in (
        ("--context", args.context, 2),
        ("--max-tokens", args.max_tokens, 1),
        ("--max-concurrent", args.max_concurrent, 1),
        ("--max-queue", args.max_queue, 0),
    ):
        if value < least:
            raise UserError(f"{flag} must be at least {least}")
    probe = read_probe(args.probe_json) if args.probe_json else None
    try:
        model = read_model(args.model)
    except SessionError as e:
        raise UserError(str(e)) from None
    records = await discover(args)
    tokenizer = load_tokenizer(model)
    try:
        plan = await memory_plan(model, records)
        pipeline = await open_pipeline(plan, model)
    except (SessionError, PipelineError) as e:
        raise UserError(str(e)) from None
    try:
        await warm_up(pipeline, tokenizer)
    except UserError:
        await pipeline.close()
        raise
    console.table(
        f"plan {plan.plan_id}",
        ["stage", "node", "address", "layers"],
        [[i, s.node_name, s.address, f"[{s.start}, {s.end})"] for i, s in enumerate(plan.stages)],
    )
    metrics = ServingMetrics()
    state = ApiState(
        model_name=model.name,
        tokenizer=tokenizer,
        pipeline=pipeline,
        context_length=args.context,
        default_max_tokens=args.max_tokens,
        vocab_size=model.vocab_size,
        metrics=metrics,
        admission=Admission(args.max_concurrent, args.max_queue),
        monitor=NodeMonitor([NodeTarget(r.name, r.address) for r in records], metrics=metrics),
        probe=probe,
        api_key=args.api_key,
    )
    app = create_app(state)
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
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    console.info(
        f"serving {model.name} on http://{args.host}:{port}/v1, dashboard at "
        f"http://{args.host}:{port}/ (Ctrl-C to stop)"
    )
    console.text(f"{READY_PREFIX} http://{args.host}:{port}")
    try:
        await server.serve(sockets=[sock])
    finally:
        await pipeline.close()
    return 0


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
    """A saved `coordinator probe --json` result (nodes and links)."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("links", []), list):
        raise UserError(f"{path} is not a probe result (an object with a 'links' list)")
    return doc


def run(args: argparse.Namespace) -> int:
    return asyncio.run(serve(args))
