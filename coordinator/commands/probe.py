"""`coordinator probe`: measure the cluster's links and devices and show them.

Output: a device table and a link matrix (latency and bandwidth; the slowest links
highlighted), or with --json one object that validates against
coordinator/schemas/probe.schema.json. docs/measurements.md explains every figure.
"""

from __future__ import annotations

import argparse
import asyncio

from coordinator import console
from coordinator.commands._common import add_discovery_args, discover
from coordinator.errors import UserError
from coordinator.probe import DeviceFigures, ProbeResult, probe_cluster
from node.devicebench import DTYPES


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("probe", help="measure the links between nodes and each node's devices")
    add_discovery_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--dtype",
        action="append",
        default=[],
        choices=DTYPES,
        help="dtype to time weight streaming in (repeatable; default: float16 and q4)",
    )
    p.add_argument(
        "--buffer-mib",
        type=int,
        default=0,
        metavar="MIB",
        help="size of the streamed weight buffer (default: 256, larger than the caches)",
    )
    p.add_argument("--no-devices", action="store_true", help="measure the links only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.buffer_mib < 0:
        raise UserError("--buffer-mib must be >= 0")
    records = asyncio.run(discover(args))
    if len(records) < 2 and not args.json:
        console.info("one node: there are no links to measure")
    progress = None if args.json else console.info
    result = asyncio.run(
        probe_cluster(
            records,
            dtypes=args.dtype,
            buffer_bytes=args.buffer_mib << 20,
            devices=not args.no_devices,
            on_progress=progress,
        )
    )
    if args.json:
        console.print_json(result.to_json())
    else:
        show(result)
    for e in result.errors:
        console.error(e)
    return 1 if result.errors else 0


def _rate(gbs: float) -> str:
    if gbs <= 0.0:
        return "-"
    return f"{gbs:.2f} GB/s" if gbs >= 1.0 else f"{gbs * 1e3:.1f} MB/s"


def _bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _pcie(d: DeviceFigures) -> str:
    if d.unified_memory:
        return "unified memory"
    p = d.pcie
    if p is None:
        return "-"
    text = f"gen{p.gen} x{p.width} (max gen{p.max_gen} x{p.max_width}), {_rate(p.theoretical_gbs)}"
    if p.h2d_gbs or p.d2h_gbs:
        text += f"; h2d {_rate(p.h2d_gbs)}, d2h {_rate(p.d2h_gbs)}"
    return text


def show(result: ProbeResult) -> None:
    rows = []
    notes = []
    dtypes = list(dict.fromkeys(dt for n in result.nodes for d in n.devices
                                for dt, _ in d.stream_by_dtype))  # fmt: skip
    for n in result.nodes:
        for d in n.devices:
            by_dtype = dict(d.stream_by_dtype)
            rows.append([
                n.name, f"{d.index}: {d.name}", d.kind,
                f"{_bytes(d.mem_free_bytes)} / {_bytes(d.mem_total_bytes)}",
                *(_rate(by_dtype.get(dt, 0.0)) for dt in dtypes),
                f"{d.matmul_tflops:.3g}" if d.matmul_tflops else "-", _pcie(d),
                _rate(n.host_copy_gbs),
            ])  # fmt: skip
            if d.note:
                notes.append(f"{n.name} device {d.index}: {d.note}")
        if n.nvml_status:
            notes.append(f"{n.name}: {n.nvml_status}")
    console.table(
        "devices (weight streaming per dtype)",
        ["node", "device", "kind", "free / total", *dtypes, "TFLOPS", "PCIe", "host copy"],
        rows,
    )
    for line in notes:
        console.text(f"  {line}")
    slow = {(x.src, x.dst) for x in result.slowest_links()}
    header = ["from \\ to", *(n.name for n in result.nodes)]
    matrix = []
    for src in result.nodes:
        row = [src.name]
        for dst in result.nodes:
            link = result.link(src.node_id, dst.node_id)
            if src.node_id == dst.node_id:
                row.append("")
            elif link is None:
                row.append("not measured")
            else:
                cell = f"{link.latency_us:.0f} us, {_rate(link.bandwidth_gbs)}"
                if link.same_host:
                    cell += " (same host)"
                if (link.src, link.dst) in slow:
                    cell = f"[bold red]{cell}[/]"
                row.append(cell)
        matrix.append(row)
    console.table("links: one-way latency, bandwidth (slowest in red)", header, matrix)
    worst = result.slowest_link()
    if worst is not None:
        console.text(
            f"slowest link: {worst.src_name} -> {worst.dst_name} at "
            f"{_rate(worst.bandwidth_gbs)}, {worst.latency_us:.0f} us "
            f"(probe took {result.seconds:.1f}s)"
        )
