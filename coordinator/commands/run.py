"""`coordinator run`: one-shot generation through the cluster, with timings and the plan."""

from __future__ import annotations

import argparse
import asyncio
import math
from typing import Any

from coordinator import console
from coordinator.commands._common import (
    add_discovery_args,
    add_model_args,
    add_placement_args,
    discover,
)
from coordinator.errors import UserError
from coordinator.pipeline import GenerationParams, PipelineError
from coordinator.session import (
    SessionError,
    answer_text,
    choose_plan,
    encode_prompt,
    load_tokenizer,
    open_pipeline,
    read_model,
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run", help="generate once through the cluster and print text, speed and plan"
    )
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="sampler seed")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_discovery_args(p)
    add_placement_args(p)
    p.set_defaults(func=run)


def check_params(args: argparse.Namespace) -> GenerationParams:
    if args.max_tokens < 1:
        raise UserError("--max-tokens must be at least 1")
    if not args.temperature >= 0 or math.isinf(args.temperature):  # NaN fails >= too
        raise UserError("--temperature must be a number >= 0")
    if not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise UserError("--seed must be from 0 to 2**63 - 1")
    if args.concurrency < 1:
        raise UserError("--concurrency must be >= 1")
    return GenerationParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
    )


async def generate_once(args: argparse.Namespace) -> dict[str, Any]:
    params = check_params(args)
    try:
        model = read_model(args.model)
        tokenizer = load_tokenizer(model)
    except SessionError as e:
        raise UserError(str(e)) from None
    records = await discover(args)
    prompt = encode_prompt(tokenizer, args.prompt, args.chat)
    try:
        plan = await choose_plan(
            model, records, args.placement, args.objective, args.concurrency,
            prompt_tokens=len(prompt),
        )  # fmt: skip
        pipeline = await open_pipeline(plan, model, show_progress=not args.json)
    except (SessionError, PipelineError) as e:
        raise UserError(str(e)) from None
    try:
        params = GenerationParams(
            **{**params.__dict__, "stop_token_ids": frozenset(tokenizer.eos_token_ids)}
        )
        result = await pipeline.generate(prompt, params)
    except PipelineError as e:
        raise UserError(str(e)) from None
    finally:
        await pipeline.close()
    return {
        "text": answer_text(tokenizer, list(result.tokens)),
        "tokens": list(result.tokens),
        "prompt_tokens": result.prompt_tokens,
        "finish_reason": result.finish_reason,
        "ttft_s": result.ttft_s,
        "decode_tps": result.decode_tps,
        "plan_id": plan.plan_id,
        "plan": plan.to_json(),
        "explanation": plan.explanation,
        "predicted": (
            None
            if plan.predicted is None
            else {
                "decode_tps": plan.predicted.decode_tps,
                "ttft_s": plan.predicted.ttft_s,
                "throughput_tps": plan.predicted.throughput_tps,
                "bottleneck": plan.predicted.bottleneck,
            }
        ),
    }


def print_result(out: dict[str, Any]) -> None:
    console.text(out["text"])
    console.text("")
    console.table(
        "plan",
        ["stage", "node", "device", "address", "layers", "count"],
        [
            [
                i,
                s["node"],
                s.get("device", "0"),
                s["address"],
                f"[{s['layers'][0]}, {s['layers'][1]})",
                s["layers"][1] - s["layers"][0],
            ]
            for i, s in enumerate(out["plan"])
        ],
    )
    console.text(
        f"TTFT {out['ttft_s'] * 1000:.1f} ms · decode {out['decode_tps']:.1f} tokens/s · "
        f"{len(out['tokens'])} tokens ({out['finish_reason']})"
    )
    predicted = out.get("predicted")
    if predicted:
        console.text(
            f"predicted before loading: decode {predicted['decode_tps']:.1f} tokens/s, "
            f"TTFT {predicted['ttft_s'] * 1000:.1f} ms — {out.get('explanation', '')}"
        )


def run(args: argparse.Namespace) -> int:
    out = asyncio.run(generate_once(args))
    if args.json:
        console.print_json(out)
    else:
        print_result(out)
    return 0
