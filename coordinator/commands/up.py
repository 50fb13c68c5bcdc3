"""`coordinator up`: find the nodes, plan, load the stages and serve the OpenAI-compatible API."""

from __future__ import annotations

import argparse
import asyncio
import logging

from coordinator import console
from coordinator.commands._common import add_discovery_args, add_model_args, discover
from coordinator.errors import UserError
from coordinator.pipeline import PipelineError
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
    add_discovery_args(p)
    p.set_defaults(func=run)


async def serve(args: argparse.Namespace) -> int:
    import socket

    import uvicorn

    from coordinator.api import ApiState, create_app

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
    console.table(
        f"plan {plan.plan_id}",
        ["stage", "node", "address", "layers"],
        [[i, s.node_name, s.address, f"[{s.start}, {s.end})"] for i, s in enumerate(plan.stages)],
    )
    state = ApiState(
        model_name=model.name, tokenizer=tokenizer, pipeline=pipeline, context_length=args.context
    )
    app = create_app(state)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise UserError(f"cannot bind HTTP {args.host}:{args.port}: {e.strerror}") from None
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    console.info(f"serving {model.name} on http://{args.host}:{port}/v1 (Ctrl-C to stop)")
    console.text(f"{READY_PREFIX} http://{args.host}:{port}")
    try:
        await server.serve(sockets=[sock])
    finally:
        await pipeline.close()
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(serve(args))
