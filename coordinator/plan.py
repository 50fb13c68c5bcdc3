"""Plans: which node holds which layers. Immutable values; re-planning makes a new Plan."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: layers [start, end) of the model on one device of one node."""

    node_id: str
    node_name: str
    address: str  # host:port of the node's gRPC server
    start: int
    end: int
    device: str = "0"

    @property
    def layer_count(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node_name,
            "node_id": self.node_id,
            "address": self.address,
            "device": self.device,
            "layers": [self.start, self.end],
        }


@dataclass(frozen=True)
class Prediction:
    """What the cost model expects of a plan before it runs."""

    decode_tps: float
    ttft_s: float
    throughput_tps: float
    bottleneck: str = ""
    # Each stage's compute per decoded token (s), in stage order; () when not predicted.
    stage_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class Plan:
    """An immutable, versioned assignment of contiguous layer ranges to stages."""

    model: str
    num_layers: int
    stages: tuple[Stage, ...]
    version: int = 1
    explanation: str = ""
    predicted: Prediction | None = None
    plan_id: str = field(default="")

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a plan needs at least one stage")
        expected = 0
        for s in self.stages:
            if s.start != expected or s.end <= s.start:
                raise ValueError(
                    f"stages must cover [0, {self.num_layers}) contiguously; "
                    f"got {[(st.start, st.end) for st in self.stages]}"
                )
            expected = s.end
        if expected != self.num_layers:
            raise ValueError(f"stages end at layer {expected}, model has {self.num_layers}")
        if not self.plan_id:
            key = repr(
                (
                    self.model,
                    self.version,
                    [(s.node_id, s.device, s.start, s.end) for s in self.stages],
                )
            )
            object.__setattr__(self, "plan_id", "p" + hashlib.sha1(key.encode()).hexdigest()[:12])

    @property
    def hops(self) -> int:
        return len(self.stages) - 1

    def to_json(self) -> list[dict[str, object]]:
        return [s.to_json() for s in self.stages]


@dataclass(frozen=True)
class ServingPlan:
    """What `coordinator up` serves: one or more pipelines (replicas), each holding the whole
    model on devices of its own. One replica is today's single pipeline."""

    replicas: tuple[Plan, ...]
    concurrency: int = 1  # the requests in flight it was planned for
    aggregate_tps: float | None = None  # predicted, all replicas together
    per_request_tps: float | None = None  # predicted, the slowest request
    explanation: str = ""
    shares: tuple[int, ...] = ()  # requests in flight each replica was planned for

    def __post_init__(self) -> None:
        if not self.replicas:
            raise ValueError("a serving plan needs at least one replica")
        seen: set[tuple[str, str]] = set()
        for p in self.replicas:
            for s in p.stages:
                if (s.node_id, s.device) in seen:
                    raise ValueError(f"device {s.device} of node {s.node_name} is in two replicas")
                seen.add((s.node_id, s.device))


def split_by_weights(num_layers: int, weights: list[float]) -> list[tuple[int, int]]:
    """Contiguous half-open ranges with layer counts proportional to weights, each >= 1."""
    n = len(weights)
    if n == 0 or n > num_layers:
        raise ValueError(f"cannot split {num_layers} layers over {n} stages")
    if any(w <= 0 for w in weights):
        raise ValueError("weights must be positive")
    total = sum(weights)
    counts = [max(1, int(num_layers * w / total)) for w in weights]
    # Hand out the remainder (or take back the excess) by largest fractional share.
    while sum(counts) < num_layers:
        i = max(range(n), key=lambda k: num_layers * weights[k] / total - counts[k])
        counts[i] += 1
    while sum(counts) > num_layers:
        i = max(
            (k for k in range(n) if counts[k] > 1),
            key=lambda k: counts[k] - num_layers * weights[k] / total,
        )
        counts[i] -= 1
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges
