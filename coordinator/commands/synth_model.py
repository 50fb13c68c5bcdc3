"""`coordinator synth-model`: write a random-weight test model (safetensors, tokenizer, GGUF)."""

from __future__ import annotations

import argparse
from pathlib import Path

from coordinator import console
from coordinator.lab.synth import ARCHS, DTYPES, PRESETS, QUANT_BITS, synthesize


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("synth-model", help="write a random-weight model for tests and demos")
    p.add_argument("dir", type=Path, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size")
    p.add_argument("--arch", choices=list(ARCHS), default="llama", help="model architecture")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weight dtype")
    p.add_argument(
        "--quant-bits",
        type=int,
        choices=list(QUANT_BITS),
        default=None,
        help="also quantize the MLX weights (affine, group size 64)",
    )
    p.add_argument("--gguf", action="store_true", help="also write model.gguf (f32) for llama.cpp")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from coordinator.errors import UserError
    from coordinator.lab.gguf_export import SUPPORTED_ARCHS

    if args.gguf and args.arch not in SUPPORTED_ARCHS:
        raise UserError(
            f"--gguf exports {', '.join(SUPPORTED_ARCHS)} models, not --arch {args.arch}"
        )
    out = synthesize(
        args.dir,
        preset=args.preset,
        arch=args.arch,
        seed=args.seed,
        dtype=args.dtype,
        quant_bits=args.quant_bits,
        gguf=args.gguf,
    )
    shape = PRESETS[args.preset]
    console.info(
        f"wrote {args.preset} {args.arch} model ({shape.num_hidden_layers} layers, hidden "
        f"{shape.hidden_size}, vocab {shape.vocab_size}, {args.dtype}"
        + (f", {args.quant_bits}-bit" if args.quant_bits else "")
        + (", + model.gguf" if args.gguf else "")
        + f") to {out}"
    )
    return 0
