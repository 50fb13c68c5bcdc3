"""The link fit: recovers known lines, shrugs off outliers, reports misfit, and refuses
what it cannot fit."""

from __future__ import annotations

import math
import random

import pytest

from node.linkfit import Sample, fit_affine, fit_link
from node.linkprobe import DEFAULT_SIZES


def sweep(latency_us: float, gbs: float, noise: float = 0.0, seed: int = 0) -> list[Sample]:
    """Round trips of a link with one-way latency_us and bandwidth gbs (small replies)."""
    rng = random.Random(seed)
    out = []
    for n in DEFAULT_SIZES:
        rtt = 2 * latency_us + n / (gbs * 1e3)
        out.append(Sample(n, rtt * (1.0 + rng.uniform(-noise, noise))))
    return out


@pytest.mark.parametrize(("latency_us", "gbs"), [(150.0, 0.0125), (50.0, 1.1), (900.0, 0.117)])
def test_exact_line_is_recovered(latency_us: float, gbs: float) -> None:
    fit = fit_link(sweep(latency_us, gbs))
    assert fit.resolved
    assert fit.latency_us == pytest.approx(latency_us, rel=1e-6)
    assert fit.bandwidth_gbs == pytest.approx(gbs, rel=1e-6)
    assert fit.residual < 1e-9
    assert fit.rtt_us(1 << 20) == pytest.approx(2 * latency_us + (1 << 20) / (gbs * 1e3))


def test_noise_gives_a_residual_of_its_size() -> None:
    fit = fit_link(sweep(200.0, 0.5, noise=0.05, seed=3))
    assert fit.bandwidth_gbs == pytest.approx(0.5, rel=0.08)
    assert fit.latency_us == pytest.approx(200.0, rel=0.08)
    assert 0.005 < fit.residual < 0.06


def test_one_outlier_does_not_bend_the_fit() -> None:
    samples = sweep(150.0, 0.1)
    # A retransmit or a scheduler stall makes one mid-size round trip 4x too long.
    samples[5] = Sample(samples[5].payload_bytes, samples[5].rtt_us * 4)
    fit = fit_link(samples)
    assert fit.bandwidth_gbs == pytest.approx(0.1, rel=0.02)
    assert fit.latency_us == pytest.approx(150.0, rel=0.05)
    # The misfit is still reported: one point off by 3/4 of its value among 8.
    assert fit.residual == pytest.approx(math.sqrt(0.75**2 / 8), rel=1e-3)


def test_small_sizes_decide_the_latency_not_the_large_ones() -> None:
    # Ordinary least squares would let the 16 MiB point swamp the intercept.
    fit = fit_link(sweep(30.0, 0.0125, noise=0.01, seed=1))
    assert fit.latency_us == pytest.approx(30.0, rel=0.05)


def test_flat_sweep_is_unresolved_and_reports_a_lower_bound() -> None:
    samples = [Sample(n, 300.0 + (1.0 if i % 2 else -1.0)) for i, n in enumerate((64, 512, 4096))]
    fit = fit_link(samples)
    assert not fit.resolved
    assert fit.bandwidth_gbs == pytest.approx(4096 / 301.0 * 1e-3, rel=0.01)
    assert fit.latency_us == pytest.approx(150.0, rel=0.02)


def test_intercept_stays_physical() -> None:
    # Points whose straight line would cross zero below the smallest size.
    fit = fit_affine([(1000.0, 1.0), (2000.0, 3.0), (4000.0, 7.0)])
    assert fit.intercept >= 0.0
    assert fit.slope > 0.0
    assert math.isfinite(fit.residual)


@pytest.mark.parametrize(
    "samples", [[], [Sample(64, 100.0)], [Sample(64, 100.0), Sample(64, 120.0)]]
)
def test_refuses_fewer_than_two_sizes(samples: list[Sample]) -> None:
    with pytest.raises(ValueError, match="two or more"):
        fit_link(samples)
