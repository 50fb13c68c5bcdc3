"""Keeping a model served while machines fail: watch every stage, re-plan over the nodes that
remain, load the new stages, and resume in-flight requests where they stopped.

A request is resumed by prefilling its prompt plus the tokens already generated on the new
pipeline, so the client receives one uninterrupted answer (for greedy decoding, the same
tokens an uninterrupted run gives — the pipeline computes what the unsplit model does).
When the model no longer fits on what remains, in-flight requests end with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace

import grpc

from coordinator.pipeline import (
    GenerationParams,
    GenerationResult,
    Pipeline,
    PipelineError,
    TokenEvent,
    collect,
)
from coordinator.plan import Plan
from node.mdns import NodeRecord

log = logging.getLogger(__name__)

Planner = Callable[[list[NodeRecord]], Awaitable[Plan]]
Opener = Callable[[Plan], Awaitable[Pipeline]]

HEARTBEAT_S = 0.5
HEARTBEAT_DEADLINE_S = 1.0


class Supervisor:
    """Serves requests on the current pipeline and replaces it when a stage dies."""

    def __init__(
        self,
        records: list[NodeRecord],
        planner: Planner,
        opener: Opener,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.records = list(records)
        self.planner = planner
        self.opener = opener
        self.heartbeat_s = heartbeat_s
        self.pipeline: Pipeline | None = None
        self.fatal: str | None = None
        self.recoveries: list[dict[str, object]] = []
        self.replans: list[dict[str, object]] = []
        self._changed = asyncio.Event()
        self._recovering: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    @property
    def plan(self) -> Plan | None:
        return self.pipeline.plan if self.pipeline is not None else None

    @property
    def in_flight(self) -> int:
        return self.pipeline.in_flight if self.pipeline is not None else 0

    async def start(self, pipeline: Pipeline | None = None) -> None:
        """Plan and open the first pipeline (or adopt one already open), then watch it."""
        self.pipeline = pipeline or await self.opener(await self.planner(self.records))
        self._watch = asyncio.create_task(self._heartbeat())

    async def close(self) -> None:
        for t in (self._watch, self._recovering):
            if t is not None:
                t.cancel()
        if self.pipeline is not None:
            await self.pipeline.close()

    # ----- watching ------------------------------------------------------------------------

    async def _probe_stage(self, pipe: Pipeline, address: str) -> bool:
        try:
            await pipe.clients[address].get_info(timeout=HEARTBEAT_DEADLINE_S)
            return True
        except grpc.aio.AioRpcError:
            return False

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            pipe = self.pipeline
            if pipe is None or self._recovering is not None:
                continue
            addresses = [s.address for s in pipe.plan.stages]
            alive = await asyncio.gather(*(self._probe_stage(pipe, a) for a in addresses))
            dead = {a for a, ok in zip(addresses, alive, strict=True) if not ok}
            if dead or pipe.failed is not None:
                reason = pipe.failed or f"no answer from {', '.join(sorted(dead))}"
                pipe.fail(reason)
                self._recovering = asyncio.create_task(self._recover(pipe, dead, reason))

    async def _recover(self, broken: Pipeline, dead: set[str], reason: str) -> None:
        t0 = time.monotonic()
        try:
            # A stage can fail while its node still answers (a broken hop): keep the nodes that
            # answer a fresh heartbeat, drop the rest.
            if not dead:
                checks = await asyncio.gather(
                    *(self._probe_stage(broken, s.address) for s in broken.plan.stages)
                )
                dead = {
                    s.address for s, ok in zip(broken.plan.stages, checks, strict=True) if not ok
                }
            remaining = [r for r in self.records if r.address not in dead]
            log.warning(
                "pipeline %s failed (%s); re-planning over %d node(s)",
                broken.plan.plan_id,
                reason,
                len(remaining),
            )
            # Free the old plan's stages on the nodes that still answer, in the background.
            retire = asyncio.create_task(broken.close(unload=True, skip=frozenset(dead)))
            self._retiring.add(retire)
            retire.add_done_callback(self._retiring.discard)
            if not remaining:
                raise PipelineError("no nodes remain")
            plan = await self.planner(remaining)
            plan = replace(plan, version=broken.plan.version + 1, plan_id="")
            self.pipeline = await self.opener(plan)
            self.records = remaining
            self.recoveries.append(
                {
                    "reason": reason,
                    "dead": sorted(dead),
                    "noticed_at": t0,
                    "seconds": time.monotonic() - t0,
                    "plan_id": plan.plan_id,
                    "stages": len(plan.stages),
                }
            )
            log.warning("recovered on plan %s in %.1fs", plan.plan_id, time.monotonic() - t0)
        except Exception as e:  # any failure to re-plan ends the waiting requests clearly
            self.fatal = f"the model cannot be served after {reason}: {e}"
            log.error("%s", self.fatal)
        finally:
            self._recovering = None
            self._changed.set()
            self._changed = asyncio.Event()

    async def consider(self, records: list[NodeRecord], gain: float = 1.1) -> bool:
        """Membership changed (a node joined or came back): re-plan over `records` and switch
        when the new plan predicts at least `gain` x the current decode speed. Requests in
        flight finish on the old pipeline, which is closed once they are done."""
        current = self.pipeline
        if current is None or self._recovering is not None or self.fatal is not None:
            return False
        known = {r.address for r in self.records}
        self.records = list(records)
        if {r.address for r in records} <= known:
            return False
        plan = await self.planner(list(records))
        now = current.plan.predicted.decode_tps if current.plan.predicted else 0.0
        new = plan.predicted.decode_tps if plan.predicted else 0.0
        if new < gain * now or new <= 0.0:
            log.info(
                "membership changed; keeping plan %s (predicted %.1f vs %.1f tokens/s)",
                current.plan.plan_id,
                now,
                new,
            )
            return False
        plan = replace(plan, version=current.plan.version + 1, plan_id="")
        self.pipeline = await self.opener(plan)
        self.replans.append(
            {
                "plan_id": plan.plan_id,
                "stages": len(plan.stages),
                "predicted_tps": new,
                "previous_tps": now,
            }
        )
        log.warning(
            "switched to plan %s: predicted %.1f tokens/s (was %.1f)", plan.plan_id, new, now
        )
        retire = asyncio.create_task(self._drain_and_close(current))
        self._retiring.add(retire)
        retire.add_done_callback(self._retiring.discard)
        return True

    @staticmethod
    async def _drain_and_close(old: Pipeline, limit_s: float = 600.0) -> None:
        deadline = time.monotonic() + limit_s
        while old.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await old.close()

    async def _wait_replaced(self, broken: Pipeline, timeout: float) -> Pipeline:
        deadline = time.monotonic() + timeout
        while self.pipeline is broken or self.pipeline is None:
            if self.fatal is not None:
                raise PipelineError(self.fatal)
            left = deadline - time.monotonic()
            if left <= 0:
                raise PipelineError(f"no new plan within {timeout:.0f}s after {broken.failed}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()
        if self.fatal is not None:
            raise PipelineError(self.fatal)
        return self.pipeline

    # ----- requests ------------------------------------------------------------------------

    async def stream(
        self,
        prompt: list[int],
        params: GenerationParams,
        request_id: str | None = None,
        recover_timeout_s: float = 120.0,
    ) -> AsyncGenerator[TokenEvent, None]:
        """Like Pipeline.stream, but survives the loss of stages by resuming elsewhere."""
        generated: list[int] = []
        while True:
            if self.fatal is not None:
                raise PipelineError(self.fatal)
            pipe = self.pipeline
            if pipe is None:
                raise PipelineError("no plan is loaded")
            if pipe.failed is not None:
                pipe = await self._wait_replaced(pipe, recover_timeout_s)
            left = replace(params, max_tokens=params.max_tokens - len(generated))
            # Closed explicitly when this stream is: its RELEASE must not wait for the GC.
            inner = pipe.stream(prompt + generated, left, request_id)
            try:
                async with contextlib.aclosing(inner):
                    async for ev in inner:
                        generated.append(ev.token)
                        yield TokenEvent(token=ev.token, step=len(generated) - 1, logits=ev.logits)
                return
            except PipelineError:
                if pipe.failed is None:
                    raise  # this request's own failure, not the pipeline's
                log.info("resuming a request after %d tokens", len(generated))
                await self._wait_replaced(pipe, recover_timeout_s)

    async def generate(self, prompt: list[int], params: GenerationParams) -> GenerationResult:
        return await collect(self.stream(prompt, params), prompt, params)
