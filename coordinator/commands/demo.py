"""`coordinator demo`: a whole cluster on this machine, end to end, in one command.

Synthesizes a model if needed, starts N `cluster-node` processes on loopback, finds them over
real mDNS, plans, loads, generates, prints the plan and the speed, and stops every process
it started."""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from pathlib import Path

from coordinator import console
from coordinator.commands.run import print_result
from coordinator.localcluster import LocalCluster
from coordinator.pipeline import GenerationParams
from coordinator.session import load_tokenizer, memory_plan, open_pipeline, read_model
from node.identity import cache_dir


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="start local nodes, find them over mDNS and generate through a pipeline"
    )
    p.add_argument("--nodes", type=int, default=3, help="number of local nodes (default: 3)")
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="model folder (default: a synthetic 'small' llama model in the cache)",
    )
    p.add_argument("--prompt", default="The cluster of small machines", help="prompt text")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default: 48)")
    p.set_defaults(func=run)


def default_model() -> Path:
    path = cache_dir() / "models" / "synthetic-small-llama"
    if not (path / "config.json").is_file():
        from coordinator.synth import synthesize

        console.info(f"synthesizing a random-weight model at {path}")
        synthesize(path, preset="small", arch="llama", seed=0)
    return path


async def demo(args: argparse.Namespace, model_path: Path, cluster: LocalCluster) -> None:
    from coordinator.discovery import find_nodes

    model = read_model(model_path)
    console.info(f"looking for {args.nodes} nodes of cluster {cluster.cluster!r} over mDNS")
    records = await find_nodes(args.nodes, 15.0, [], cluster.cluster, ["127.0.0.1"])
    if len(records) < args.nodes:
        raise RuntimeError(f"mDNS found {len(records)} of {args.nodes} nodes")
    plan = await memory_plan(model, records)
    tokenizer = load_tokenizer(model)
    pipeline = await open_pipeline(plan, model)
    try:
        prompt = list(tokenizer.encode(args.prompt))
        # Warm-up: the first request pays one-off costs (graph set-up, first allocations).
        await pipeline.generate(prompt, GenerationParams(max_tokens=4))
        result = await pipeline.generate(prompt, GenerationParams(max_tokens=args.max_tokens))
    finally:
        await pipeline.close()
    print_result(
        {
            "text": tokenizer.decode(list(result.tokens)),
            "tokens": list(result.tokens),
            "ttft_s": result.ttft_s,
            "decode_tps": result.decode_tps,
            "finish_reason": result.finish_reason,
            "plan": plan.to_json(),
        }
    )


def run(args: argparse.Namespace) -> int:
    from coordinator.errors import UserError

    if not 1 <= args.nodes <= 16:
        raise UserError("--nodes must be between 1 and 16")
    model_path = Path(args.model) if args.model else default_model()
    cluster_name = f"demo-{uuid.uuid4().hex[:8]}"
    console.info(f"starting {args.nodes} local nodes")
    env = {"XDG_CONFIG_HOME": os.environ.get("XDG_CONFIG_HOME", str(Path.home() / ".config"))}
    with LocalCluster(args.nodes, cluster_name, env=env, name_prefix="demo") as cluster:
        for n in cluster.nodes:
            console.info(f"  {n.name} at {n.address}")
        asyncio.run(demo(args, model_path, cluster))
    console.info("stopped every node this demo started")
    return 0
