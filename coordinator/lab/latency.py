"""The split-penalty experiment's latency rows, read: per-hop cost against the emulated round
trip for each system (a least-squares slope), where the two systems' decode curves cross, the
emulator's own cost (the relay at 0 ms against the direct link), the cost model's error on
LayerLink's rows, a paragraph saying all that in words, and the chart.

Everything here works on results.json rows (coordinator/lab/experiment.py `row_json`): a
latency row is a row with a `one_way_ms` (the wire relays' one-way delay; 0 for the relay
alone), `link_gbit_s` None for the unshaped links and a rate for the shaped ones.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator.lab.bench import SYSTEM_LAYERLINK, SYSTEM_LLAMA

NAMES = {SYSTEM_LAYERLINK: "LayerLink", SYSTEM_LLAMA: "llama.cpp RPC"}
COLORS = {SYSTEM_LAYERLINK: "tab:blue", SYSTEM_LLAMA: "tab:orange"}
PREDICTION_TARGET = 0.15  # median relative error of LayerLink's predicted tok/s


def _ok(r: dict[str, Any]) -> bool:
    return not r.get("error") and r.get("decode_tps") is not None


def points(
    rows: Sequence[dict[str, Any]], system: str, rate: float | None = None
) -> list[dict[str, Any]]:
    """The system's split (k-stage) latency rows at one link rate (None: unshaped), by
    increasing one-way delay."""
    out = [
        r
        for r in rows
        if r["system"] == system
        and r.get("one_way_ms") is not None
        and r["stages"] > 1
        and r.get("link_gbit_s") == rate
        and _ok(r)
    ]
    return sorted(out, key=lambda r: float(r["one_way_ms"]))


def rates(rows: Sequence[dict[str, Any]]) -> list[float | None]:
    """The link rates the latency rows were measured at (None first: unshaped)."""
    found = {r.get("link_gbit_s") for r in rows if r.get("one_way_ms") is not None}
    return sorted(found, key=lambda x: -1.0 if x is None else float(x))


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float] | None:
    """Least-squares (intercept, slope); None with fewer than two distinct xs."""
    if len(xs) < 2 or len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - slope * mx, slope


def slope_stderr(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """The least-squares slope's standard error; None with fewer than three points."""
    line = fit_line(xs, ys)
    if line is None or len(xs) < 3:
        return None
    a, b = line
    mx = statistics.fmean(xs)
    sxx = sum((x - mx) ** 2 for x in xs)
    ssr = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return math.sqrt(ssr / (len(xs) - 2) / sxx)


def _curve_rate(rows: Sequence[dict[str, Any]]) -> float | None:
    """The rate whose latency rows make the main curve: unshaped when it has two delays."""
    for rate in rates(rows):
        if all(len(points(rows, s, rate)) >= 2 for s in _systems(rows)):
            return rate
    found = rates(rows)
    return found[0] if found else None


def _systems(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [s for s in NAMES if any(r["system"] == s and r.get("one_way_ms") is not None
                                    for r in rows)]  # fmt: skip


def _rtt(r: dict[str, Any]) -> float:
    return 2.0 * float(r["one_way_ms"])


def slopes(rows: Sequence[dict[str, Any]], rate: float | None) -> dict[str, dict[str, Any]]:
    """Per system: per-hop ms and ms/token against the emulated RTT (2 x one-way), as
    least-squares lines over the latency rows at `rate`."""
    out: dict[str, dict[str, Any]] = {}
    for system in _systems(rows):
        pts = points(rows, system, rate)
        hop = [(_rtt(r), float(r["per_hop_ms"])) for r in pts if r.get("per_hop_ms") is not None]
        tok = [(_rtt(r), float(r["ms_per_token"])) for r in pts]
        hop_fit = fit_line([x for x, _ in hop], [y for _, y in hop])
        tok_fit = fit_line([x for x, _ in tok], [y for _, y in tok])
        out[system] = {
            "points": len(pts),
            "per_hop_ms_per_ms_rtt": _round(hop_fit[1] if hop_fit else None),
            "per_hop_ms_per_ms_rtt_stderr": _round(
                slope_stderr([x for x, _ in hop], [y for _, y in hop])
            ),
            "per_hop_ms_at_0": _round(hop_fit[0] if hop_fit else None),
            "ms_per_token_per_ms_rtt": _round(tok_fit[1] if tok_fit else None),
            "ms_per_token_per_ms_rtt_stderr": _round(
                slope_stderr([x for x, _ in tok], [y for _, y in tok])
            ),
            "ms_per_token_at_0": _round(tok_fit[0] if tok_fit else None),
        }
    return out


def crossing(rows: Sequence[dict[str, Any]], rate: float | None,
             fits: dict[str, dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """Where LayerLink's and llama.cpp RPC's decode tokens/s cross along the latency rows:
    between two measured delays (interpolated in RTT), else where their ms/token lines meet
    (extrapolated), else nowhere at a positive RTT."""
    # ms/token, which grows linearly with the delay, interpolates better than tokens/s.
    ll = {
        float(r["one_way_ms"]): float(r["ms_per_token"])
        for r in points(rows, SYSTEM_LAYERLINK, rate)
    }
    lc = {
        float(r["one_way_ms"]): float(r["ms_per_token"]) for r in points(rows, SYSTEM_LLAMA, rate)
    }
    both = sorted(set(ll) & set(lc))
    if not both:
        return {"kind": "none", "rtt_ms": None, "faster_at_low_latency": None}
    diff = [(d, lc[d] - ll[d]) for d in both]  # > 0: LayerLink is faster
    faster = SYSTEM_LAYERLINK if diff[0][1] > 0 else SYSTEM_LLAMA
    for (d0, y0), (d1, y1) in zip(diff, diff[1:], strict=False):
        if (y0 > 0) != (y1 > 0):
            t = y0 / (y0 - y1)
            rtt = 2.0 * (d0 + t * (d1 - d0))
            return {"kind": "measured", "rtt_ms": round(rtt, 3), "faster_at_low_latency": faster}
    a, b = fits.get(SYSTEM_LAYERLINK, {}), fits.get(SYSTEM_LLAMA, {})
    sa, sb = a.get("ms_per_token_per_ms_rtt"), b.get("ms_per_token_per_ms_rtt")
    ia, ib = a.get("ms_per_token_at_0"), b.get("ms_per_token_at_0")
    if sa is not None and sb is not None and ia is not None and ib is not None and sa != sb:
        rtt = (ib - ia) / (sa - sb)
        if rtt > 2.0 * both[-1]:
            return {"kind": "extrapolated", "rtt_ms": round(rtt, 3),
                    "faster_at_low_latency": faster}  # fmt: skip
    return {"kind": "none", "rtt_ms": None, "faster_at_low_latency": faster}


def overhead(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The emulator's own cost: the relay adding 0 ms against the direct (unshaped) link, per
    system (ms/token and per-hop ms) and on the probe (one-way latency, us)."""
    out: dict[str, Any] = {}
    for system in _systems(rows):
        relay = next((r for r in rows if r["system"] == system and r.get("one_way_ms") == 0.0
                      and r.get("link_gbit_s") is None and r["stages"] > 1 and _ok(r)), None)  # fmt: skip
        direct = next((r for r in rows if r["system"] == system and r["condition"] == "LAN"
                       and r["stages"] > 1 and _ok(r)), None)  # fmt: skip
        if relay is None or direct is None:
            continue
        hop = (
            relay["per_hop_ms"] - direct["per_hop_ms"]
            if relay.get("per_hop_ms") is not None and direct.get("per_hop_ms") is not None
            else None
        )
        out[system] = {
            "ms_per_token": _round(relay["ms_per_token"] - direct["ms_per_token"]),
            "per_hop_ms": _round(hop),
        }
        lat_r, lat_d = relay.get("probe_latency_us"), direct.get("probe_latency_us")
        if lat_r is not None and lat_d is not None:
            out["probe_latency_us"] = round(lat_r - lat_d, 1)
    return out


def prediction(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """LayerLink's predicted tok/s against measured on the split latency rows (all rates)."""
    errs = [
        abs(float(r["prediction_error"]))
        for r in rows
        if r["system"] == SYSTEM_LAYERLINK
        and r.get("one_way_ms") is not None
        and r["stages"] > 1
        and r.get("prediction_error") is not None
    ]
    median = statistics.median(errs) if errs else None
    return {
        "rows": len(errs),
        "median_abs_error": _round(median, 4),
        "worst_abs_error": _round(max(errs) if errs else None, 4),
        "target": PREDICTION_TARGET,
        "met": None if median is None else median <= PREDICTION_TARGET,
    }


def analyse(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Everything the report says about the latency rows (empty figures when there are none)."""
    rate = _curve_rate(rows)
    fits = slopes(rows, rate)
    split = [int(r["stages"]) for r in rows if r.get("one_way_ms") is not None and r["stages"] > 1]
    result: dict[str, Any] = {
        "stages": max(split) if split else None,
        "curve_link_gbit_s": rate,
        "points": {s: len(points(rows, s, rate)) for s in _systems(rows)},
        "slopes": fits,
        "crossing": crossing(rows, rate, fits),
        "overhead": overhead(rows),
        "prediction": prediction(rows),
    }
    result["paragraph"] = paragraph(rows, result)
    return result


def paragraph(rows: Sequence[dict[str, Any]], a: dict[str, Any]) -> str:
    """The latency findings in words, generated from the numbers."""
    if not any(a["points"].values()):
        return ""
    rate = a["curve_link_gbit_s"]
    where = "unshaped links" if rate is None else f"links held to {rate:g} Gbit/s"
    parts = []
    said: list[str] = []
    for system, f in a["slopes"].items():
        slope = f["per_hop_ms_per_ms_rtt"]
        if slope is None:
            continue
        se = f.get("per_hop_ms_per_ms_rtt_stderr")
        pm = f" ± {se:.2f}" if se is not None else ""
        said.append(f"{NAMES[system]} {slope:.2f}{pm} ms per hop per ms of RTT"
                    f" ({f['ms_per_token_per_ms_rtt']:.2f} ms per token)")  # fmt: skip
    if said:
        parts.append(f"On {where}, each millisecond of emulated round trip adds "
                     + " against ".join(said) + ".")  # fmt: skip
    k = a.get("stages") or 0
    ll = a["slopes"].get(SYSTEM_LAYERLINK, {})
    if ll.get("ms_per_token_per_ms_rtt") is not None and k > 1:
        parts.append(
            f"A LayerLink token crosses each of the {k} links of its ring once, one way "
            f"({k - 1} forward hops and the hop back to stage 0): {k / 2:g} ms per token per ms "
            f"of RTT expected, {ll['ms_per_token_per_ms_rtt']:.2f}{_pm(ll, 'ms_per_token')} "
            "measured."
        )
    lc = a["slopes"].get(SYSTEM_LLAMA, {})
    if lc.get("ms_per_token_per_ms_rtt") is not None and k > 1:
        parts.append(
            f"llama.cpp RPC's client reaches each of its {k} servers in about "
            f"{lc['ms_per_token_per_ms_rtt'] / k:.1f} round trips per token "
            f"(its ms/token slope, {lc['ms_per_token_per_ms_rtt']:.2f}"
            f"{_pm(lc, 'ms_per_token')}, / servers)."
        )
    hop_ll, hop_lc = ll.get("per_hop_ms_per_ms_rtt"), lc.get("per_hop_ms_per_ms_rtt")
    if _resolved(ll) and _resolved(lc):
        assert hop_ll is not None and hop_lc is not None
        more, less = (SYSTEM_LLAMA, SYSTEM_LAYERLINK) if hop_lc >= hop_ll else (
            SYSTEM_LAYERLINK, SYSTEM_LLAMA)  # fmt: skip
        ratio = max(hop_lc, hop_ll) / min(hop_lc, hop_ll)
        parts.append(
            f"Per hop, {NAMES[more]} pays {ratio:.1f}x {NAMES[less]}'s cost per ms of RTT."
        )
    for system, f in a["slopes"].items():
        if f["per_hop_ms_per_ms_rtt"] is not None and not _resolved(f):
            parts.append(
                f"{NAMES[system]}'s slope is within two standard errors of zero or below: its "
                "per-hop cost is not resolved from this run's noise."
            )
    c = a["crossing"]
    if c["kind"] == "measured":
        parts.append(
            f"{NAMES[c['faster_at_low_latency']]} decodes faster on the short links; the "
            f"curves cross at about {c['rtt_ms']:.2f} ms RTT "
            f"({c['rtt_ms'] / 2:.2f} ms one-way), within the measured range."
        )
    elif c["kind"] == "extrapolated":
        parts.append(
            f"{NAMES[c['faster_at_low_latency']]} decodes faster at every measured delay; "
            f"the ms/token lines would cross at about {c['rtt_ms']:.1f} ms RTT, beyond the "
            "measured range."
        )
    elif c["faster_at_low_latency"]:
        parts.append(
            f"{NAMES[c['faster_at_low_latency']]} decodes faster at every measured delay and "
            "the lines do not cross at a positive RTT."
        )
    o = a["overhead"]
    if o:
        bits = [f"{NAMES[s]} {o[s]['per_hop_ms']:+.3f} ms per hop" for s in NAMES
                if s in o and o[s]["per_hop_ms"] is not None]  # fmt: skip
        probe = o.get("probe_latency_us")
        text = "The relay itself (0 ms against the direct link) costs "
        if probe is not None:
            text += f"{probe:+.0f} us one-way on the probe, and "
        text += ", ".join(bits) + " in the rows"
        if any(abs(o[s]["per_hop_ms"] or 0.0) > 0.5 for s in NAMES if s in o):
            text += " (a difference of more than 0.5 ms per hop is not the relay's, which adds "
            text += "tens of microseconds per crossing, but this run's noise)"
        parts.append(text + ".")
    p = a["prediction"]
    if p["median_abs_error"] is not None:
        verdict = "within" if p["met"] else "outside"
        parts.append(
            f"The cost model, fed each condition's probe, predicts LayerLink's split rows with "
            f"a median error of {p['median_abs_error'] * 100:.1f}% (worst "
            f"{p['worst_abs_error'] * 100:.1f}%, {p['rows']} rows), {verdict} the "
            f"{p['target'] * 100:.0f}% target."
        )
    return " ".join(parts)


def _pm(f: dict[str, Any], key: str) -> str:
    se = f.get(f"{key}_per_ms_rtt_stderr")
    return f" ± {se:.2f}" if se is not None else ""


def _resolved(f: dict[str, Any]) -> bool:
    """A per-hop slope above zero by more than two standard errors (or with no error
    estimate, above zero)."""
    slope, se = f.get("per_hop_ms_per_ms_rtt"), f.get("per_hop_ms_per_ms_rtt_stderr")
    return slope is not None and slope > 0 and (se is None or slope > 2 * se)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or math.isnan(x) else round(x, digits)


# --------------------------------------------------------------------------------------------
# The chart


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """latency.png: decode tokens/s, per-hop ms and TTFT against the emulated one-way delay
    (log axis), both systems, LayerLink's prediction dashed; shaped rates as dotted lines; the
    relay at 0 ms (off a log axis) as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("decode_tps", "decode tokens/s (median)", 1.0),
        ("per_hop_ms", "per-hop overhead, ms per token", 1.0),
        ("ttft_s", "time to first token, ms", 1e3),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    styles: dict[float | None, Any] = {None: "-"}
    for i, shaped in enumerate(x for x in rates(rows) if x is not None):
        styles[shaped] = (":", "-.", (0, (5, 2)))[i % 3]
    for ax, (key, ylabel, scale) in zip(axes, panels, strict=True):
        for system in _systems(rows):
            name, color = NAMES[system], COLORS[system]
            for rate, ls in styles.items():
                pts = points(rows, system, rate)
                label = name if rate is None else f"{name}, {rate:g} Gbit/s"
                delayed = [r for r in pts if float(r["one_way_ms"]) > 0 and r.get(key) is not None]
                if delayed:
                    ax.plot([float(r["one_way_ms"]) for r in delayed],
                            [float(r[key]) * scale for r in delayed], marker="o",
                            linestyle=ls, color=color, label=label)  # fmt: skip
                zero = [r for r in pts if float(r["one_way_ms"]) == 0 and r.get(key) is not None]
                if zero and rate is None:
                    ax.axhline(float(zero[0][key]) * scale, color=color, linestyle="--",
                               linewidth=0.8, alpha=0.7, label=f"{name}, relay at 0 ms")  # fmt: skip
                if key == "decode_tps" and system == SYSTEM_LAYERLINK:
                    pred = [r for r in delayed if r.get("predicted_tps") is not None]
                    if pred:
                        ax.plot([float(r["one_way_ms"]) for r in pred],
                                [float(r["predicted_tps"]) for r in pred], marker="x",
                                linestyle="--", color=color, alpha=0.6,
                                label=f"{label} predicted")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("emulated one-way delay per link, ms (RTT = 2x)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if key == "decode_tps":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
