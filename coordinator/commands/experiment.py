"""`coordinator experiment split-penalty`: LayerLink and llama.cpp RPC over one host and over a
namespace LAN at several link rates; writes results.json, results.csv, plots and report.md.
See coordinator/lab/experiment.py for what each row means."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from coordinator import console
from coordinator.errors import UserError
from coordinator.lab import bench, experiment, latency
from coordinator.session import SessionError

log = logging.getLogger(__name__)

SYSTEMS = {
    "both": (bench.SYSTEM_LAYERLINK, bench.SYSTEM_LLAMA),
    "layerlink": (bench.SYSTEM_LAYERLINK,),
    "llama-rpc": (bench.SYSTEM_LLAMA,),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("experiment", help="reproducible experiments (split-penalty)")
    exp = p.add_subparsers(dest="experiment", metavar="EXPERIMENT", required=True)
    s = exp.add_parser(
        "split-penalty",
        help="1 stage vs k stages on one host vs k stages over a (shaped, delayed) namespace LAN",
        description=(
            "For LayerLink and llama.cpp RPC: one process, 1 stage, k stages on one host, and k "
            "stages across network namespaces joined by a bridge, unshaped and shaped to "
            "10 GbE, 1 GB/s, 2.5 GbE and 1 GbE, and through delay relays at a Thunderbolt-like "
            "0.05 ms, wired-LAN 0.25 ms, busy-LAN 1 ms and Wi-Fi 3+/-1 ms one-way (each also at "
            "1 GbE) with the relay at 0 ms as the emulator's own cost (namespace rows need "
            "root). Writes results.json, results.csv, decode.png, ttft.png, latency.png and "
            "report.md into --out."
        ),
    )
    s.add_argument(
        "--model",
        required=True,
        metavar="PATH",
        help="model folder, GGUF file or ollama:NAME[:TAG]",
    )
    s.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    s.add_argument("--stages", type=int, default=2, help="stages of the split rows (default: 2)")
    s.add_argument("--system", choices=sorted(SYSTEMS), default="both")
    s.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default: 64)")
    s.add_argument("--gen-tokens", type=int, default=64, help="tokens per run (default: 64)")
    s.add_argument("--repeats", type=int, default=5, help="timed runs per row (default: 5)")
    s.add_argument(
        "--links",
        default=",".join(x.key for x in experiment.LINKS),
        help="namespace-LAN conditions, comma separated, from "
        + ", ".join(f"{x.key} ({x.kind or x.label})" for x in experiment.LINKS)
        + " (default: all; empty: none)",
    )
    s.add_argument("--no-netns", action="store_true", help="skip the namespace-LAN rows")
    real = s.add_argument_group(
        "real machines (optional)",
        "k nodes each (`cluster-node up`), in stage order; llama.cpp rows where RPC servers "
        "are named (`cluster-node up --llama-rpc`, or llama.cpp's own rpc-server with CUDA/Metal)",
    )
    real.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a node on the LAN (the 'cluster' rows)",
    )
    real.add_argument(
        "--rpc",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a llama.cpp RPC server on the LAN",
    )
    real.add_argument(
        "--pc-node",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="the node of one multi-GPU PC, started with --devices N (its devices hold the "
        "'one PC' rows' stages); or one node per GPU, given once per stage",
    )
    real.add_argument(
        "--local-pc",
        action="store_true",
        help="no PC at hand: run the 'one PC' rows on a node of this machine started with "
        "--devices STAGES (CPU devices; LayerLink only)",
    )
    real.add_argument("--pc-rpc", action="append", default=[], metavar="HOST:PORT",
                      help="a llama.cpp RPC server of that PC, one per GPU")  # fmt: skip
    s.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads in one process (default: 1)"
    )
    s.add_argument(
        "--rpc-threads", type=int, default=1,
        help="threads of each llama.cpp RPC server and of its client (default: 1)",
    )  # fmt: skip
    s.add_argument(
        "--timeout", type=float, default=bench.DEFAULT_SAMPLE_TIMEOUT_S, metavar="SECONDS",
        help="give up on one generation after this long (default: 120)",
    )  # fmt: skip
    s.set_defaults(func=run_split_penalty)


def run_split_penalty(args: argparse.Namespace) -> int:
    links = tuple(x.strip() for x in args.links.split(",") if x.strip())
    if args.repeats < 1 or args.gen_tokens < 2 or args.prompt_tokens < 1:
        raise UserError("--repeats >= 1, --gen-tokens >= 2 and --prompt-tokens >= 1, please")
    if args.rpc_threads < 1 or args.threads < 1:
        raise UserError("--threads and --rpc-threads must be at least 1")
    try:
        experiment.select_links(links)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        lan_nodes = asyncio.run(experiment.resolve_nodes(args.node)) if args.node else ()
        pc_nodes = (
            asyncio.run(experiment.resolve_nodes(args.pc_node, devices=True))
            if args.pc_node
            else ()
        )
    except bench.BenchError as e:
        raise UserError(str(e)) from None
    settings = experiment.ExperimentSettings(
        model_dir=Path(args.model),
        out_dir=args.out,
        stages=args.stages,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        repeats=args.repeats,
        links=links,
        netns=not args.no_netns,
        threads=args.threads,
        rpc_threads=args.rpc_threads,
        sample_timeout_s=args.timeout,
        command=reproduce(args),
        pc_nodes=pc_nodes,
        pc_rpc=tuple(args.pc_rpc),
        local_pc=args.local_pc,
        lan_nodes=lan_nodes,
        lan_rpc=tuple(args.rpc),
    )

    def say(message: str) -> None:
        log.info("%s", message)

    try:
        result = experiment.split_penalty(settings, SYSTEMS[args.system], say)
    except (SessionError, ValueError) as e:
        raise UserError(str(e)) from None
    except bench.BenchError as e:
        raise UserError(f"the experiment could not run: {e}") from None
    rows = [experiment.row_json(r, result.links) for r in result.rows]
    console.table(
        f"split penalty: {settings.stages} stages",
        ["condition", "system", "stages", "tok/s", "ms/tok", "TTFT ms", "hop ms", "predicted"],
        [
            [
                r["condition"],
                r["system"],
                r["stages"],
                "error" if r["error"] else _f(r["decode_tps"], ".1f"),
                _f(r["ms_per_token"], ".2f"),
                _f(r["ttft_s"] * 1e3 if r["ttft_s"] else None, ".1f"),
                _f(r["per_hop_ms"], ".3f"),
                _f(r["predicted_tps"], ".1f"),
            ]
            for r in rows
        ],
    )
    for r in rows:
        if r["error"]:
            console.error(f"{r['condition']} {r['system']}: {r['error']}")
    for line in experiment.comparison_lines(rows):
        console.text(line)
    text = latency.analyse(rows)["paragraph"]
    if text:
        console.text(text)
    for note in result.notes:
        console.info(f"note: {note}")
    console.info("wrote " + ", ".join(str(f) for f in result.files))
    return 1 if any(r["error"] for r in rows) else 0


def reproduce(args: argparse.Namespace) -> str:
    """The command line that repeats this experiment, every setting spelled out."""
    argv = ["coordinator", "experiment", "split-penalty", "--model", str(args.model),
            "--out", str(args.out), "--stages", str(args.stages), "--system", args.system,
            "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
            "--repeats", str(args.repeats), "--links", args.links,
            "--rpc-threads", str(args.rpc_threads)]  # fmt: skip
    argv += ["--threads", str(args.threads)]
    if args.no_netns:
        argv.append("--no-netns")
    if args.local_pc:
        argv.append("--local-pc")
    for flag, values in (("--pc-node", args.pc_node), ("--pc-rpc", args.pc_rpc),
                         ("--node", args.node), ("--rpc", args.rpc)):  # fmt: skip
        for v in values:
            argv += [flag, v]
    return experiment.command_line(argv)


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)
