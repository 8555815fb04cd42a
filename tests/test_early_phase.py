"""The early phase of AdaGrad's and RMSProp's flows, integrated in s = sqrt t (`flows._clock`).

From m = 0 the second moment grows like t g^2, so dw/dt ~ -sign(g) / sqrt(t) once t is past
the eps transition: singular at t = 0 in t, bounded in s. The tests check the displacement
over that phase against closed forms derived by hand (AdaGrad) and mpmath quadrature
(RMSProp), that a run in s agrees with one in t while taking fewer steps, and that s is
used only where the eps transition is over by t = 1e-12 (`_clock.starts_in_sqrt_t`).
Steps are counted, never timed.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import marginflow  # noqa: F401  (float64)
import mpmath
import numpy as np
import pytest
from marginflow.flows import AdaGradFlow, AdamFlow, GradientFlow, RMSPropFlow, simulate
from marginflow.flows._clock import (
    LOG_T,
    SQRT_T,
    T,
    clock_of,
    starts_in_sqrt_t,
    transition_time,
)
from marginflow.models import Linear, Objective, separable_gaussians


class AdaGradInT(AdaGradFlow):
    """The same flow integrated in t on [0, 1] (the clock before sqrt t)."""

    sqrt_start: ClassVar[bool] = False


class RMSPropInT(RMSPropFlow):
    sqrt_start: ClassVar[bool] = False


B = 0.9  # RMSProp's b
T_EARLY = 1e-12  # w moves by about 2 sqrt(t) / sqrt(1 - b) = 2e-6 .. 6e-6 per coordinate
RTOL = 1e-12


@pytest.fixture(scope="module")
def problem():
    """A linear model on separable data, w0, g0 = grad L(w0) and the Hessian H of L at w0."""
    data = separable_gaussians(20, 4, seed=3)
    model = Linear(4, key=jax.random.key(3))
    objective = Objective(model, data)
    w0 = np.asarray(objective.w0())
    g0 = np.asarray(objective.log_loss_and_grad(jnp.asarray(w0))[1])
    hessian = np.asarray(jax.hessian(lambda w: jnp.exp(objective.log_loss(w)))(jnp.asarray(w0)))
    return model, data, w0, g0, hessian


def _frozen_displacement(kind, placement, eps, g, t):
    """w(t) - w0 with g held at g0: -g_i int_0^t h(m_i(tau)) dtau, m_i = t g_i^2 (AdaGrad) or
    g_i^2 (1 - e^{-(1-b) tau}) (RMSProp), h = 1/sqrt(eps + m) or 1/(sqrt(m) + eps)."""
    a = np.abs(g)
    if kind == "adagrad":  # closed forms: tau = sigma^2, int 2 sigma / (a sigma + eps) ...
        if placement == "inside":
            integral = 2 * (np.sqrt(eps + t * a**2) - np.sqrt(eps)) / a**2
        else:
            s = np.sqrt(t)
            integral = 2 / a * (s - eps / a * np.log1p(a * s / eps))
        return -g * integral
    mpmath.mp.dps = 40
    c = 1 - B
    out = []
    for gi, ai in zip(g, a, strict=True):
        def integrand(sigma, ai=ai):  # tau = sigma^2: the square-root singularity removed
            m = ai**2 * -mpmath.expm1(-c * sigma**2)
            h = 1 / mpmath.sqrt(eps + m) if placement == "inside" else 1 / (mpmath.sqrt(m) + eps)
            return 2 * sigma * h
        # split at the transition sigma ~ sqrt(eps / (c a^2)) (inside) or eps / (sqrt(c) a)
        knee = mpmath.sqrt(eps / c) / ai if placement == "inside" else eps / (mpmath.sqrt(c) * ai)
        out.append(-gi * float(mpmath.quad(integrand, [0, knee, mpmath.sqrt(t)])))
    return np.asarray(out)


@pytest.mark.parametrize("placement", ["inside", "outside"])
@pytest.mark.parametrize("kind", ["adagrad", "rmsprop"])
def test_the_early_displacement_matches_the_frozen_gradient_solution(problem, kind, placement):
    model, data, w0, g0, hessian = problem
    a = np.abs(g0)
    c = 1.0 if kind == "adagrad" else 1 - B
    # eps puts the transition of the median coordinate at t = T_EARLY / 10: its shape (the
    # eps terms of the closed forms) is then 50-90% of the displacement, not a detail.
    median = np.median(a)
    eps = 0.1 * T_EARLY * c * median**2 if placement == "inside" else median * np.sqrt(
        0.1 * T_EARLY * c)
    flow = (AdaGradFlow(eps, eps_placement=placement) if kind == "adagrad"
            else RMSPropFlow(eps, B, eps_placement=placement))
    traj = simulate(flow, model, data, t1=T_EARLY, n_save=2, rtol=RTOL, atol=1e-16)
    moved = np.asarray(traj.w[-1]) - w0
    reference = _frozen_displacement(kind, placement, eps, g0, T_EARLY)
    without_eps = -np.sign(g0) * 2 * np.sqrt(T_EARLY / c)
    assert np.linalg.norm(reference - without_eps) > 0.3 * np.linalg.norm(reference)
    # Holding g at g0 errs by the change of g over the phase, H dw: a relative change
    # delta_i = |H dw|_i / |g_i| of g_i changes dw_i/dt by at most 2 delta_i (numerator and
    # the root of m). The solver's error is about rtol |w| per unit of |w| moved; a factor
    # 100 covers its accumulation over the steps (global against local error).
    frozen = 2 * np.max(np.abs(hessian @ reference) / a)
    solver = 100 * RTOL * np.linalg.norm(w0) / np.linalg.norm(reference)
    assert frozen + solver < 1e-3  # the check resolves the eps shape
    err = np.linalg.norm(moved - reference) / np.linalg.norm(reference)
    assert err <= frozen + solver, (err, frozen, solver)


@pytest.mark.parametrize("flow_in_s, flow_in_t", [
    (AdaGradFlow(1e-10, eps_placement="outside"), AdaGradInT(1e-10, eps_placement="outside")),
    (RMSPropFlow(1e-16, B), RMSPropInT(1e-16, B)),
])
def test_a_run_in_sqrt_t_agrees_with_one_in_t_in_fewer_steps(problem, flow_in_s, flow_in_t):
    """Through t = 1 (the switch to log t, whose proposed step doubles) to t = 1e3."""
    model, data, w0, _, _ = problem
    rtol = 1e-8
    in_s = simulate(flow_in_s, model, data, t1=1e3, n_save=8, rtol=rtol)
    in_t = simulate(flow_in_t, model, data, t1=1e3, n_save=8, rtol=rtol)
    np.testing.assert_array_equal(in_s.ts, in_t.ts)
    # Two solutions each within about rtol * (steps) of the flow, relative to |w|.
    scale = np.linalg.norm(in_t.w, axis=-1, keepdims=True)
    assert np.all(np.abs(in_s.w - in_t.w) <= 100 * rtol * scale)
    first = [in_s.stats["num_steps_per_segment"][0], in_t.stats["num_steps_per_segment"][0]]
    # Measured on this problem: AdaGrad 77 against 169 steps to t = 1, RMSProp 271 against
    # 368 (its decay, not the start, sets the rest of [0, 1]).
    assert first[0] < 0.85 * first[1], first
    assert in_s.stats["num_steps"] < in_t.stats["num_steps"]


def test_which_flows_start_in_sqrt_t():
    # Bias-corrected Adam (psi ~ g^2 at t = 0) and GD (h = 1) are bounded at t = 0.
    for flow in (AdamFlow(1e-30), GradientFlow()):
        assert not starts_in_sqrt_t(flow, 1e10)
    # t_c = eps / (c g^2) inside, eps^2 / (c g^2) outside, c = 1 (AdaGrad), 1 - b (RMSProp)
    assert transition_time(AdaGradFlow(1e-5), 2.0) == pytest.approx(1e-5 / 4, rel=1e-12)
    assert transition_time(RMSPropFlow(1e-6, 0.9, eps_placement="outside"), 2.0) == (
        pytest.approx(1e-12 / (0.1 * 4), rel=1e-12))
    assert transition_time(AdaGradFlow(), 0.0) == float("inf")
    assert starts_in_sqrt_t(AdaGradFlow(1e-10, eps_placement="outside"), 1.0)  # t_c 1e-20
    assert starts_in_sqrt_t(RMSPropFlow(1e-16, B), 1.0)  # 1e-15
    assert not starts_in_sqrt_t(AdaGradFlow(1e-5), 1.0)  # 1e-5: w moves linearly in t long
    assert clock_of(0.0, True) == SQRT_T and clock_of(0.5, False) == T
    assert clock_of(1.0, True) == clock_of(1.0, False) == LOG_T


def test_a_late_transition_keeps_t(problem):
    """eps 3e-3 outside the root (eps^2 = 9e-6 in the transition time): it ends near
    t = 1e-7 here, so simulate integrates in t (the same steps and, to rounding, the same w
    as the class that never uses sqrt t). The flows are those of the sqrt-t test above with
    another eps, which is traced: no new program. Where eps inside the root keeps t is
    `test_which_flows_start_in_sqrt_t`'s."""
    model, data, *_ = problem
    flow = AdaGradFlow(3e-3, eps_placement="outside")
    in_t = AdaGradInT(3e-3, eps_placement="outside")
    a = simulate(flow, model, data, t1=10.0, n_save=4)
    b = simulate(in_t, model, data, t1=10.0, n_save=4)
    assert a.stats["num_steps"] == b.stats["num_steps"]
    np.testing.assert_allclose(a.w, b.w, rtol=1e-12, atol=0)
