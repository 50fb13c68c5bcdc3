"""Run a supervised streaming generation over given nodes and report it, for fault tests
that must run the coordinator inside a network namespace (`python -m tests.fault_driver`).

Prints `FAULT_NOW` once `--after` tokens have arrived (the test then breaks something),
and finally one line `RESULT {json}` with the tokens and the recoveries."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from coordinator.discovery import resolve_static
from coordinator.pipeline import GenerationParams
from coordinator.session import even_counts, fixed_plan, open_pipeline, read_model
from coordinator.supervisor import Supervisor


async def main(args: argparse.Namespace) -> dict[str, object]:
    model = read_model(Path(args.model))
    records = await resolve_static(args.node)

    async def planner(recs):  # type: ignore[no-untyped-def]
        nodes = sorted(recs, key=lambda r: r.name)
        return fixed_plan(model, nodes, even_counts(model.num_layers, len(nodes)))

    async def opener(plan):  # type: ignore[no-untyped-def]
        return await open_pipeline(plan, model, show_progress=False)

    sup = Supervisor(records, planner, opener)
    await sup.start()
    tokens: list[int] = []
    try:
        params = GenerationParams(max_tokens=args.max_tokens, step_timeout_s=30)
        async for ev in sup.stream([int(t) for t in args.prompt.split(",")], params):
            tokens.append(ev.token)
            if len(tokens) == args.after:
                print("FAULT_NOW", flush=True)
                await asyncio.sleep(0.2)  # let the fault land mid-generation
    finally:
        await sup.close()
    recoveries = [{k: v for k, v in r.items() if k != "noticed_at"} for r in sup.recoveries]
    return {"tokens": tokens, "recoveries": recoveries}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--node", action="append", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--after", type=int, required=True)
    out = asyncio.run(main(p.parse_args()))
    print("RESULT " + json.dumps(out), flush=True)
    sys.exit(0)
