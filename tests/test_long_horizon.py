"""Long horizons at constant cost per decade (issue 5): step counts, late-time sanity.

Steps are counted, never timed. One run to t1 = 1e100 per case gives both counts: the
segments (decades up to 1e10, ten decades after) are identical whatever t1 is, so steps(1e5)
is the sum over the first segments of the same run (checked once below against a separate
run to 1e5).
"""

from __future__ import annotations

import jax
import marginflow  # noqa: F401  (float64)
import numpy as np
import pytest
from marginflow.flows import (
    AdaGradFlow,
    AdamFlow,
    GradientFlow,
    MomentumFlow,
    RMSPropFlow,
    simulate,
)
from marginflow.models import MLP, DeepLinear, ToyLeaky, separable_gaussians, toy_dataset

FLOWS = {
    "gd": GradientFlow(),
    "adagrad": AdaGradFlow(1e-5),
    "rmsprop": RMSPropFlow(1e-5, 0.9),
    "adam": AdamFlow(1e-5, 0.9),
    # b1 = 0: the first moment averages g over one time unit. With b1 = 0.9 (ten units) the
    # toy's weights coast far once the data separate: log L reaches -523 by t = 1e3 and the
    # 1/t regime begins only near t = 1/L ~ 1e227, after the horizon checked here.
    "momentum": MomentumFlow(0.0),
    "adam_momentum": AdamFlow(1e-5, 0.9, b1=0.0),
}


def _steps_to(traj, t: float) -> int:
    """Steps of the segments that end at or before t (t must be a segment end)."""
    ends = np.asarray(traj.stats["segment_ends"])
    assert np.any(ends == t), (t, ends)
    n = np.asarray(traj.stats["num_steps_per_segment"])
    return int(n[ends <= t].sum())


def _toy():
    return ToyLeaky(key=jax.random.key(0)), toy_dataset(0)


def _mlp():
    # Smooth activation max(z, 0)^2 (degree 3): with ReLU the flow can slide along a kink
    # (a pre-activation held at 0), where no adaptive ODE solver makes progress.
    return (
        MLP(4, 8, 2, activation=2, key=jax.random.key(1)),
        separable_gaussians(20, 4, gap=0.5, seed=1),
    )


def _deep_linear():
    return DeepLinear((4, 4, 4, 1), key=jax.random.key(2)), separable_gaussians(
        20, 4, gap=0.5, seed=2
    )


MODELS = {"toy": _toy, "mlp": _mlp, "deep_linear": _deep_linear}


@pytest.fixture(scope="module")
def runs():
    cache = {}

    def get(model: str, flow: str, t1: float = 1e100):
        key = (model, flow, t1)
        if key not in cache:
            m, d = MODELS[model]()
            ts = np.unique(np.concatenate([[0.0, min(1e5, t1)], np.geomspace(1e-2, t1, 59)]))
            cache[key] = simulate(FLOWS[flow], m, d, t1, ts=ts)
        return cache[key]

    return get


def _check_late(traj, t1):
    # The run reached t1, and nothing is NaN/inf anywhere on the way.
    assert traj.success, traj.message
    assert traj.ts[-1] == pytest.approx(t1, rel=1e-12)
    for arr in (traj.w, traj.m, traj.h(), traj.log_loss, traj.I):
        assert np.all(np.isfinite(arr))
    # log L decreases along the flow (dL/dt = -<g, h g> <= 0); 1e-9 absolute is rounding
    # of log L ~ -230 in float64 plus the solver's tolerance. A momentum flow moves along
    # m1, not g: dL/dt = -<g, h m1_hat> has no sign, and the loss may rise for a while.
    if traj.meta["flow"] != "momentum" and "b1" not in traj.meta["hyper"]:
        assert np.all(np.diff(traj.log_loss) <= 1e-9)
    # Theorem 10: L = Theta(1 / (t (log t)^(2 - 2/L))), so the slope of log L against log t
    # over the last decades is -1 - (2 - 2/L) / log t + o(1/log t), within 0.02 of -1 at
    # t ~ 1e90..1e100 (log t ~ 210). An underflowed gradient (t g computed as 0) would
    # freeze w and give slope 0 instead.
    late = traj.ts >= t1 / 1e10
    slope = np.polyfit(np.log(traj.ts[late]), traj.log_loss[late], 1)[0]
    assert abs(slope + 1.0) < 0.02, slope
    # The conditioner stays in (0, eps^{-1/2}] (eps_inside convention; GD: h = 1).
    assert np.all(traj.h() > 0)
    _check_penalty_integral(traj)
    _check_constant_cost(traj)


def _check_constant_cost(traj):
    # After 1e10 each segment is ten decades of t (a length-23 interval of u = log t). The
    # late field in u is autonomous up to corrections that fade like 1/log t (g ~ 1/t,
    # Theorem 10), so the steps per segment must not grow: none of the last half of the
    # late segments takes more than the most of the first half, up to 25% + 2 steps of
    # controller jitter (segments take 5-120 steps). A cost that grew with t (e.g. a stiff
    # decay treated explicitly, rate t) fails. (The first half, not the first segment: a
    # run whose loss is still far below 1/t at 1e10, like the momentum flows', idles
    # through its first late segments until the 1/t regime begins.)
    ends = np.asarray(traj.stats["segment_ends"])
    late = np.asarray(traj.stats["num_steps_per_segment"])[ends > 1e10]
    half = (len(late) + 1) // 2
    assert late[half:].max(initial=0) <= 1.25 * late[:half].max(initial=0) + 2, late


def _check_penalty_integral(traj):
    # Lemma 3's I(t) = sum_i positive variation of -1/2 log h_i = 1/4 log(eps + psi_i). It
    # is exact at step ends; a save inside a step can only be off by the variation hidden
    # by a turning point of some m_i there, far below the run's rtol (1e-8) times (1 + I).
    I = traj.I
    assert np.all(np.diff(I) >= -1e-8 * (1.0 + I[1:])), np.diff(I).min()
    if traj.meta["flow"] in ("gd", "momentum"):  # h = 1
        assert np.all(I == 0.0)
    elif traj.meta["flow"] == "adagrad":
        # m_i = int g_i^2 only grows, so I(t) = sum_i 1/4 log((eps + m_i(t)) / eps) in
        # closed form; summing per-step increments rounds each (~1e-16 relative), over
        # < 1e4 steps: 1e-10 relative leaves a margin and still catches a lost step.
        eps = traj.meta["hyper"]["eps"]
        exact = 0.25 * np.log1p(traj.m / eps).sum(axis=1)
        np.testing.assert_allclose(I, exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("flow", list(FLOWS))
def test_toy_reaches_1e100_at_constant_cost_per_decade(runs, flow):
    traj = runs("toy", flow)
    _check_late(traj, 1e100)
    n5, n100 = _steps_to(traj, 1e5), traj.stats["num_steps"]
    assert n100 == sum(traj.stats["num_steps_per_segment"])
    # The bound: 95 more decades cost at most 1.5x the first five.
    assert n100 <= 2.5 * n5, (n5, n100)


def test_steps_to_1e5_equal_a_separate_run(runs):
    # The counting used above: the first segments of the 1e100 run are the run to 1e5.
    long, short = runs("toy", "rmsprop"), runs("toy", "rmsprop", 1e5)
    assert short.stats["num_steps"] == _steps_to(long, 1e5)
    i = np.searchsorted(long.ts, 1e5)
    assert long.ts[i] == 1e5 and short.ts[-1] == 1e5
    # Same steps, same arithmetic: equal up to the last bits of the save interpolation.
    np.testing.assert_allclose(long.w[i], short.w[-1], rtol=1e-12)


@pytest.mark.parametrize("model,flow", [("mlp", "rmsprop"), ("deep_linear", "adam")])
def test_other_models_reach_1e100(runs, model, flow):
    _check_late(runs(model, flow), 1e100)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "deep_linear"])
@pytest.mark.parametrize("flow", list(FLOWS))
def test_other_models_all_flows(runs, model, flow):
    _check_late(runs(model, flow), 1e100)


@pytest.mark.slow
@pytest.mark.parametrize("flow", list(FLOWS))
def test_toy_reaches_1e300(flow):
    m, d = _toy()
    traj = simulate(FLOWS[flow], m, d, 1e300, n_save=60)
    assert traj.success, traj.message
    for arr in (traj.w, traj.m, traj.h(), traj.log_loss):
        assert np.all(np.isfinite(arr))
    # L ~ 1e-300 here: log L must still follow Theorem 10's slope (-1 within 0.01 at
    # log t ~ 680), which it cannot if t * grad L underflowed to zero.
    late = traj.ts >= 1e250
    slope = np.polyfit(np.log(traj.ts[late]), traj.log_loss[late], 1)[0]
    assert abs(slope + 1.0) < 0.01, slope
    assert traj.log_loss[-1] < -680


def test_float32_t1_limit_is_a_clear_error():
    m, d = _toy()
    with pytest.raises(ValueError, match="float32.*t1"):
        simulate(FLOWS["gd"], m, d, 1e40, rtol=1e-5, dtype=np.float32)
    with pytest.raises(ValueError, match="float32.*rtol"):
        simulate(FLOWS["gd"], m, d, 1e3, dtype=np.float32)


def test_segments_are_decades_then_ten_decades():
    from marginflow.flows._plan import _segment_bounds

    assert _segment_bounds(0.0, 1e3) == [0.0, 1.0, 10.0, 100.0, 1e3]
    assert _segment_bounds(0.0, 1e35) == [0.0, *[10.0**k for k in range(11)], 1e20, 1e30, 1e35]
    assert _segment_bounds(5e12, 1e31) == [5e12, 1e20, 1e30, 1e31]
    assert _segment_bounds(0.5, 3.0) == [0.5, 1.0, 3.0]


def test_late_solver_per_flow():
    # The flows whose moments decay (rate (1 - b) t in u) use the IMEX solver that treats
    # the decay implicitly; GD and AdaGrad, with no decay, Dopri8; both throughout the run
    # (chosen by wall time, benchmarks/solver_choice.py). AdaGrad's implicit alternative,
    # `newton_solver`, stays available: a matrix-free Newton solve.
    import diffrax as dfx
    import lineax as lx
    import optimistix as optx
    from marginflow.flows import default_solver, late_solver, newton_solver
    from marginflow.flows._imex import DecayIMEX

    expected = {"gd": dfx.Dopri8, "adagrad": dfx.Dopri8, "rmsprop": DecayIMEX, "adam": DecayIMEX,
                "momentum": DecayIMEX, "adam_momentum": DecayIMEX}
    for name, flow in FLOWS.items():
        assert isinstance(default_solver(flow, 3), expected[name]), name
        late = late_solver(flow, 3)
        assert isinstance(late, expected[name]), (name, late)
        assert late == default_solver(flow, 3)  # no switch at 1e10
    newton = newton_solver(1e-8).root_finder
    assert isinstance(newton, optx.Newton) and isinstance(newton.linear_solver, lx.GMRES)


def test_newton_solver_option(runs):
    # `newton_solver` (Kvaerno5 with a matrix-free Newton-Krylov stage solve, O(p): GMRES
    # through JVPs, never a Jacobian) is the opt-in solver for stiff AdaGrad problems. Run
    # throughout on the toy to 1e100, it must reach t1 and agree with the default solvers'
    # direction. Both runs keep each step's error below rtol = 1e-8; the directions were
    # measured 2.3e-7 apart at 1e30; 1e-5 allows 1e3 x rtol of accumulated error, while a
    # Newton that fails stalls the run and a wrong stage solve moves the direction by O(1).
    from marginflow.flows import newton_solver

    ref = runs("toy", "adagrad")
    m, d = _toy()
    # kink_tol=0: Kvaerno5's rejections at two of the toy's kink crossings would otherwise
    # end in kink steps (accurate to kink_tol, not rtol), which put I(t) 1e-10 off.
    traj = simulate(FLOWS["adagrad"], m, d, 1e100, ts=ref.ts, solver=newton_solver(1e-8),
                    kink_tol=0)
    assert traj.success, traj.message
    assert traj.meta["solver"].startswith("Kvaerno5 + Newton-Krylov")
    _check_penalty_integral(traj)
    wa, wb = traj.w[-1] / np.linalg.norm(traj.w[-1]), ref.w[-1] / np.linalg.norm(ref.w[-1])
    assert np.linalg.norm(wa - wb) < 1e-5


def test_float32_adagrad_past_the_late_switch():
    # AdaGrad's late solver (Dopri8, now its solver throughout) in float32 past 1e10: the
    # run must go on and keep float32's accuracy (the Newton-Krylov Kvaerno5 that was the
    # late default before stalled in float32 on some problems, see late_solver). The float32
    # run at rtol 1e-6, against the float64 one at the default tolerances (the program of
    # the toy's AdaGrad test above): measured direction difference at 1e30 5.2e-7; 1e-4
    # allows 100 x rtol of accumulated error over 30 decades, while a failed Newton stalls
    # the run (result != successful).
    m, d = _toy()
    a = simulate(FLOWS["adagrad"], m, d, 1e30, dtype=np.float32, rtol=1e-6, atol=1e-9,
                 n_save=20)
    b = simulate(FLOWS["adagrad"], m, d, 1e30, n_save=20)
    assert a.success and b.success and a.w.dtype == np.float32
    assert a.meta["solver"] == "Dopri8"
    wa, wb = a.w[-1] / np.linalg.norm(a.w[-1]), b.w[-1] / np.linalg.norm(b.w[-1])
    assert np.linalg.norm(wa - wb) < 1e-4


def test_newton_krylov_linear_solve_is_one_gmres_cycle():
    # `newton_solver` relies on lineax's GMRES with rtol = atol = 0 and max_steps = 2 doing
    # one cycle of 5 Arnoldi vectors and reporting success: an inexact solve otherwise, the
    # exact solution when the Krylov space closes early (systems of size <= 5, right-hand
    # sides in a small invariant subspace), and 0 for a zero right-hand side. A lineax that
    # reported these as failures would make every Newton solve fail.
    import jax.numpy as jnp
    import lineax as lx
    from marginflow.flows import newton_solver

    gmres = newton_solver(1e-8).root_finder.linear_solver
    rng = np.random.default_rng(0)
    small = jnp.asarray(np.eye(3) * 3 + rng.normal(size=(3, 3)))
    block = jnp.eye(10).at[0, 1].set(0.5).at[1, 0].set(0.2)  # span(e0, e1) is invariant
    for a, b in [(small, jnp.asarray(rng.normal(size=3))), (block, jnp.eye(10)[0]),
                 (block, jnp.zeros(10))]:
        sol = lx.linear_solve(lx.MatrixLinearOperator(a), b, gmres, throw=False)
        assert sol.result == lx.RESULTS.successful
        np.testing.assert_allclose(sol.value, np.linalg.solve(a, b), atol=1e-12)
    # A 40 x 40 system with eigenvalues spread over [1, 40]: 5 vectors cannot solve it, but
    # GMRES minimises the residual over the Krylov space: measured 0.24 of |b|.
    a = jnp.asarray(np.diag(np.arange(1.0, 41.0)) + 0.1 * rng.normal(size=(40, 40)))
    b = jnp.asarray(rng.normal(size=40))
    sol = lx.linear_solve(lx.MatrixLinearOperator(a), b, gmres, throw=False)
    assert sol.result == lx.RESULTS.successful
    assert np.linalg.norm(a @ sol.value - b) < 0.5 * np.linalg.norm(b)
