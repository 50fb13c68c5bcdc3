"""Fit a link's one-way latency and bandwidth from a ping-pong sweep. Pure: no I/O.

The sweep sends a payload of n bytes and gets a *small* reply (a few bytes) back, so a round
trip is

    rtt(n) = [latency + n / bandwidth]  +  [latency + small / bandwidth]
           ~ 2 * latency + n / bandwidth

(the reply's transfer time is a constant absorbed in the intercept, and negligible). Fitting
the straight line rtt(n) = a + b * n therefore gives the one-way model the cost model uses,

    one_way(n) = latency + n / bandwidth,   latency = a / 2,   bandwidth = 1 / b,

and the bandwidth is that of the direction the payload travels (source -> target), which is
the direction activations travel on that hop. Echoing the whole payload back would instead
average the two directions and halve the sweep's reach for the same time.

The samples span five orders of magnitude in size and in time, so an ordinary least-squares
fit would let the largest payloads decide everything and the latency would be noise. The
fit minimises *relative* error (weights 1 / rtt^2) and is made robust by iteratively
reweighting with Tukey's biweight on the relative residuals, so one sample disturbed by a
scheduler hiccup or a retransmit does not bend the line. The reported residual is the
relative RMS of the final fit over all samples (unweighted by robustness): a figure above a
few percent says the link is not well described by latency + bytes / bandwidth (a shaper
with a large burst, a congested path, CPU contention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Tukey biweight tuning constant, in units of the robust scale (MAD * 1.4826).
_TUKEY_C = 4.685
_MAX_ITERATIONS = 20


@dataclass(frozen=True)
class Sample:
    """One point of the sweep: payload size and the median round trip over its repeats."""

    payload_bytes: int
    rtt_us: float


@dataclass(frozen=True)
class LinkFit:
    """one_way_us(n) = latency_us + n / (bandwidth_gbs * 1e3); see module docstring.

    When the sweep cannot resolve a size dependence (the largest payload's round trip is
    within noise of the smallest one's), `resolved` is False and bandwidth_gbs is a lower
    bound: the largest payload over its whole round trip. The link is at least that fast.
    """

    latency_us: float
    bandwidth_gbs: float
    residual: float
    resolved: bool

    def one_way_us(self, payload_bytes: int) -> float:
        if self.bandwidth_gbs <= 0.0:
            return self.latency_us
        return self.latency_us + payload_bytes / (self.bandwidth_gbs * 1e3)

    def rtt_us(self, payload_bytes: int) -> float:
        """Round trip of a payload with a negligible reply, as the sweep measured it."""
        return self.latency_us + self.one_way_us(payload_bytes)


def _weighted_line(
    xs: Sequence[float], ys: Sequence[float], ws: Sequence[float]
) -> tuple[float, float]:
    """Weighted least squares y = a + b x; returns (a, b)."""
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    my = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
    if sxx == 0.0:
        return my, 0.0
    sxy = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True))
    b = sxy / sxx
    return my - b * mx, b


def _weighted_slope_through(
    a: float, xs: Sequence[float], ys: Sequence[float], ws: Sequence[float]
) -> float:
    """Weighted least squares slope of y = a + b x with the intercept a held fixed."""
    den = sum(w * x * x for w, x in zip(ws, xs, strict=True))
    if den == 0.0:
        return 0.0
    return sum(w * x * (y - a) for w, x, y in zip(ws, xs, ys, strict=True)) / den


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median of nothing")
    mid = n // 2
    return s[mid] if n % 2 else 0.5 * (s[mid - 1] + s[mid])


def _constrained_line(
    xs: Sequence[float], ys: Sequence[float], ws: Sequence[float]
) -> tuple[float, float]:
    """Weighted line with a physically meaningful intercept: 0 <= a <= min(y)."""
    a, b = _weighted_line(xs, ys, ws)
    lo, hi = 0.0, min(ys)
    if a < lo or a > hi:
        a = min(max(a, lo), hi)
        b = _weighted_slope_through(a, xs, ys, ws)
    return a, max(b, 0.0)


@dataclass(frozen=True)
class AffineFit:
    """y = intercept + slope * x, fitted by `fit_affine`; residual is the relative RMS."""

    intercept: float
    slope: float
    residual: float
    resolved: bool


def fit_affine(points: Sequence[tuple[float, float]]) -> AffineFit:
    """Robust relative-error fit of y = a + b x with 0 <= a <= min(y) and b >= 0.

    `resolved` is False when the slope does not stand out of the noise: b * max(x) is
    within the fit's residual (or 1%) of the largest modelled y. Needs two distinct x."""
    pts = [(float(x), float(y)) for x, y in points if y > 0.0 and math.isfinite(y)]
    if len({x for x, _ in pts}) < 2:
        raise ValueError("an affine fit needs positive values at two or more distinct x")
    xs = [x for x, _ in pts]
    ys = [y for _, y in pts]
    base = [1.0 / (y * y) for y in ys]  # relative error: each sample counts by its ratio
    a, b = _constrained_line(xs, ys, base)
    for _ in range(_MAX_ITERATIONS):
        rel = [(y - (a + b * x)) / y for x, y in zip(xs, ys, strict=True)]
        scale = 1.4826 * _median([abs(r) for r in rel])
        if scale < 1e-9:
            break
        robust = []
        for r in rel:
            u = r / (_TUKEY_C * scale)
            robust.append((1.0 - u * u) ** 2 if abs(u) < 1.0 else 0.0)
        if len({x for x, w in zip(xs, robust, strict=True) if w > 0.0}) < 2:
            break
        ws = [bw * rw for bw, rw in zip(base, robust, strict=True)]
        a2, b2 = _constrained_line(xs, ys, ws)
        converged = abs(a2 - a) <= 1e-9 * max(1.0, abs(a)) and abs(b2 - b) <= 1e-12 * max(
            1.0, abs(b)
        )
        a, b = a2, b2
        if converged:
            break
    residual = math.sqrt(
        sum(((y - (a + b * x)) / y) ** 2 for x, y in zip(xs, ys, strict=True)) / len(xs)
    )
    top = max(xs)
    resolved = b > 0.0 and b * top > max(residual, 0.01) * (a + b * top)
    return AffineFit(intercept=a, slope=b, residual=residual, resolved=resolved)


def fit_link(samples: Sequence[Sample]) -> LinkFit:
    """Fit rtt = 2 * latency + bytes / bandwidth to a sweep (see the module docstring).

    Needs at least two distinct payload sizes with positive round trips."""
    fit = fit_affine([(s.payload_bytes, s.rtt_us) for s in samples])
    if fit.resolved:
        # slope is us per byte: 1 / slope bytes per us = 1e-3 / slope GB/s.
        bandwidth_gbs = 1e-3 / fit.slope
    else:
        top = max((s for s in samples if s.rtt_us > 0.0), key=lambda s: s.payload_bytes)
        bandwidth_gbs = 1e-3 * top.payload_bytes / top.rtt_us
    return LinkFit(
        latency_us=fit.intercept / 2.0,
        bandwidth_gbs=bandwidth_gbs,
        residual=fit.residual,
        resolved=fit.resolved,
    )
