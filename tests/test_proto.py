"""The committed generated gRPC code is what `make proto` would write now."""

from __future__ import annotations

from pathlib import Path

from node import protogen


def test_generated_code_is_current(tmp_path: Path) -> None:
    fresh = protogen.generate(tmp_path)
    assert fresh
    for path in fresh:
        committed = protogen.OUT_DIR / path.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run `make proto`"
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make proto`"
