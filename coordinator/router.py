"""Serving on several replicas: each new request goes to the replica expected to finish it
first, and stays there (its KV cache lives on that replica's stages).

A replica is a Supervisor (coordinator/supervisor.py) around one pipeline: it watches the
stages and re-plans the replica over its own remaining nodes when one dies. The router only
chooses, counts and resumes:

* Choosing. Replica i with n requests in flight is expected to decode a new request at
  rate_i(n + 1) / (n + 1) tokens/s, where rate_i(m) = min(m x predicted decode tokens/s,
  1 / slowest predicted stage) (the cost model's throughput at m requests; without a
  prediction every replica counts as equally fast), times a correction learnt from the
  requests it finished (measured / expected decode rate, smoothed). The request goes where
  that is highest: the least expected time to finish it. Requests are counted from the moment
  they are routed, so a burst spreads out at once.
* Faults. A replica whose pipeline failed takes no new requests. A request whose replica
  fails mid-answer resumes on another healthy replica (its prompt plus the tokens already
  generated are prefilled there), so the client sees one uninterrupted answer — for greedy
  decoding the same tokens. The failed replica's Supervisor re-plans it over its remaining
  nodes, or gives it up (fatal) when the model no longer fits there; then it is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import replace

from coordinator.pipeline import (
    GenerationParams,
    GenerationResult,
    Pipeline,
    PipelineError,
    TokenEvent,
    collect,
)
from coordinator.plan import Plan
from coordinator.supervisor import Supervisor
from node.mdns import NodeRecord

log = logging.getLogger(__name__)

SMOOTHING = 0.3  # weight of the newest measured/expected ratio in a replica's correction
MIN_TOKENS_TO_LEARN = 4  # requests shorter than this teach the router nothing about speed


def predicted_rate(plan: Plan | None, requests: int) -> float:
    """A replica's aggregate decode tokens/s with `requests` in flight, from its plan's
    prediction (1 token/s flat when it has none: then only the load decides)."""
    if requests <= 0:
        return 0.0
    p = plan.predicted if plan is not None else None
    if p is None or p.decode_tps <= 0:
        return 1.0
    rate = requests * p.decode_tps
    if p.stage_s and max(p.stage_s) > 0:
        rate = min(rate, 1.0 / max(p.stage_s))
    return rate


class ReplicaRouter:
    """Serves requests on several Supervisors (one per replica); same interface as one."""

    def __init__(self, replicas: list[Supervisor]) -> None:
        if not replicas:
            raise ValueError("a router needs at least one replica")
        self.replicas = list(replicas)
        self.load = [0] * len(replicas)  # requests routed to each and not finished
        self.correction = [1.0] * len(replicas)
        self.routed = [0] * len(replicas)  # requests ever sent to each (resumes included)
        self.resumed = 0

    # ----- what the API, dashboard and `up` read -------------------------------------------

    @property
    def plans(self) -> list[Plan | None]:
        return [s.plan for s in self.replicas]

    @property
    def plan(self) -> Plan | None:
        """The first replica still serving (the dashboard's one-plan view)."""
        for i in self.healthy():
            return self.replicas[i].plan
        return self.replicas[0].plan

    @property
    def in_flight(self) -> int:
        return sum(self.load)

    @property
    def fatal(self) -> str | None:
        reasons = [s.fatal for s in self.replicas]
        if all(reasons):
            return "; ".join(r for r in reasons if r)
        return None

    def healthy(self) -> list[int]:
        """Replicas that take new requests: loaded, not failed, not given up."""
        out = []
        for i, s in enumerate(self.replicas):
            pipe = s.pipeline
            if s.fatal is None and pipe is not None and pipe.failed is None:
                out.append(i)
        return out

    def expected_rate(self, i: int, requests: int) -> float:
        """Decode tokens/s one request is expected to get on replica i with `requests` in
        flight there (itself included)."""
        return (
            predicted_rate(self.replicas[i].plan, requests) / max(1, requests) * self.correction[i]
        )

    def choose(self, exclude: frozenset[int] = frozenset()) -> int | None:
        """The healthy replica expected to finish a new request first; None if none."""
        best: int | None = None
        best_v = -1.0
        for i in self.healthy():
            if i in exclude:
                continue
            v = self.expected_rate(i, self.load[i] + 1)
            if v > best_v * (1 + 1e-9):
                best, best_v = i, v
        return best

    async def close(self) -> None:
        for s in self.replicas:
            await s.close()

    async def consider(self, records: list[NodeRecord], gain: float = 1.1) -> bool:
        """Membership changes do not re-plan replicas (yet): they keep serving as planned."""
        log.info("membership changed; the %d replicas keep their plans", len(self.replicas))
        return False

    # ----- requests ------------------------------------------------------------------------

    async def _route(self, timeout_s: float) -> tuple[int, Pipeline]:
        """Claim the best replica (counted at once); waits while every replica recovers."""
        deadline = time.monotonic() + timeout_s
        while True:
            i = self.choose()
            if i is not None:
                pipe = self.replicas[i].pipeline
                assert pipe is not None
                self.load[i] += 1
                self.routed[i] += 1
                return i, pipe
            fatal = self.fatal
            if fatal is not None:
                raise PipelineError(fatal)
            if time.monotonic() > deadline:
                raise PipelineError(f"no replica recovered within {timeout_s:.0f}s")
            await asyncio.sleep(0.05)

    def learn(self, i: int, requests: int, tokens: int, seconds: float) -> None:
        """Fold a finished request's decode rate (`tokens` over `seconds`, with `requests` in
        flight on replica i when it started) into that replica's correction."""
        if tokens < MIN_TOKENS_TO_LEARN or seconds <= 0:
            return
        expected = predicted_rate(self.replicas[i].plan, requests) / max(1, requests)
        if expected <= 0:
            return
        ratio = min(10.0, max(0.1, (tokens / seconds) / expected))
        self.correction[i] = (1 - SMOOTHING) * self.correction[i] + SMOOTHING * ratio

    async def stream(
        self,
        prompt: list[int],
        params: GenerationParams,
        request_id: str | None = None,
        recover_timeout_s: float = 120.0,
    ) -> AsyncGenerator[TokenEvent, None]:
        """Like Pipeline.stream, on the replica expected to finish first; resumes on another
        replica when this one fails mid-answer."""
        generated: list[int] = []
        while True:
            i, pipe = await self._route(recover_timeout_s)
            at_start = self.load[i]
            left = replace(params, max_tokens=params.max_tokens - len(generated))
            inner = pipe.stream(prompt + generated, left, request_id)
            first_at: float | None = None
            n = 0
            try:
                async with contextlib.aclosing(inner):
                    async for ev in inner:
                        if first_at is None:
                            first_at = time.perf_counter()
                        n += 1
                        generated.append(ev.token)
                        yield TokenEvent(token=ev.token, step=len(generated) - 1, logits=ev.logits)
                if first_at is not None:
                    self.learn(i, at_start, n - 1, time.perf_counter() - first_at)
                return
            except PipelineError:
                if pipe.failed is None:
                    raise  # this request's own failure, not the replica's
                self.resumed += 1
                log.warning(
                    "replica %d failed (%s); resuming a request after %d tokens elsewhere",
                    i + 1,
                    pipe.failed,
                    len(generated),
                )
            finally:
                self.load[i] -= 1

    async def generate(self, prompt: list[int], params: GenerationParams) -> GenerationResult:
        return await collect(self.stream(prompt, params), prompt, params)

    def to_json(self) -> list[dict[str, object]]:
        """Per replica: its plan, health, load and what the router has learnt."""
        healthy = set(self.healthy())
        out: list[dict[str, object]] = []
        for i, s in enumerate(self.replicas):
            plan = s.plan
            out.append(
                {
                    "replica": i + 1,
                    "plan_id": plan.plan_id if plan is not None else None,
                    "nodes": [st.node_name for st in plan.stages] if plan is not None else [],
                    "stages": (
                        [{"node": st.node_name, "layers": [st.start, st.end]} for st in plan.stages]
                        if plan is not None
                        else []
                    ),
                    "healthy": i in healthy,
                    "fatal": s.fatal,
                    "in_flight": self.load[i],
                    "routed": self.routed[i],
                    "speed_correction": round(self.correction[i], 3),
                    "predicted_decode_tps": (
                        plan.predicted.decode_tps
                        if plan is not None and plan.predicted is not None
                        else None
                    ),
                }
            )
        return out
