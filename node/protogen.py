"""Regenerate the Python gRPC code under node/_proto from proto/ (`make proto`).

grpc_tools writes absolute imports (`from layerlink.v1 import node_pb2`); they are rewritten
to point inside this package so that no top-level `layerlink` package is needed.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent / "_proto"
PACKAGE = "node._proto"


def generate(out_dir: Path) -> list[Path]:
    """Generate code for every .proto file under proto/ into out_dir; return the files."""
    from grpc_tools import protoc  # dev dependency, imported only here

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {protos}")
        written: list[Path] = []
        for src in sorted(Path(tmp).rglob("*.py*")):
            rel = src.relative_to(tmp)
            text = src.read_text()
            text = re.sub(r"^from layerlink\.", f"from {PACKAGE}.layerlink.", text, flags=re.M)
            dst = out_dir / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(text)
            written.append(dst)
    for d in {out_dir, *(p.parent for p in written)}:
        d_rel = d
        while True:
            init = d_rel / "__init__.py"
            if not init.exists():
                init.write_text("")
            if d_rel == out_dir:
                break
            d_rel = d_rel.parent
    return written


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = generate(OUT_DIR)
    for f in files:
        log.info("wrote %s", f.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
