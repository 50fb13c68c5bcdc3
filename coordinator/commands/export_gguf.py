"""`coordinator export-gguf`: write a model folder as GGUF for the llama.cpp baseline."""

from __future__ import annotations

import argparse
from pathlib import Path

from coordinator import console
from coordinator.errors import UserError
from coordinator.lab.gguf_export import FTYPES, export_gguf


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("export-gguf", help="export a llama/qwen2 model folder to GGUF")
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="HF/MLX safetensors folder")
    p.add_argument("out", type=Path, metavar="OUT.gguf", help="GGUF file to write")
    p.add_argument("--ftype", choices=list(FTYPES), default="f32", help="storage of 2-D weights")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not (args.model_dir / "config.json").is_file():
        raise UserError(f"{args.model_dir} has no config.json: not a model folder")
    try:
        out = export_gguf(args.model_dir, args.out, ftype=args.ftype)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    console.info(f"wrote {out} ({args.ftype}, {out.stat().st_size / 2**20:.1f} MiB)")
    return 0
