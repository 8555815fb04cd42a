"""The dead-band positive variation behind Lemma 3's I(t) (flows/_penalty.py, `_walk`), on
sampled functions whose positive variation is known in closed form.

Here psi is phi itself (drop(a, b) = b - a), so the walk's sum is the positive variation of
the samples, with the dead band and the turn correction."""

from __future__ import annotations

import jax.numpy as jnp
import marginflow  # noqa: F401  (float64)
import numpy as np
import pytest
from marginflow.flows._penalty import Band, _walk


def walk(us, xs, width):
    """The walk's total over samples xs (n, p) at times us, from a band at the first."""
    us, xs = jnp.asarray(us, jnp.float64), jnp.asarray(xs, jnp.float64)
    band = Band.start(us[0], xs[0])
    widths = jnp.full(xs.shape, width, jnp.float64)
    total, _ = _walk(lambda a, b: b - a, xs[1:], us[1:], widths[1:], band)
    return float(total)


def test_a_monotone_run_adds_exactly_its_rise():
    us = np.linspace(0.0, 1.0, 50)
    xs = np.stack([np.expm1(us), us**3], axis=1)  # two coordinates, both increasing
    assert walk(us, xs, 1e-9) == pytest.approx(np.e - 1 + 1.0, rel=1e-14)
    assert walk(us, -xs, 1e-9) == 0.0  # falling: nothing


def test_noise_below_the_width_adds_at_most_its_amplitude_once():
    # A flat phi with noise in [-a, a], width 2.5 a (above the 2a peak-to-peak): a plain
    # positive variation adds about n a / 1.5 per coordinate; the band adds at most the
    # first rise above the start, <= 2a per coordinate (and no turn corrections: no
    # turn is ever confirmed).
    rng = np.random.default_rng(0)
    a = 1e-8
    xs = a * rng.uniform(-1, 1, size=(100, 3))
    us = np.arange(100.0)
    plain = np.sum(np.maximum(np.diff(xs, axis=0), 0.0))
    assert plain > 20 * a
    assert walk(us, xs, 2.5 * a) <= 3 * 2 * a


@pytest.mark.parametrize("n", [10, 20, 40, 80])
def test_turning_points_between_samples_are_corrected_to_third_order(n):
    # phi = sin(u) on [0, 2 pi + 1]: exact positive variation = 1 (0 -> pi/2) + 2 (3pi/2 ->
    # 2pi + 1, from -1 up to sin(1)) ... = 1 + (1 + sin 1). The samples straddle both turns
    # (pi/2 and 3pi/2 are not grid points). The naive sum misses ~h^2/8 per turn; with the
    # turn correction the error is O(h^3) (h = 2pi/n): checked against 2 h^3 per turn.
    u1 = 2 * np.pi + 1.0
    us = np.linspace(0.0, u1, n + 1) + 0.37 * u1 / n * (np.arange(n + 1) % 2)  # uneven
    us[-1] = u1
    xs = np.sin(us)[:, None]
    exact = 1.0 + (1.0 + np.sin(1.0))
    h = np.max(np.diff(us))
    naive = np.sum(np.maximum(np.diff(xs[:, 0]), 0.0))
    got = walk(us, xs, 1e-12)
    assert abs(got - exact) <= 2 * 2 * h**3, (got - exact, naive - exact)
    assert abs(got - exact) < abs(naive - exact)


def test_a_parabolas_minimum_between_samples_is_recovered_exactly():
    # phi = (u - c)^2 falls to 0 at u = c, between samples, then rises: the positive
    # variation is phi(u_end) - 0. The turn's three samples lie on the parabola itself, so
    # the correction is exact (to rounding); the samples alone miss min_k phi(u_k) > 0.
    us = np.array([0.0, 0.7, 1.5, 2.0, 2.9, 3.2, 4.0])
    c = 1.83
    xs = ((us - c) ** 2)[:, None]
    got = walk(us, xs, 1e-9)
    assert got == pytest.approx((4.0 - c) ** 2, rel=1e-13)
    assert np.min(xs) > 0.01  # what the samples alone would miss


def test_a_dip_inside_the_width_does_not_split_a_rise():
    # Rising 0 -> 1 with a dip of 1e-7 on the way: a plain positive variation adds the dip
    # back (1 + 1e-7); with a width of 1e-6 the dip is noise and the rise counts once.
    us = np.arange(6.0)
    xs = np.array([0.0, 0.4, 0.4 - 1e-7, 0.7, 0.9, 1.0])[:, None]
    assert walk(us, xs, 1e-6) == pytest.approx(1.0, abs=1e-15)
    # With a width below the dip it is a turn: then the dip counts, corrected at both turns
    # (a maximum at 0.4 and a minimum at 0.4 - 1e-7), so the sum is at least 1 + 1e-7.
    assert walk(us, xs, 1e-8) >= 1.0 + 1e-7 - 1e-15
