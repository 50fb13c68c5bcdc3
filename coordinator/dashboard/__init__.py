"""The live cluster dashboard: static page and script (no build step) served at GET /, and the
node monitor and state document behind GET /api/state."""

from __future__ import annotations

from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
