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
from marginflow.flows import AdaGradFlow, AdamFlow, GradientFlow, RMSPropFlow, simulate
from marginflow.models import MLP, DeepLinear, ToyLeaky, separable_gaussians, toy_dataset

FLOWS = {
    "gd": GradientFlow(),
    "adagrad": AdaGradFlow(1e-5),
    "rmsprop": RMSPropFlow(1e-5, 0.9),
    "adam": AdamFlow(1e-5, 0.9),
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
    # of log L ~ -230 in float64 plus the solver's tolerance.
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
    traj = runs(model, flow)
    _check_late(traj, 1e100)
    assert traj.stats["num_steps"] <= 2.5 * _steps_to(traj, 1e5)


# Measured ratio steps(1e100) / steps(1e5) above the 2.5 (an open problem, analysed
# in benchmarks/README.md): AdaGrad on the deep linear net, 2.53. Its late decades cost about
# 9 Dopri8 steps each, its conditioner staying large on coordinates with small gradients.
_OVER_BOUND = {("deep_linear", "adagrad")}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "deep_linear"])
@pytest.mark.parametrize("flow", list(FLOWS))
def test_other_models_all_flows(runs, model, flow, request):
    if (model, flow) in _OVER_BOUND:
        request.applymarker(pytest.mark.xfail(strict=True, reason="step ratio > 2.5"))
    traj = runs(model, flow)
    _check_late(traj, 1e100)
    assert traj.stats["num_steps"] <= 2.5 * _steps_to(traj, 1e5)


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
    from marginflow.flows._simulate import _segment_bounds

    assert _segment_bounds(0.0, 1e3) == [0.0, 1.0, 10.0, 100.0, 1e3]
    assert _segment_bounds(0.0, 1e35) == [0.0, *[10.0**k for k in range(11)], 1e20, 1e30, 1e35]
    assert _segment_bounds(5e12, 1e31) == [5e12, 1e20, 1e30, 1e31]
    assert _segment_bounds(0.5, 3.0) == [0.5, 1.0, 3.0]


def test_late_solver_per_flow():
    # The flows whose m-equation decays (rate (1 - b) t in u) keep the IMEX solver that
    # treats the decay implicitly; GD and AdaGrad, with nothing stiff late, get Dopri8.
    import diffrax as dfx
    from marginflow.flows import default_solver, late_solver
    from marginflow.flows._imex import DecayIMEX

    for name, flow in FLOWS.items():
        assert isinstance(default_solver(flow, 3), DecayIMEX)
        late = late_solver(flow, 3)
        expected = DecayIMEX if name in ("rmsprop", "adam") else dfx.Dopri8
        assert isinstance(late, expected), (name, late)
