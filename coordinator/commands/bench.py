"""`coordinator bench` (one model, LayerLink next to llama.cpp RPC on the same split) and
`coordinator bench-suite` (`make bench`: the tiny and small models, every system, 1-3 stages,
and the raw socket round trip, all in one run). Definitions live in coordinator/lab/bench.py."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from coordinator import console
from coordinator.commands._common import add_discovery_args, add_model_args, discover
from coordinator.errors import UserError
from coordinator.lab import bench
from coordinator.session import ModelInfo, SessionError, read_model

log = logging.getLogger(__name__)

SYSTEM_CHOICES = {
    "layerlink": (bench.SYSTEM_LAYERLINK,),
    "llama-rpc": (bench.SYSTEM_LLAMA,),
    "both": (bench.SYSTEM_LAYERLINK, bench.SYSTEM_LLAMA),
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="decode speed, TTFT and per-hop overhead of LayerLink and llama.cpp RPC, same split",
        description=(
            "Run the same model with the same layer counts per stage in LayerLink and in "
            "llama.cpp over RPC; warm-up excluded, repeats interleaved, medians reported. "
            "Without --node/--nodes it starts its own nodes and RPC servers on 127.0.0.1."
        ),
    )
    add_model_args(p)
    p.add_argument("--system", choices=sorted(SYSTEM_CHOICES), default="both")
    p.add_argument("--stages", type=int, default=2, help="stages of the split run (default: 2)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default: 32)")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens per run (default: 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (5)")
    p.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads in one process (default: 1)"
    )
    p.add_argument(
        "--rpc-threads", type=int, default=1,
        help="threads of each llama.cpp RPC server and of its client (default: 1)",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=bench.DEFAULT_SAMPLE_TIMEOUT_S, metavar="SECONDS",
        help="give up on one generation after this long (default: 120)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--rpc", action="append", default=[], metavar="HOST:PORT",
        help="with --node/--nodes: a llama.cpp RPC server per stage, in stage order (default: "
        "the servers the nodes advertise, `cluster-node up --llama-rpc`)",
    )  # fmt: skip
    add_discovery_args(p)
    p.set_defaults(func=run_bench)

    s = sub.add_parser(
        "bench-suite",
        help="`make bench`: mlx_lm, LayerLink 1-3 stages, the floor and llama.cpp on the tiny "
        "and small synthetic models and the real SmolLM2 GGUF",
    )
    s.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    s.add_argument(
        "--models",
        default="tiny,small,smollm2",
        help="synthetic presets and/or smollm2, the bundled real GGUF (default: tiny,small,smollm2)",
    )
    s.add_argument("--stages", default="1,2,3", help="stage counts (default: 1,2,3)")
    s.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default: 32)")
    s.add_argument("--gen-tokens", type=int, default=64, help="tokens per run (default: 64)")
    s.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (5)")
    s.add_argument("--no-llama", action="store_true", help="skip the llama.cpp baseline")
    s.add_argument(
        "--threads", type=int, default=1, help="llama.cpp threads in one process (default: 1)"
    )
    s.add_argument(
        "--rpc-threads", type=int, default=1,
        help="threads of each llama.cpp RPC server and of its client (default: 1)",
    )  # fmt: skip
    s.add_argument("--model-root", type=Path, default=None, help="where synthetic models live")
    s.add_argument("--json", action="store_true", help="print the JSON result")
    s.set_defaults(func=run_suite)


# ----- bench ---------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace, model: ModelInfo) -> bench.BenchSettings:
    settings = bench.BenchSettings(
        model_dir=model.path,
        systems=SYSTEM_CHOICES[args.system],
        stages=args.stages,
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        repeats=args.repeats,
        threads=args.threads,
        rpc_threads=args.rpc_threads,
        sample_timeout_s=args.timeout,
    )
    try:
        settings.check(model.num_layers)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.threads < 1 or args.rpc_threads < 1:
        raise UserError("--threads and --rpc-threads must be at least 1")
    if args.timeout <= 0:
        raise UserError("--timeout must be positive")
    return settings


async def bench_on_cluster(
    args: argparse.Namespace, settings: bench.BenchSettings, model: ModelInfo
) -> dict[str, Any]:
    """Measure on discovered nodes (--node / --nodes): LayerLink on the first `stages` nodes,
    llama.cpp on the RPC servers those nodes run (`cluster-node up --llama-rpc`)."""
    records = await discover(args)
    records = sorted(records, key=lambda r: (r.name, r.node_id))
    if len(records) < settings.stages:
        raise UserError(
            f"{settings.stages} stages need {settings.stages} nodes, found {len(records)}"
        )
    records = records[: settings.stages]
    nodes = [bench.NodeRef(r.name, r.address, r.node_id) for r in records]
    notes: list[str] = []
    endpoints: list[str] = []
    gguf: Path | None = None
    systems = settings.systems
    if bench.SYSTEM_LLAMA in systems:
        reason = bench.baseline_unavailable()
        missing = [r.name for r in records if not r.llama_rpc_port]
        if args.rpc and len(args.rpc) != settings.stages:
            raise UserError(f"--rpc must be given {settings.stages} times (once per stage)")
        if args.rpc:
            missing = []
        if not reason and missing:
            reason = (
                f"node(s) {', '.join(missing)} serve no llama.cpp RPC: start them with "
                "`cluster-node up --llama-rpc`"
            )
        if reason:
            notes.append(reason)
            systems = tuple(s for s in systems if s != bench.SYSTEM_LLAMA)
        else:
            endpoints = list(args.rpc) or [f"{r.host}:{r.llama_rpc_port}" for r in records]
    machine = bench.machine_info()
    with bench.scratch_dir() as tmp:
        if bench.SYSTEM_LLAMA in systems:
            gguf = bench.gguf_for(model.path, Path(tmp))
        run_settings = bench.BenchSettings(**{**settings.__dict__, "systems": systems})
        runners = bench.bench_runners(
            run_settings, model, model.name, nodes, endpoints, gguf, deployment="cluster",
            on_event=_progress(args),
        )  # fmt: skip
        results = await bench.measure(runners, settings.repeats, _progress(args),
                                      settings.sample_timeout_s)  # fmt: skip
    if bench.SYSTEM_LLAMA in settings.systems and bench.SYSTEM_LLAMA not in systems:
        results += bench.unavailable_runs(settings, model.name, model.num_layers, notes[-1])
    return bench.bench_report(settings, model, results, machine, notes)


async def bench_locally(
    settings: bench.BenchSettings, model: ModelInfo, args: argparse.Namespace
) -> dict[str, Any]:
    """Measure with nodes and RPC servers this command starts on 127.0.0.1."""
    notes: list[str] = []
    systems = settings.systems
    if bench.SYSTEM_LLAMA in systems:
        reason = bench.baseline_unavailable()
        if reason:
            notes.append(reason)
            systems = tuple(s for s in systems if s != bench.SYSTEM_LLAMA)
    machine = bench.machine_info()
    k = settings.stages
    with bench.scratch_dir() as tmp:
        gguf = bench.gguf_for(model.path, Path(tmp)) if bench.SYSTEM_LLAMA in systems else None
        n_nodes = k if bench.SYSTEM_LAYERLINK in systems else 0
        n_rpc = k if bench.SYSTEM_LLAMA in systems else 0
        try:
            with bench.local_workers(n_nodes, n_rpc, Path(tmp) / "logs", settings.rpc_threads) as (
                nodes,
                endpoints,
            ):
                run_settings = bench.BenchSettings(**{**settings.__dict__, "systems": systems})
                runners = bench.bench_runners(
                    run_settings, model, model.name, nodes, endpoints, gguf,
                    on_event=_progress(args),
                )  # fmt: skip
                results = await bench.measure(runners, settings.repeats, _progress(args),
                                              settings.sample_timeout_s)  # fmt: skip
        except (bench.BenchError, RuntimeError) as e:
            raise UserError(f"could not start the local workers: {e}") from None
    if bench.SYSTEM_LLAMA in settings.systems and bench.SYSTEM_LLAMA not in systems:
        results += bench.unavailable_runs(settings, model.name, model.num_layers, notes[-1])
    return bench.bench_report(settings, model, results, machine, notes)


def _progress(args: argparse.Namespace) -> bench.Events:
    def say(message: str) -> None:
        log.info("%s", message)

    return say


def run_bench(args: argparse.Namespace) -> int:
    try:
        model = read_model(args.model)
    except SessionError as e:
        raise UserError(str(e)) from None
    settings = settings_from(args, model)
    if args.rpc and not (args.node or args.nodes):
        raise UserError("--rpc names the servers of a real cluster: give --node or --nodes too")
    if args.node or args.nodes:
        report = asyncio.run(bench_on_cluster(args, settings, model))
    else:
        report = asyncio.run(bench_locally(settings, model, args))
    if args.json:
        console.print_json(report)
    else:
        show_runs(
            f"{model.name}: {settings.stages} stage(s), {settings.repeats} repeats", report["runs"]
        )
        for note in report["notes"]:
            console.info(f"note: {note}")
        show_machine(report["machine"])
    return 1 if any(r["error"] for r in report["runs"]) else 0


# ----- presentation --------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


SHORT_SYSTEM = {bench.SYSTEM_LAYERLINK: "LayerLink", bench.SYSTEM_LLAMA: "llama.cpp",
                bench.SYSTEM_MLX_LM: "mlx_lm"}  # fmt: skip


def show_runs(title: str, runs: list[dict[str, Any]], with_model: bool = False) -> None:
    """One row per configuration; errors printed in full below the table."""
    rows = []
    errors = []
    for r in runs:
        ttft = r["ttft_s"]
        lo, hi = r["decode_tps_min"], r["decode_tps_max"]
        row = [
            SHORT_SYSTEM.get(r["system"], r["system"]),
            r["deployment"],
            "+".join(str(c) for c in r["layers"]),
            _fmt(r["decode_tps"], ".1f") if not r["error"] else "error",
            f"{lo:.0f}-{hi:.0f}" if lo is not None else "-",
            _fmt(r["ms_per_token"], ".2f"),
            _fmt(ttft * 1e3 if ttft is not None else None, ".1f"),
            _fmt(r["per_hop_ms"], ".3f"),
        ]
        rows.append([r.get("model", ""), *row] if with_model else row)
        if r["error"]:
            errors.append(f"{r['system']} {r['deployment']} {r['stages']} stage(s): {r['error']}")
    columns = ["system", "where", "layers", "tok/s", "range", "ms/tok", "TTFT ms", "hop ms"]
    console.table(title, ["model", *columns] if with_model else columns, rows)
    for e in errors:
        console.error(e)


def show_machine(machine: dict[str, Any]) -> None:
    console.text(
        f"machine: {machine.get('cpu')} ({machine.get('logical_cpus')} logical CPUs), "
        f"{machine.get('platform')}; load {machine.get('loadavg_start')} -> "
        f"{machine.get('loadavg_end')}; mlx {machine.get('mlx')}, "
        f"llama-cpp-python {machine.get('llama_cpp_python')}"
    )


# ----- bench-suite ---------------------------------------------------------------------------


def _int_list(raw: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{what} must be comma-separated integers, got {raw!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{what} must list positive integers")
    return values


def run_suite(args: argparse.Namespace) -> int:
    from coordinator.lab.synth import PRESETS

    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    known = [*sorted(PRESETS), bench.REAL_MODEL]
    unknown = [m for m in models if m not in known]
    if not models or unknown:
        raise UserError(f"--models must name models among {known}, got {args.models!r}")
    stage_counts = _int_list(args.stages, "--stages")
    if 1 not in stage_counts:
        stage_counts = (1, *stage_counts)  # the per-hop reference
    if args.repeats < 1 or args.gen_tokens < 2 or args.prompt_tokens < 1:
        raise UserError("--repeats >= 1, --gen-tokens >= 2 and --prompt-tokens >= 1, please")
    settings = bench.SuiteSettings(
        models=models,
        stage_counts=tuple(sorted(set(stage_counts))),
        prompt_tokens=args.prompt_tokens,
        gen_tokens=args.gen_tokens,
        repeats=args.repeats,
        llama=not args.no_llama,
        threads=args.threads,
        rpc_threads=args.rpc_threads,
        model_root=args.model_root,
    )
    with bench.scratch_dir() as tmp:
        try:
            result = asyncio.run(bench.run_suite(settings, Path(tmp), _progress(args)))
        except (bench.BenchError, RuntimeError) as e:
            raise UserError(str(e)) from None
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        console.print_json(result)
    else:
        show_suite(result)
        if args.out is not None:
            console.info(f"wrote {args.out}")
    return 1 if any(r["error"] for r in result["runs"]) else 0


def show_suite(result: dict[str, Any]) -> None:
    s = result["settings"]
    show_runs(
        f"bench-suite: {s['gen_tokens']} tokens after a {s['prompt_tokens']}-token prompt, "
        f"median of {s['repeats']} interleaved repeats",
        result["runs"],
        with_model=True,
    )
    raw = result["raw_socket"]
    console.text(
        f"raw TCP socket round trip ({raw['message_bytes']} B ping-pong, two processes, "
        f"loopback): median {result['raw_socket_rtt_us']:.0f} us of "
        + ", ".join(f"{x:.0f}" for x in raw["measurements_us"])
    )
    checks = result["checks"]
    if checks:
        console.table(
            "acceptance ratios (this run)",
            ["check", "value", "target", "met", "detail"],
            [
                [
                    c["name"],
                    _fmt(c["value"], ".3f"),
                    c["target"],
                    {True: "yes", False: "NO", None: "-"}[c["met"]],
                    c["detail"],
                ]  # fmt: skip
                for c in checks
            ],
        )
    for note in result["notes"]:
        console.info(f"note: {note}")
    show_machine(result["machine"])
