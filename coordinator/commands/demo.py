"""`coordinator demo`: a whole cluster on this machine, end to end, in one command.

Starts N `cluster-node` processes on loopback, finds them over real mDNS, plans, loads a real
model (SmolLM2-135M-Instruct from its GGUF, which `make install` puts in the venv; a
synthetic model when it is absent), asks it a question in its chat template, prints the
answer, the plan and the speed, and stops every process it started."""

from __future__ import annotations

import argparse
import asyncio
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from coordinator import console
from coordinator.commands.run import print_result
from coordinator.pipeline import GenerationParams
from coordinator.session import (
    answer_text,
    encode_prompt,
    load_tokenizer,
    memory_plan,
    open_pipeline,
    read_model,
)
from node.identity import cache_dir

if TYPE_CHECKING:
    from coordinator.lab.localcluster import LocalCluster


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "demo", help="start local nodes, find them over mDNS and generate through a pipeline"
    )
    p.add_argument("--nodes", type=int, default=3, help="number of local nodes (default: 3)")
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        metavar="N",
        help="devices per node (`cluster-node up --devices N`: CPU devices here, one stage "
        "process each; default: 1)",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="model folder, GGUF file or ollama:NAME[:TAG] (default: the bundled "
        "SmolLM2-135M-Instruct GGUF; a synthetic 'small' llama model if it is not installed)",
    )
    p.add_argument("--prompt", default=None, help="prompt text (default: a question)")
    p.add_argument(
        "--raw",
        action="store_true",
        help="send the prompt as it is, not as a user turn of the model's chat template",
    )
    p.add_argument("--max-tokens", type=int, default=48, help="tokens to generate (default: 48)")
    p.set_defaults(func=run)


DEFAULT_QUESTION = "What is the capital of France?"
SYNTHETIC_PROMPT = "The cluster of small machines"


def default_model() -> Path:
    from coordinator.bundled import INSTALL_HINT, smollm2_gguf

    real = smollm2_gguf()
    if real is not None:
        return real
    console.info(f"the bundled real model is not installed ({INSTALL_HINT}); using a synthetic one")
    path = cache_dir() / "models" / "synthetic-small-llama"
    if not (path / "config.json").is_file():
        from coordinator.lab.synth import synthesize

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
    chat = not args.raw and bool(getattr(tokenizer, "chat_template", None))
    text = args.prompt or (DEFAULT_QUESTION if chat else SYNTHETIC_PROMPT)
    prompt = encode_prompt(tokenizer, text, chat)
    if chat:
        console.info(f"asking: {text}")
    pipeline = await open_pipeline(plan, model)
    try:
        # Warm-up: the first request pays one-off costs (graph set-up, first allocations).
        await pipeline.generate(prompt, GenerationParams(max_tokens=4))
        params = GenerationParams(
            max_tokens=args.max_tokens, stop_token_ids=frozenset(tokenizer.eos_token_ids)
        )
        result = await pipeline.generate(prompt, params)
    finally:
        await pipeline.close()
    print_result(
        {
            "text": answer_text(tokenizer, list(result.tokens)),
            "tokens": list(result.tokens),
            "ttft_s": result.ttft_s,
            "decode_tps": result.decode_tps,
            "finish_reason": result.finish_reason,
            "plan": plan.to_json(),
        }
    )


def run(args: argparse.Namespace) -> int:
    from coordinator.errors import UserError
    from coordinator.lab.localcluster import LocalCluster

    if not 1 <= args.nodes <= 16:
        raise UserError("--nodes must be between 1 and 16")
    if not 1 <= args.devices <= 8:
        raise UserError("--devices must be between 1 and 8")
    model_path = Path(args.model) if args.model else default_model()
    cluster_name = f"demo-{uuid.uuid4().hex[:8]}"
    each = f" of {args.devices} devices each" if args.devices > 1 else ""
    console.info(f"starting {args.nodes} local nodes{each}")
    env = {"XDG_CONFIG_HOME": os.environ.get("XDG_CONFIG_HOME", str(Path.home() / ".config"))}
    devices = ["--devices", str(args.devices)] if args.devices > 1 else []
    with LocalCluster(
        args.nodes, cluster_name, env=env, name_prefix="demo", extra_args=devices
    ) as cluster:
        for n in cluster.nodes:
            console.info(f"  {n.name} at {n.address}")
        asyncio.run(demo(args, model_path, cluster))
    console.info("stopped every node this demo started")
    return 0
