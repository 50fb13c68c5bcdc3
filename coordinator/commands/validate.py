"""`coordinator validate-planner`: predicted against measured decode time and TTFT over many
plans on this machine's clusters (coordinator/lab/validation.py); `--calibrate` refits the live
constants in coordinator/data/calibration.csv first; `--quick` checks the committed constants on
a few plans in a couple of minutes (exit 1 when the median decode error is over 25%)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from coordinator import console
from coordinator.errors import UserError
from coordinator.lab.bench import BenchError
from coordinator.lab.validation import (
    ACCEPT_MEDIAN,
    ACCEPT_QUICK_MEDIAN,
    ACCEPT_WORST,
    DEFAULT_DOCS,
    DEFAULT_JSON,
    ValidationResult,
    ValidationSettings,
    run_validation,
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "validate-planner",
        help="run many plans on local clusters and compare the cost model's predictions",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="first fit the live constants from calibration plans (other models) and write "
        "them to coordinator/data/calibration.csv",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few held-out plans (the tiny model on loopback nodes, 5 repeats of 32 tokens) "
        "with the committed constants; exit 1 when the median decode error is over "
        f"{ACCEPT_QUICK_MEDIAN * 100:.0f}%% (writes no report unless --out/--docs name one)",
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=None,
        metavar="NAME",
        help="validation models (default: tiny small)",
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="interleaved repeats (default: 5, quick too)"
    )
    p.add_argument(
        "--prompt-tokens", type=int, default=None, help="prompt length (default: 32; quick: 16)"
    )
    p.add_argument(
        "--gen-tokens", type=int, default=None, help="tokens per run (default: 64; quick: 32)"
    )
    p.add_argument(
        "--no-netns", action="store_true", help="skip the namespace-LAN plans (they need root)"
    )
    p.add_argument(
        "--fit-clusters",
        nargs="+",
        default=None,
        metavar="CLUSTER",
        help="with --calibrate: the clusters whose calibration plans the constants are fitted "
        "on, loopback and/or lan (default: loopback; every validation plan is held out)",
    )
    p.add_argument(
        "--model-root", type=Path, default=None, help="where the synthetic models are kept"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"JSON report (default: {DEFAULT_JSON.relative_to(DEFAULT_JSON.parents[2])}; "
        "quick: none)",
    )
    p.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="markdown file whose generated section gets the table (default: docs/planning.md; "
        "quick: none)",
    )
    p.add_argument("--no-docs", action="store_true", help="do not touch the docs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    given = {
        "calibrate": args.calibrate,
        "models": None if args.models is None else tuple(args.models),
        "repeats": args.repeats,
        "prompt_tokens": args.prompt_tokens,
        "gen_tokens": args.gen_tokens,
        "model_root": args.model_root,
        "fit_clusters": None if args.fit_clusters is None else tuple(args.fit_clusters),
        "command": "coordinator " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if sys.argv[1:2] == ["validate-planner"]
        else "coordinator validate-planner" + (" --quick" if args.quick else ""),
    }
    if args.no_netns:
        given["netns"] = False
    if args.quick:
        given["out_json"] = args.out
        given["docs"] = None if args.no_docs else args.docs
    else:
        given["out_json"] = args.out or DEFAULT_JSON
        given["docs"] = None if args.no_docs else args.docs or DEFAULT_DOCS
    chosen = {k: v for k, v in given.items() if v is not None or k in ("out_json", "docs")}
    settings = (
        ValidationSettings.quick_check(**chosen) if args.quick else ValidationSettings(**chosen)
    )
    try:
        settings.check()
        result = run_validation(settings, on_event=console.info)
    except (ValueError, BenchError) as e:
        raise UserError(str(e)) from None
    show(result)
    if any(not r.run.ok for r in result.rows):
        return 1
    return 1 if settings.quick and not result.quick_met else 0


def show(result: ValidationResult) -> None:
    if result.fit is not None:
        console.info(f"calibration: {result.fit.summary()}")
    console.info(f"constants: {result.calibration.describe()}")
    console.table(
        "predicted vs measured",
        ["model", "cluster", "plan", "pred ms/tok", "meas ms/tok", "err", "pred TTFT", "meas TTFT", "err"],
        [
            [
                r.case.model,
                r.case.condition,
                r.plan,
                _f(r.predicted_ms),
                _f(r.measured_ms) if r.run.ok else f"failed: {r.run.error[:60]}",
                _p(r.decode_error),
                _f(r.predicted_ttft_ms, 1),
                _f(r.measured_ttft_ms, 1),
                _p(r.ttft_error),
            ]
            for r in result.rows
        ],
    )  # fmt: skip
    d = result.decode
    verdict = {True: "met", False: "NOT met", None: "not judged (no plan measured)"}[result.met]
    target = (
        f"median <= {ACCEPT_QUICK_MEDIAN:.0%}"
        if result.settings.quick
        else f"median <= {ACCEPT_MEDIAN:.0%}, worst <= {ACCEPT_WORST:.0%}"
    )
    console.text(
        f"held out: decode time per token median |error| {_p(d.median_abs, sign=False)}, worst "
        f"{_p(d.worst_abs, sign=False)} ({d.worst_label}) over {d.n} plans; target {target}: "
        f"{verdict}"
    )
    fs = result.decode_fit_set
    if result.fit is not None:
        console.text(
            f"fit set (calibration plans, in sample): median |error| "
            f"{_p(fs.median_abs, sign=False)}, worst {_p(fs.worst_abs, sign=False)} over "
            f"{fs.n} plans"
        )
    else:
        console.text("constants from calibration.csv: every plan above is held out")
    m = result.machine
    console.text(
        f"load average {(m.get('loadavg_start') or ['?'])[0]} -> "
        f"{(m.get('loadavg_end') or ['?'])[0]}, {m.get('duration_s', '?')} s; "
        f"{m.get('cpu_placement', '?')}"
    )
    f = result.decode_first_probe
    console.text(
        f"from the first probe's device figures alone: median |error| "
        f"{_p(f.median_abs, sign=False)}, worst {_p(f.worst_abs, sign=False)}"
    )
    t = result.ttft
    console.text(
        f"TTFT: median |error| {_p(t.median_abs, sign=False)}, worst {_p(t.worst_abs, sign=False)}"
    )
    for note in result.notes:
        console.info(f"note: {note}")


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _p(x: float | None, sign: bool = True) -> str:
    if x is None:
        return "-"
    return f"{x * 100:+.1f}%" if sign else f"{x * 100:.1f}%"
