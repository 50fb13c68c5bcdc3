"""Serving many users on one machine: predicted against measured aggregate tokens/s for one
pipeline and for replicas (issue 16; docs/planning.md, "Serving many users").

Four local nodes; for each replica count R, `coordinator up --objective throughput
--concurrency S --replicas R` over them (a process of its own, as users run it), S
concurrent streaming chats of T tokens each, interleaved rounds. Measured aggregate: tokens
decoded after each stream's first, over the time from the earliest first token to the last
stream's end; predicted: what the coordinator planned (`/api/state`'s
serving.aggregate_tps). The nodes, the coordinator and the client share this machine's cores;
the JSON says how many.

    python -m coordinator.lab.replicabench --model DIR [--out FILE] [--tokens 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from coordinator import console
from coordinator.lab import bench
from coordinator.lab.localcluster import CoordinatorProcess, LocalCluster

log = logging.getLogger(__name__)

PROMPT = "Request number {i}: tell me about the letter {c}"
DEFAULT_OUT = Path("bench/results/replicas.json")


async def _stream(client: httpx.AsyncClient, model: str, content: str, tokens: int) -> tuple[int, float, float]:  # fmt: skip
    """One streaming chat: (completion tokens, first-token time, end time)."""
    body = {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    n, first = 0, 0.0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise bench.BenchError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = int(chunk["usage"]["completion_tokens"])
            if any(ch["delta"].get("content") for ch in chunk.get("choices", [])):
                first = first or time.perf_counter()
    return n, first, time.perf_counter()


async def burst(url: str, model: str, streams: int, tokens: int) -> tuple[float, int]:
    """`streams` chats at once: (aggregate decode tokens/s, tokens generated)."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        got = await asyncio.gather(
            *(
                _stream(c, model, PROMPT.format(i=i, c=chr(97 + i % 26)), tokens)
                for i in range(streams)
            )  # fmt: skip
        )
    first = min(g[1] for g in got)
    end = max(g[2] for g in got)
    return sum(g[0] - 1 for g in got) / (end - first), sum(g[0] for g in got)


def run(
    model: Path,
    replica_counts: Sequence[int] = (1, 2, 4),
    streams: int = 8,
    tokens: int = 200,
    rounds: int = 2,
    nodes: int = 4,
) -> dict[str, Any]:
    """Every replica count `rounds` times, interleaved; medians."""
    machine = bench.machine_info()
    rows: dict[int, dict[str, Any]] = {
        r: {"replicas": r, "predicted_tps": None, "shape": "", "measured_tps": []}
        for r in replica_counts
    }
    with bench.scratch_dir() as tmp:
        logs = Path(tmp)
        with LocalCluster(nodes, f"replicabench-{uuid.uuid4().hex[:6]}", log_dir=logs,
                          name_prefix="rb") as cluster:  # fmt: skip
            for k in range(rounds):
                for r in replica_counts:
                    args = ["--objective", "throughput", "--concurrency", str(streams),
                            "--replicas", str(r), "--check-tokens", "8"]  # fmt: skip
                    try:
                        up = CoordinatorProcess(model, cluster.nodes, logs / f"up-{r}-{k}.log",
                                                args, timeout=600)  # fmt: skip
                    except RuntimeError as e:
                        raise bench.BenchError(str(e)) from None
                    try:
                        state = httpx.get(up.url + "/api/state", timeout=60).json()
                        serving = state.get("serving") or {}
                        asyncio.run(burst(up.url, model.name, streams, 16))  # warm-up
                        rate, n = asyncio.run(burst(up.url, model.name, streams, tokens))
                    finally:
                        up.stop()
                    row = rows[r]
                    row["predicted_tps"] = float(serving.get("aggregate_tps") or 0.0)
                    row["shape"] = str(serving.get("shape", ""))
                    row["measured_tps"].append(rate)
                    log.info("%d replica(s), round %d: %.1f tok/s (%d tokens)", r, k + 1, rate, n)
    out = []
    for row in rows.values():
        measured = statistics.median(row["measured_tps"])
        error = row["predicted_tps"] / measured - 1 if measured > 0 else None
        out.append({**row, "measured_median_tps": measured, "error": error})
    return {
        "model": model.name,
        "nodes": nodes,
        "streams": streams,
        "tokens": tokens,
        "rounds": rounds,
        "machine": bench.end_load(machine),
        "rows": out,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coordinator.lab.replicabench",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--model", type=Path, required=True, help="model folder (e.g. the tiny one)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON (default: {DEFAULT_OUT})")
    p.add_argument("--tokens", type=int, default=200, help="tokens per stream (default: 200)")
    p.add_argument("--streams", type=int, default=8, help="concurrent streams (default: 8)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: 2)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    doc = run(args.model, streams=args.streams, tokens=args.tokens, rounds=args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    console.text(f"{doc['streams']} streams x {doc['tokens']} tokens, {doc['nodes']} local "
                 f"nodes, {cores} cores:")  # fmt: skip
    for row in doc["rows"]:
        console.text(f"  {row['replicas']} replica(s), {row['shape']}: predicted "
                     f"{row['predicted_tps']:.1f} tok/s, measured "
                     f"{row['measured_median_tps']:.1f} ({100 * row['error']:+.0f}%)")  # fmt: skip
    console.text(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
