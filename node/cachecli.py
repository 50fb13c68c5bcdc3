"""`cluster-node cache ls | clear`: what the node's weight cache holds, and deleting it."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from node.weightcache import CacheError, WeightCache, clear, default_root

log = logging.getLogger(__name__)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return f"{s:.0f} s ago"


def run_cache(action: str, root: Path | None = None) -> int:
    root = root or default_root()
    console = Console()
    if action == "clear":
        try:
            freed = clear(root)
        except CacheError as e:
            Console(stderr=True).print(f"[bold red]error:[/] {e}")
            return 1
        console.print(f"cleared the weight cache {root}: {_gb(freed)} freed")
        return 0
    if not (root / "index.sqlite").is_file():
        console.print(f"the weight cache {root} is empty")
        return 0
    cache = WeightCache(root)
    try:
        listing = cache.listing()
    finally:
        cache.close()
    table = Table(title=f"weight cache {root}")
    for col in ("stage", "model", "holds", "tensors", "size", "cached", "last used"):
        table.add_column(col)
    for row in listing.stages:
        complete = row.cached_bytes >= row.nbytes
        table.add_row(
            row.weights_id[:12],
            row.model,
            row.label,
            str(row.tensors),
            _gb(row.nbytes),
            "complete" if complete else f"{100 * row.cached_bytes / max(1, row.nbytes):.0f}%",
            _ago(row.last_used),
        )
    console.print(table)
    console.print(
        f"{listing.blob_count} tensors, {_gb(listing.blob_bytes)} of a "
        f"{_gb(listing.max_bytes)} cap"
        + (f"; {_gb(listing.partial_bytes)} partly received" if listing.partial_bytes else "")
    )
    return 0
