"""A bounded soak of a running coordinator's HTTP API: N requests from C concurrent clients,
a fixed mix of chat and completions, streamed and whole, greedy and sampled; latency and
time to first token per request, summarized as percentiles (docs/reliability.md).

    python -m tests.soak --url http://127.0.0.1:8000 --requests 200 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import httpx

PROMPTS = [
    "Tell me about the sea.",
    "List three colours.",
    "What is a pipeline?",
    "Count to ten.",
    "Why is the sky blue?",
    "Write a haiku about machines.",
]


@dataclass(frozen=True)
class Job:
    index: int
    endpoint: str  # "chat" or "completions"
    stream: bool
    max_tokens: int
    temperature: float
    prompt: str


@dataclass(frozen=True)
class Outcome:
    index: int
    endpoint: str
    stream: bool
    status: int
    finish_reason: str | None
    completion_tokens: int
    latency_s: float
    ttft_s: float | None  # streamed requests: the first chunk with text
    error: str = ""


def jobs(n: int, seed: int = 0, max_tokens: tuple[int, int] = (4, 24)) -> list[Job]:
    rng = random.Random(seed)
    return [
        Job(
            index=i,
            endpoint=rng.choice(["chat", "completions"]),
            stream=rng.random() < 0.5,
            max_tokens=rng.randint(*max_tokens),
            temperature=rng.choice([0.0, 0.0, 0.7, 1.0]),
            prompt=rng.choice(PROMPTS),
        )
        for i in range(n)
    ]


async def run_one(client: httpx.AsyncClient, model: str, job: Job) -> Outcome:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": job.max_tokens,
        "temperature": job.temperature,
        "seed": job.index,
        "stream": job.stream,
    }
    if job.endpoint == "chat":
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": job.prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = job.prompt
    if job.stream:
        body["stream_options"] = {"include_usage": True}
    t0 = time.perf_counter()
    ttft: float | None = None
    finish: str | None = None
    tokens = 0
    try:
        if not job.stream:
            r = await client.post(path, json=body)
            latency = time.perf_counter() - t0
            if r.status_code != 200:
                return Outcome(job.index, job.endpoint, False, r.status_code, None, 0, latency,
                               None, r.text[:200])  # fmt: skip
            doc = r.json()
            return Outcome(job.index, job.endpoint, False, 200, doc["choices"][0]["finish_reason"],
                           doc["usage"]["completion_tokens"], latency, None)  # fmt: skip
        async with client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                return Outcome(job.index, job.endpoint, True, r.status_code, None, 0,
                               time.perf_counter() - t0, None, text[:200])  # fmt: skip
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    break
                doc = json.loads(data)
                if "error" in doc:
                    return Outcome(job.index, job.endpoint, True, 200, None, tokens,
                                   time.perf_counter() - t0, ttft, str(doc["error"])[:200])  # fmt: skip
                for choice in doc.get("choices", []):
                    text = choice.get("text") or choice.get("delta", {}).get("content")
                    if text and ttft is None:
                        ttft = time.perf_counter() - t0
                    finish = choice.get("finish_reason") or finish
                if doc.get("usage"):
                    tokens = int(doc["usage"]["completion_tokens"])
            latency = time.perf_counter() - t0
            error = "" if done else "stream ended without [DONE]"
            return Outcome(job.index, job.endpoint, True, 200, finish, tokens, latency, ttft, error)
    except httpx.HTTPError as e:
        return Outcome(job.index, job.endpoint, job.stream, 0, None, 0, time.perf_counter() - t0,
                       None, f"{type(e).__name__}: {e}")  # fmt: skip


async def soak(
    url: str, requests: int, clients: int, api_key: str | None = None, seed: int = 0,
    max_tokens: tuple[int, int] = (4, 24), verify: Any = True,
) -> tuple[list[Outcome], float]:  # fmt: skip
    """Run the soak; (outcomes in job order, wall seconds)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300, limits=limits,
                                 verify=verify) as client:  # fmt: skip
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        queue: asyncio.Queue[Job] = asyncio.Queue()
        for job in jobs(requests, seed, max_tokens):
            queue.put_nowait(job)
        outcomes: list[Outcome] = []

        async def worker() -> None:
            while not queue.empty():
                outcomes.append(await run_one(client, model, queue.get_nowait()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return sorted(outcomes, key=lambda o: o.index), wall


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    xs = sorted(values)
    q = statistics.quantiles(xs, n=100, method="inclusive") if len(xs) > 1 else xs * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": xs[-1], "mean": statistics.fmean(xs)}


def summary(outcomes: list[Outcome], wall: float, clients: int) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200 and not o.error and o.finish_reason]
    tokens = sum(o.completion_tokens for o in ok)
    return {
        "requests": len(outcomes),
        "clients": clients,
        "completed": len(ok),
        "failed": [asdict(o) for o in outcomes if o not in ok],
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "latency_s": percentiles([o.latency_s for o in ok]),
        "ttft_s": percentiles([o.ttft_s for o in ok if o.ttft_s is not None]),
        "streamed": sum(o.stream for o in ok),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)
    outcomes, wall = asyncio.run(soak(args.url, args.requests, args.clients, args.api_key))
    doc = summary(outcomes, wall, args.clients)
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if doc["completed"] == doc["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
