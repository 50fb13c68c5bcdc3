"""Weight shipments as the dashboard shows them: a bar per stage of the latest shipment.

`ShipBoard` is a `ShipProgress` (coordinator/shipping.py) that keeps what it is told, so
`GET /api/state` can report it while a shipment runs (the coordinator serves the dashboard
before its first plan is loaded) and after it ended (how much each node received, how fast,
and which stages needed nothing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from coordinator.shipping import StageShipment, progress_label


@dataclass(frozen=True)
class ShipBar:
    label: str
    total_bytes: int  # what the node lacked when the shipment started
    sent_bytes: int
    started: float
    seconds: float | None = None  # set when the stage's shipment ended
    source: str = ""  # "cache" or "own copy" once ended

    def to_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "total_bytes": self.total_bytes,
            "sent_bytes": self.sent_bytes,
            "done": self.seconds is not None,
            "seconds": self.seconds,
            "gbs": self.sent_bytes / self.seconds / 1e9
            if self.seconds and self.sent_bytes
            else None,
            "source": self.source,
        }


class ShipBoard:
    """The latest shipment's progress, per stage; `begin()` starts a new shipment."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.plan_id = ""
        self.error = ""
        self.bars: dict[str, ShipBar] = {}

    def begin(self, plan_id: str) -> None:
        self.plan_id = plan_id
        self.error = ""
        self.bars = {}

    def fail(self, message: str) -> None:
        self.error = message

    def start(self, key: str, label: str, total: int) -> None:
        self.bars[key] = ShipBar(label, total, 0, self._clock())

    def advance(self, key: str, nbytes: int) -> None:
        bar = self.bars.get(key)
        if bar is not None:
            self.bars[key] = replace(bar, sent_bytes=bar.sent_bytes + nbytes)

    def finish(self, key: str, shipment: StageShipment) -> None:
        label = progress_label(shipment.stage_index, shipment.node_name)
        bar = self.bars.get(key) or ShipBar(label, 0, 0, self._clock())
        self.bars[key] = replace(
            bar,
            sent_bytes=shipment.sent_bytes,
            seconds=shipment.seconds,
            source="own copy" if shipment.local else "cache",
        )

    @property
    def active(self) -> bool:
        return any(b.seconds is None for b in self.bars.values()) and not self.error

    def to_json(self) -> dict[str, object]:
        return {
            "plan_id": self.plan_id,
            "active": self.active,
            "error": self.error or None,
            "stages": [self.bars[k].to_json() for k in sorted(self.bars, key=_stage_order)],
        }


def _stage_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 30, key)
