"""Serving metrics: the Prometheus text exposition at GET /metrics and the live figures the
dashboard shows (tokens/s over a short window, requests in flight, recent requests).

Everything here is measured at the coordinator: a request's time to first token counts from
its arrival (queueing included); the per-token latency is the gap between two tokens of one
request, i.e. one round trip coordinator -> stage 0 -> ... -> last stage -> coordinator.
The exposition format is written here (text format 0.0.4); no client library needed.
"""

from __future__ import annotations

import abc
import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; chosen for decode steps of a few ms (GPU, one machine) to seconds (CPU pipelines).
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_COUNT_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)

Labels = tuple[str, ...]


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _label_text(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric(abc.ABC):
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names: Labels = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    @abc.abstractmethod
    def samples(self) -> Iterator[str]:
        """The metric's lines in the text format, one per series."""

    def render(self) -> str:
        head = f"# HELP {self.name} {_escape_help(self.help)}\n# TYPE {self.name} {self.kind}\n"
        return head + "".join(line + "\n" for line in self.samples())


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def mirror(self, values: dict[Labels, float]) -> None:
        """Replace every series with counters kept by another process (a node's own)."""
        with self._lock:
            self._values = dict(values)

    def total(self) -> float:
        return sum(self._values.values())

    def samples(self) -> Iterator[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.label_names:
            items = [((), 0.0)]
        for key, v in items:
            yield f"{self.name}{_label_text(self.label_names, key)} {_fmt(v)}"


class Gauge(_Metric):
    """A value set from outside, or read from `source` at every render."""

    kind = "gauge"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        source: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[Labels, float] = {}
        self._source = source

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def samples(self) -> Iterator[str]:
        if self._source is not None:
            yield f"{self.name} {_fmt(self._source())}"
            return
        with self._lock:
            items = sorted(self._values.items())
        for key, v in items:
            yield f"{self.name}{_label_text(self.label_names, key)} {_fmt(v)}"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help_text, labels)
        if list(buckets) != sorted(set(buckets)):
            raise ValueError("histogram buckets must increase")
        self.bounds = tuple(float(b) for b in buckets)
        # Per label set: counts per bucket (non-cumulative, last = +Inf), sum.
        self._counts: dict[Labels, list[int]] = {}
        self._sums: dict[Labels, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.bounds) + 1))
            counts[i] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        return sum(self._counts.get(self._key(labels), []))

    def samples(self) -> Iterator[str]:
        with self._lock:
            items = sorted((k, list(c), self._sums[k]) for k, c in self._counts.items())
        for key, counts, total in items:
            running = 0
            for bound, c in zip((*self.bounds, math.inf), counts, strict=True):
                running += c
                le = f'le="{_fmt(bound)}"'
                yield f"{self.name}_bucket{_label_text(self.label_names, key, le)} {running}"
            lt = _label_text(self.label_names, key)
            yield f"{self.name}_sum{lt} {_fmt(total)}"
            yield f"{self.name}_count{lt} {running}"


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> None:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is already registered")
        self._metrics[metric.name] = metric

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        m = Counter(name, help_text, labels)
        self.add(m)
        return m

    def gauge(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        source: Callable[[], float] | None = None,
    ) -> Gauge:
        m = Gauge(name, help_text, labels, source)
        self.add(m)
        return m

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> Histogram:
        m = Histogram(name, help_text, buckets, labels)
        self.add(m)
        return m

    def render(self) -> str:
        return "".join(m.render() for m in self._metrics.values())


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, as the dashboard lists it."""

    request_id: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float | None
    duration_s: float
    decode_tps: float
    finish_reason: str  # stop | length | cancelled | error
    finished_at: float  # wall-clock seconds since the epoch

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.request_id,
            "endpoint": self.endpoint,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queue_ms": round(self.queue_s * 1e3, 1),
            "ttft_ms": None if self.ttft_s is None else round(self.ttft_s * 1e3, 1),
            "duration_s": round(self.duration_s, 3),
            "tokens_per_s": round(self.decode_tps, 1),
            "finish_reason": self.finish_reason,
            "finished_at": self.finished_at,
        }


@dataclass(frozen=True)
class LiveFigures:
    tokens_per_s: float
    in_flight: int
    queued: int
    requests_total: int
    completion_tokens_total: int
    uptime_s: float

    def to_json(self) -> dict[str, object]:
        return {
            "tokens_per_s": round(self.tokens_per_s, 1),
            "in_flight": self.in_flight,
            "queued": self.queued,
            "requests_total": self.requests_total,
            "completion_tokens_total": self.completion_tokens_total,
            "uptime_s": round(self.uptime_s, 1),
        }


class RequestTrace:
    """The timeline of one request; created on arrival, closed exactly once by `finish`."""

    def __init__(self, owner: ServingMetrics, request_id: str, endpoint: str) -> None:
        self._owner = owner
        self.request_id = request_id
        self.endpoint = endpoint
        self.arrived = owner.clock()
        self.admitted: float | None = None
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.tokens = 0
        self.prompt_tokens = 0
        self.finished = False

    def admit(self, prompt_tokens: int) -> None:
        self.admitted = self._owner.clock()
        self.prompt_tokens = prompt_tokens
        self._owner.on_admit(self)

    def token(self) -> None:
        now = self._owner.clock()
        if self.first_token is None:
            self.first_token = now
        self._owner.on_token(self, now)
        self.last_token = now
        self.tokens += 1

    def reject(self, reason: str) -> None:
        """Turned away before admission (not counted as a request)."""
        if self.finished:
            return
        self.finished = True
        self._owner.on_reject(self, reason)

    def finish(self, reason: str, completion_tokens: int | None = None) -> RequestRecord | None:
        if self.finished:
            return None
        self.finished = True
        return self._owner.on_finish(self, reason, completion_tokens)


class ServingMetrics:
    """All serving metrics of one coordinator, and the live view derived from them."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = 2.0,
        recent: int = 25,
    ) -> None:
        self.clock = clock
        self.window_s = window_s
        self.started = clock()
        self.in_flight = 0
        self.queued = 0
        self._token_times: deque[float] = deque()
        self.recent: deque[RequestRecord] = deque(maxlen=recent)
        r = self.registry = Registry()
        self.requests = r.counter(
            "layerlink_requests_total",
            "Requests finished, by endpoint and finish reason (stop, length, cancelled, error).",
            ("endpoint", "finish_reason"),
        )
        self.rejected = r.counter(
            "layerlink_requests_rejected_total",
            "Requests turned away before running (queue full, no plan loaded).",
            ("reason",),
        )
        self.prompt_tokens = r.counter(
            "layerlink_prompt_tokens_total", "Prompt tokens of admitted requests."
        )
        self.completion_tokens = r.counter(
            "layerlink_completion_tokens_total", "Tokens generated (sampled by the last stage)."
        )
        r.gauge(
            "layerlink_requests_in_flight",
            "Requests running on the pipeline.",
            source=lambda: self.in_flight,
        )
        r.gauge(
            "layerlink_requests_queued",
            "Requests waiting for a pipeline slot.",
            source=lambda: self.queued,
        )
        r.gauge(
            "layerlink_tokens_per_second",
            f"Tokens generated per second over the last {window_s:g} s, all requests together.",
            source=lambda: self.tokens_per_s(),
        )
        self.queue_seconds = r.histogram(
            "layerlink_queue_seconds", "Time a request waited for a pipeline slot.", TTFT_BUCKETS
        )
        self.ttft = r.histogram(
            "layerlink_time_to_first_token_seconds",
            "From a request's arrival to its first generated token (queue and prefill included).",
            TTFT_BUCKETS,
        )
        self.token_latency = r.histogram(
            "layerlink_token_latency_seconds",
            "Gap between consecutive tokens of one request: one round trip coordinator -> "
            "every stage -> coordinator.",
            LATENCY_BUCKETS,
        )
        self.completion_length = r.histogram(
            "layerlink_completion_tokens",
            "Tokens generated per finished request.",
            TOKEN_COUNT_BUCKETS,
        )
        self.node_rpc = r.gauge(
            "layerlink_node_rpc_seconds",
            "Round trip of the last GetInfo call from the coordinator to each node.",
            ("node",),
        )
        self.node_up = r.gauge(
            "layerlink_node_up", "1 when the node answered its last GetInfo call.", ("node",)
        )
        self.stage_active = r.gauge(
            "layerlink_stage_active_requests",
            "Requests holding a KV cache on each stage (from node GetInfo).",
            ("stage", "node"),
        )
        self.stage_layers = r.gauge(
            "layerlink_stage_layers",
            "Layers held by each stage of the current plan.",
            ("stage", "node"),
        )
        self.stage_decode_steps = r.counter(
            "layerlink_stage_decode_steps_total",
            "Single-token decode steps each stage has computed (the node's counter).",
            ("stage", "node"),
        )
        self.stage_decode_seconds = r.counter(
            "layerlink_stage_decode_seconds_total",
            "Compute time of those steps, message in to output ready (the node's counter).",
            ("stage", "node"),
        )
        self.stage_compute = r.gauge(
            "layerlink_stage_compute_seconds",
            "Each stage's recent compute per decode token (windows of at least 8 steps).",
            ("stage", "node"),
        )
        self.hop_seconds = r.gauge(
            "layerlink_hop_seconds",
            "Estimated time per hop between stages: (time per token of the recent requests "
            "- the stages' compute) / hops per token.",
        )
        self.link_latency = r.gauge(
            "layerlink_link_latency_seconds",
            "Measured one-way latency of each node-to-node link (from the last probe).",
            ("src", "dst"),
        )
        self.link_bandwidth = r.gauge(
            "layerlink_link_bandwidth_bytes_per_second",
            "Measured bandwidth of each node-to-node link (from the last probe).",
            ("src", "dst"),
        )
        # Serving with replicas (coordinator/router.py); absent with one pipeline.
        self.replica_up = r.gauge(
            "layerlink_replica_up",
            "1 while the replica takes new requests, 0 while it recovers or after it was dropped.",
            ("replica",),
        )
        self.replica_in_flight = r.gauge(
            "layerlink_replica_requests_in_flight",
            "Requests running on each replica.",
            ("replica",),
        )
        self.replica_routed = r.counter(
            "layerlink_replica_requests_total",
            "Requests routed to each replica (a request resumed on another counts there too).",
            ("replica",),
        )
        self.replica_predicted = r.gauge(
            "layerlink_replica_predicted_decode_tokens_per_second",
            "Each replica's predicted single-stream decode rate (its plan's prediction).",
            ("replica",),
        )
        self.replica_correction = r.gauge(
            "layerlink_replica_speed_correction",
            "Measured / predicted decode rate the router has learnt for each replica.",
            ("replica",),
        )

    def set_replicas(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """The replica series from `ReplicaRouter.to_json()`."""
        for g in (
            self.replica_up,
            self.replica_in_flight,
            self.replica_predicted,
            self.replica_correction,
        ):
            g.clear()
        routed: dict[Labels, float] = {}
        for row in rows:
            label = str(row["replica"])
            self.replica_up.set(1.0 if row["healthy"] else 0.0, replica=label)
            self.replica_in_flight.set(float(row["in_flight"]), replica=label)
            self.replica_correction.set(float(row["speed_correction"]), replica=label)
            if row.get("predicted_decode_tps") is not None:
                self.replica_predicted.set(float(row["predicted_decode_tps"]), replica=label)
            routed[(label,)] = float(row["routed"])
        self.replica_routed.mirror(routed)

    # ----- request lifecycle ---------------------------------------------------------------

    def start(self, request_id: str, endpoint: str) -> RequestTrace:
        self.queued += 1
        return RequestTrace(self, request_id, endpoint)

    def on_admit(self, trace: RequestTrace) -> None:
        assert trace.admitted is not None
        self.queued -= 1
        self.in_flight += 1
        self.queue_seconds.observe(trace.admitted - trace.arrived)
        self.prompt_tokens.inc(trace.prompt_tokens)

    def on_reject(self, trace: RequestTrace, reason: str) -> None:
        self.queued -= 1
        self.rejected.inc(reason=reason)

    def on_token(self, trace: RequestTrace, now: float) -> None:
        if trace.first_token is not None and trace.last_token is not None:
            self.token_latency.observe(now - trace.last_token)
        else:
            self.ttft.observe(now - trace.arrived)
        self.completion_tokens.inc()
        self._token_times.append(now)
        self._trim(now)

    def on_finish(
        self, trace: RequestTrace, reason: str, completion_tokens: int | None
    ) -> RequestRecord:
        now = self.clock()
        if trace.admitted is None:
            self.queued -= 1
        else:
            self.in_flight -= 1
        n = trace.tokens if completion_tokens is None else completion_tokens
        self.requests.inc(endpoint=trace.endpoint, finish_reason=reason)
        if trace.admitted is not None:
            self.completion_length.observe(n)
        decode_s = (
            trace.last_token - trace.first_token
            if trace.first_token is not None and trace.last_token is not None
            else 0.0
        )
        record = RequestRecord(
            request_id=trace.request_id,
            endpoint=trace.endpoint,
            prompt_tokens=trace.prompt_tokens,
            completion_tokens=n,
            queue_s=(trace.admitted or now) - trace.arrived,
            ttft_s=None if trace.first_token is None else trace.first_token - trace.arrived,
            duration_s=now - trace.arrived,
            decode_tps=(trace.tokens - 1) / decode_s if decode_s > 0 else 0.0,
            finish_reason=reason,
            finished_at=time.time(),
        )
        if trace.admitted is not None:
            self.recent.appendleft(record)
        return record

    # ----- live view -----------------------------------------------------------------------

    def _trim(self, now: float) -> None:
        horizon = now - self.window_s
        while self._token_times and self._token_times[0] <= horizon:
            self._token_times.popleft()

    def tokens_per_s(self) -> float:
        now = self.clock()
        self._trim(now)
        span = min(self.window_s, max(1e-9, now - self.started))
        return len(self._token_times) / span

    def live(self) -> LiveFigures:
        return LiveFigures(
            tokens_per_s=self.tokens_per_s(),
            in_flight=self.in_flight,
            queued=self.queued,
            requests_total=int(self.requests.total()),
            completion_tokens_total=int(self.completion_tokens.total()),
            uptime_s=self.clock() - self.started,
        )

    def render(self) -> str:
        return self.registry.render()
