"""Flows on piecewise-linear models (ReLU, leaky ReLU, max-pool): kink steps (issue 14).

`simulate` accepts, where the solver is stuck among kinks, steps whose increment on v is
within kink_tol ||v|| (`CarriedPID`). Checked here: which models declare kinks; that smooth
models keep their solvers bit for bit; convergence to an independent reference (explicit
Euler polygons, which converge to the Filippov solution, written out by hand below) as
kink_tol falls; every flow on a ReLU network into the late phase; the statistics.
"""

import math

import diffrax as dfx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from marginflow.analysis import normalized_margin
from marginflow.flows import AdaGradFlow, AdamFlow, GradientFlow, RMSPropFlow, simulate
from marginflow.models import (
    CNN,
    MLP,
    DeepLinear,
    Linear,
    ToyLeaky,
    separable_gaussians,
    toy_dataset,
)

FLOWS = {
    "gd": GradientFlow(),
    "adagrad": AdaGradFlow(1e-5),
    "rmsprop": RMSPropFlow(1e-5, 0.9),
    "adam": AdamFlow(1e-5, 0.9),
}
# The reference problem: a ReLU MLP whose GD flow slides along kinks before t = 4 (a run
# with kink_tol=0 stalls there, checked below).
IN, WIDTH, N, T = 3, 6, 24, 4.0


def _problem():
    return MLP(IN, WIDTH, 2, key=jax.random.key(3)), separable_gaussians(N, IN, seed=1)


def test_models_declare_kinks():
    key = jax.random.key(0)
    assert MLP(3, 4, 2, key=key).piecewise_linear
    assert MLP(3, 4, 3, activation="leaky_relu", key=key).piecewise_linear
    assert MLP(3, 4, 2, activation=1, key=key).piecewise_linear
    assert ToyLeaky(key=key).piecewise_linear
    assert CNN(widths=(2, 2, 4), key=key).piecewise_linear
    # max(z, 0)^k with k >= 2 is C^1; a one-layer MLP and the linear models have no units.
    assert not MLP(3, 4, 2, activation=2, key=key).piecewise_linear
    assert not MLP(3, 4, 1, key=key).piecewise_linear
    assert not Linear(3, key=key).piecewise_linear
    assert not DeepLinear((3, 3, 1), key=key).piecewise_linear
    # Dense kinks (most steps cross one, whatever the data): the CNN only. An MLP's density
    # depends on its data (docs/solvers.md, "Dense kinks").
    assert CNN(widths=(2, 2, 4), key=key).dense_kinks
    assert not MLP(3, 4, 2, key=key).dense_kinks
    assert not ToyLeaky(key=key).dense_kinks
    assert not Linear(3, key=key).dense_kinks
    # Frequent kinks (a surface per sample and hidden unit): piecewise-linear MLPs and the
    # CNN; not the toy (one hidden unit) nor the smooth models.
    assert MLP(3, 4, 2, key=key).frequent_kinks
    assert MLP(3, 4, 3, activation="leaky_relu", key=key).frequent_kinks
    assert CNN(widths=(2, 2, 4), key=key).frequent_kinks
    assert not ToyLeaky(key=key).frequent_kinks
    assert not MLP(3, 4, 2, activation=2, key=key).frequent_kinks
    assert not MLP(3, 4, 1, key=key).frequent_kinks
    assert not DeepLinear((3, 3, 1), key=key).frequent_kinks


def _default_solver_name(flow, model, data, loss, kink_tol) -> str:
    """The solver `simulate` picks: `setup` is what it runs before it compiles."""
    from marginflow.flows._plan import setup

    run = setup(flow, model, data, 1e3, loss=loss, t0=0.0,
                n_save=5, ts=None, solver=None, rtol=1e-8, atol=1e-12, max_steps=100,
                batch=False, dtype=jnp.float64, shard=None, workers=None,
                kink_tol=kink_tol, checkpoint=None)
    return type(run.solver).__name__


@pytest.mark.parametrize("flow, kink_tol, expected", [
    (AdaGradFlow(1e-5), None, "Heun"), (GradientFlow(), None, "Heun"),
    (AdaGradFlow(1e-5), 0, "Dopri8"), (RMSPropFlow(1e-5, 0.9), None, "DecayHeun"),
    (RMSPropFlow(1e-5, 0.9), 0, "DecayIMEX")])
def test_dense_kinks_pick_heun_while_kink_steps_are_on(flow, kink_tol, expected):
    # The solver `simulate` picks for the CNN.
    from marginflow.models import Dataset

    model = CNN(out_dim=3, widths=(2, 2, 4), key=jax.random.key(0))
    X = jax.random.uniform(jax.random.key(1), (4, 784), jnp.float64)
    data = Dataset(X, jnp.asarray([0, 1, 2, 0]))
    assert _default_solver_name(flow, model, data, "cross_entropy", kink_tol) == expected


@pytest.mark.parametrize("make_model, flow, kink_tol, expected", [
    (lambda k: MLP(3, 4, 2, key=k), GradientFlow(), None, "Bosh3"),
    (lambda k: MLP(3, 4, 2, activation="leaky_relu", key=k), AdaGradFlow(1e-5), None, "Bosh3"),
    (lambda k: MLP(3, 4, 2, key=k), AdaGradFlow(1e-5), 0, "Dopri8"),
    (lambda k: MLP(3, 4, 2, key=k), AdamFlow(1e-5, 0.9), None, "DecayIMEX"),
    (lambda k: MLP(3, 4, 2, activation=2, key=k), GradientFlow(), None, "Dopri8"),
    (lambda k: ToyLeaky(key=k), AdaGradFlow(1e-5), None, "Dopri8")])
def test_frequent_kinks_pick_bosh3_while_kink_steps_are_on(make_model, flow, kink_tol, expected):
    """The solver `simulate` picks for GD and AdaGrad on a piecewise-linear MLP (Bosh3,
    while kink steps are on); the flows with a decay, the smooth MLP and the toy keep theirs."""
    model = make_model(jax.random.key(0))
    data = separable_gaussians(6, 2 if isinstance(model, ToyLeaky) else 3, seed=0)
    assert _default_solver_name(flow, model, data, "exponential", kink_tol) == expected


def test_smooth_models_keep_their_solver_bit_for_bit():
    # A smooth model gets no kink handling by default: the same program as kink_tol=0.
    model = MLP(IN, WIDTH, 2, activation=2, key=jax.random.key(3))
    data = separable_gaussians(N, IN, seed=1)
    a = simulate(GradientFlow(), model, data, 1e3, n_save=5)
    b = simulate(GradientFlow(), model, data, 1e3, n_save=5, kink_tol=0)
    assert a.meta["kink_tol"] is None and "num_kink_steps" not in a.stats
    np.testing.assert_array_equal(a.w, b.w)
    assert a.stats == b.stats


@pytest.mark.parametrize(
    "bad, error",
    [(-1e-3, ValueError), (1.0, ValueError), (1e-9, ValueError), (math.nan, ValueError),
     ("1e-3", TypeError), (True, TypeError)],
)
def test_kink_tol_is_checked(bad, error):
    model, data = _problem()
    with pytest.raises(error, match="kink_tol"):
        simulate(GradientFlow(), model, data, 1.0, kink_tol=bad)


# The flows the hand-written reference covers: (eps, a) with a = 1 - b for RMSProp, whose
# dm/dt = a (g^2 - m), and a = 0 for AdaGrad (dm/dt = g^2); None for GD (no conditioner).
_REFERENCE_FLOWS = {"gd": None, "adagrad": (1e-5, 0.0), "rmsprop": (1e-5, 0.1)}


def _euler_reference(model, data, flow="gd", n=200_000):
    """w(T) of a flow dw/dt = -h g, g = grad sum_i exp(-y_i Phi(w; x_i)), Phi = W2 relu(W1 x),
    h = 1 (GD) or 1/sqrt(eps + m) with dm/dt = g^2 (AdaGrad) or (1 - b)(g^2 - m) (RMSProp),
    written out by hand (relu'(0) = 0), by explicit Euler and Richardson's extrapolation.
    Euler runs in s on t = T s^2, n and 2n steps: its steps dt = T (2k + 1) / n^2 are short
    near t = 0, where the adaptive flows move fastest (at rate eps^{-1/2} while m << eps;
    a uniform grid of 4e5 steps left AdaGrad's reference 1e-2 off). Euler polygons converge
    to the Filippov solution, sliding included. Returns (reference, |w_n - w_2n| / |w|)."""
    w0 = ravel_pytree(model)[0]
    X, y = jnp.asarray(data.X), jnp.asarray(data.y)
    eps, a = _REFERENCE_FLOWS[flow] or (None, 0.0)

    def grad(w):
        W1, W2 = w[: WIDTH * IN].reshape(WIDTH, IN), w[WIDTH * IN :]
        Z = X @ W1.T
        A = jnp.maximum(Z, 0.0)
        c = -jnp.exp(-y * (A @ W2)) * y  # dL/dPhi(x_i)
        return jnp.concatenate([(((c[:, None] * (Z > 0)) * W2).T @ X).ravel(), A.T @ c])

    # The layout of the flat parameters (W1 row by row, then W2) matches the model's.
    W1, W2 = w0[: WIDTH * IN].reshape(WIDTH, IN), w0[WIDTH * IN :]
    np.testing.assert_allclose(jnp.maximum(X @ W1.T, 0) @ W2, jax.vmap(model)(X), rtol=1e-12)

    @jax.jit
    def euler(n):
        def step(k, state):
            w, m = state
            dt = T * (2.0 * k + 1.0) / n**2
            g = grad(w)
            if eps is None:
                return w - dt * g, m
            dm = g * g if a == 0 else a * (g * g - m)
            return w - dt * g / jnp.sqrt(eps + m), m + dt * dm

        return jax.lax.fori_loop(0, n, step, (w0, jnp.zeros_like(w0)))[0]

    coarse, fine = np.asarray(euler(n)), np.asarray(euler(2 * n))
    ref = 2 * fine - coarse
    return ref, np.linalg.norm(coarse - fine) / np.linalg.norm(ref)


def _filippov_errors(flow, taus, n, solver=None):
    """|w(T) - reference| / |reference| of `simulate` at each kink_tol, and the reference's
    own error bar."""
    model, data = _problem()
    ref, bar = _euler_reference(model, data, flow, n)
    errors = {}
    for tau in taus:
        traj = simulate(FLOWS[flow], model, data, T, n_save=3, kink_tol=tau, solver=solver,
                        max_steps=200_000)
        assert traj.success, traj.message
        assert traj.stats["num_kink_steps"] > 0  # the run went through kinks
        errors[tau] = np.linalg.norm(traj.w[-1] - ref) / np.linalg.norm(ref)
        # Runs that follow the flow: their loss does not rise by more than kink_tol.
        assert traj.stats["kink_loss_rise"] <= tau and "loss rose" not in traj.message
    print(f"{flow}: reference error bar {bar:.2g}, errors {errors}")
    return errors, bar


def test_gd_converges_to_an_independent_filippov_reference():
    errors, bar = _filippov_errors("gd", (1e-2, 1e-3, 1e-4), 200_000)
    # The reference's own error: Euler's O(1/n) term, |w_n - w_2n|, measured 2.4e-6
    # relative, of which the extrapolation removes most (the references at n = 1e5, 2e5
    # and 4e5 agree with that at 8e5 to 2.3e-6, 1.8e-6 and 5.5e-7).
    assert bar < 1e-5
    for tau, error in errors.items():
        # Each kink step errs by at most about tau ||v||; the global error stays below tau.
        assert error < tau, (tau, errors)
    # Convergence as kink_tol tightens, measured 1.1e-4, 4.8e-5, 3.9e-6: the 1e-2 run takes
    # few kink steps and errs far below its tau, so its first decade gains only 2.3x; the
    # second gains 12x. Asserted: the errors fall, and by 2x at least in the second decade.
    assert errors[1e-3] < errors[1e-2] and errors[1e-4] < errors[1e-3] / 2, errors
    # Without kink steps the same run creeps along the kinks and runs out of steps.
    model, data = _problem()
    stalled = simulate(GradientFlow(), model, data, T, n_save=3, kink_tol=0, max_steps=10_000,
                       throw=False)
    assert stalled.result == "max_steps_reached"


def test_adagrad_converges_to_an_independent_filippov_reference():
    # AdaGrad's default on a ReLU MLP, Bosh3 with kink steps, against the reference: as for
    # GD, each error below kink_tol and a factor 2 gained per decade (measured 1.7e-3 and
    # 1.1e-4, and 1.1e-5 at 1e-4, in the slow run of the next test; the reference's
    # |w_n - w_2n| is 1.2e-5, Richardson's two extrapolations agree to 5e-6).
    errors, bar = _filippov_errors("adagrad", (1e-2, 1e-3), 200_000)
    assert bar < 3e-5
    assert all(error < tau for tau, error in errors.items()), errors
    assert errors[1e-3] < errors[1e-2] / 2, errors


@pytest.mark.slow
@pytest.mark.parametrize("flow, solver", [("adagrad", None), ("rmsprop", None),
                                          ("rmsprop", "DecayHeun")])
def test_adaptive_flows_converge_to_the_filippov_reference_as_kink_tol_falls(flow, solver):
    """Three decades of kink_tol against the hand-written reference. RMSProp's Euler
    polygons converge erratically (|w_n - w_2n| 1.0e-4, 1.7e-4, 5.8e-5, 4.9e-5 for n = 1e5
    to 8e5: in the flow's sign-like start the polygons' own errors grow), so its
    reference is taken at n = 4e5 and 8e5 and trusted to about 1e-4: the 1e-4 run is only
    asked to stay within 3e-4 of it (|w_n - w_2n| 5.8e-5 there). Measured: DecayIMEX
    5.6e-3, 7.1e-4, 6.5e-5; DecayHeun 5.3e-3, 6.0e-4, 2.6e-5; AdaGrad (Bosh3) 1.7e-3,
    1.1e-4, 1.1e-5."""
    from marginflow.flows import DecayHeun

    n = 400_000 if flow == "rmsprop" else 200_000
    errors, bar = _filippov_errors(flow, (1e-2, 1e-3, 1e-4), n,
                                   solver=DecayHeun() if solver else None)
    assert bar < (1e-4 if flow == "rmsprop" else 3e-5)
    assert errors[1e-2] < 1e-2 and errors[1e-3] < 1e-3, errors
    assert errors[1e-3] < errors[1e-2] / 2, errors
    floor = 3e-4 if flow == "rmsprop" else 3e-5
    assert errors[1e-4] < max(errors[1e-3] / 2, floor), errors


def _issue_problem():
    # The ReLU network of issue 14, on which every flow stalled before kink steps.
    return MLP(5, 16, 2, key=jax.random.key(0)), separable_gaussians(100, 5, seed=0)


# -m slow (each flow compiles its own program: the test suite's budget); the default run
# takes the RMSProp flow on a ReLU MLP to 1e10 through the command line (test_cli.py).
@pytest.mark.slow
@pytest.mark.parametrize("flow", list(FLOWS))
def test_relu_mlp_reaches_the_late_phase(flow):
    # The default kink_tol (1e-3) to t = 1e10, where each flow stopped before t = 0.1
    # without kink steps (benchmarks/kinks.py): successful, separated (a positive normalised
    # margin means 100% training accuracy), within the issue's 20,000 steps, with the kink
    # steps counted.
    model, data = _issue_problem()
    traj = simulate(FLOWS[flow], model, data, 1e10, n_save=20)
    assert traj.success, traj.message
    assert float(normalized_margin(model, data, traj.w[-1])) > 0
    assert traj.meta["kink_tol"] == 1e-3
    assert traj.stats["num_steps"] <= 20_000
    assert 0 < traj.stats["num_kink_steps"] < traj.stats["num_accepted_steps"]
    assert 0 < traj.stats["kink_log_time"] < math.inf  # their span in log t
    assert "kink steps" in traj.message  # the run says its accuracy is kink_tol's


@pytest.mark.parametrize("kink_tol", [None, 1e-3])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_nonfinite_step_shrinks_the_next_one(kink_tol, bad):
    """A candidate step whose values are NaN or inf is rejected, and the next step is 5x
    shorter (the PID's smallest factor), not NaN: diffrax's PID would turn a NaN error
    into a NaN step size, after which every step is rejected."""
    from marginflow.flows._solvers import default_controller

    ctrl = default_controller(1e-8, 1e-12, kink_tol)
    y0 = (jnp.ones(4), jnp.ones(4), jnp.zeros(()))
    _, state = ctrl.init(None, 0.0, 1.0, y0, 0.5, None, None, 4)
    y1 = (jnp.full(4, bad), jnp.ones(4), jnp.zeros(()))
    error = (jnp.full(4, bad), jnp.zeros(4), jnp.zeros(()))
    keep, t0, t1, _, _, result = ctrl.adapt_step_size(
        0.0, 0.5, y0, y1, (None,) * 4, error, 4, state)
    assert not keep and t0 == 0.0 and result == dfx.RESULTS.successful
    assert np.isclose(float(t1), 0.5 * 0.2, rtol=1e-12), float(t1)
    # A non-finite step at the resolution of t: the field itself is not finite there.
    *_, result = ctrl.adapt_step_size(1e5, 1e5 + 1e-11, y0, y1, (None,) * 4, error, 4, state)
    assert result == dfx.RESULTS.nonfinite
    # 1e-9 is 70 units in the last place of 1e5: a step too long, not a field that is NaN.
    *_, result = ctrl.adapt_step_size(1e5, 1e5 + 1e-9, y0, y1, (None,) * 4, error, 4, state)
    assert result == dfx.RESULTS.successful


def test_adagrad_on_a_relu_mlp_does_not_stall_on_a_nonfinite_step():
    """AdaGrad with Bosh3 on this ReLU MLP meets a step whose candidate is NaN near
    t = 8.7e19; before the controller treated it as an infinite error, the step size
    became NaN there and the run stopped at max_steps (t = 8.74e19)."""
    data = separable_gaussians(16, 3, seed=0)
    traj = simulate(FLOWS["adagrad"], MLP(3, 8, 2, key=jax.random.key(5)), data, 1e20,
                    n_save=3, kink_tol=1e-2, throw=False)
    assert traj.success, traj.message
    assert traj.ts[-1] == 1e20 and np.all(np.isfinite(traj.log_loss))
    assert np.all(np.diff(traj.log_loss) < 0)


@pytest.mark.parametrize("flow", [GradientFlow(), AdaGradFlow(1e-5)], ids=["gd", "adagrad"])
def test_a_tighter_rtol_on_isolated_kinks_stays_at_rtol(flow):
    """The toy's kinks are isolated: each crossing is resolved at rtol and the steps grow
    back between them. Their rejections used to add up across crossings (the count of
    small rejections restarted only at a step above kink_tol), so a tighter rtol set off
    kink steps, which err by up to kink_tol: GD at rtol 1e-10 to t = 10 took 4 and was
    6.1e-8 from the rtol-1e-12 run (AdaGrad 3, 6.7e-7). Now neither run takes one, and the
    two agree to 4e-11 (GD) and 1.4e-10 (AdaGrad) measured: 1e-8 allows 100x the error of
    a run at rtol 1e-10, and fails at the old 6e-8. (Not every case is gone: GD at rtol
    1e-9 to 1e100 still takes 3 kink steps, docs/performance.md.)"""
    model, data = ToyLeaky(key=jax.random.key(0)), toy_dataset(0)
    a = simulate(flow, model, data, 10.0, n_save=5, rtol=1e-10)
    b = simulate(flow, model, data, 10.0, n_save=5, rtol=1e-12)
    assert a.success and b.success
    assert a.stats["num_kink_steps"] == b.stats["num_kink_steps"] == 0
    assert np.linalg.norm(a.w[-1] - b.w[-1]) <= 1e-8 * np.linalg.norm(b.w[-1])


def test_a_new_kink_tol_reuses_the_compiled_program():
    import equinox as eqx
    from marginflow.flows._kernels import _segment_counted

    model, data = _problem()
    simulate(GradientFlow(), model, data, 0.5, n_save=3, kink_tol=1e-2)
    n0 = eqx.debug.get_num_traces(_segment_counted)
    simulate(GradientFlow(), model, data, 0.5, n_save=3, kink_tol=3e-3)
    assert eqx.debug.get_num_traces(_segment_counted) == n0


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_a_batch_with_kink_steps_follows_its_members(workers):
    """batch=True on ReLU MLPs (vmapped, and cut into thread chunks): every member takes
    its own kink steps (counted per member) and ends where its single run does, within the
    kink error: each run is within about 10 * kink_tol of the Filippov solution (the bound
    `test_relu_mlp_agrees_with_a_tighter_kink_tol` asserts), so two runs of one member
    differ by at most 20 * kink_tol (a batched kernel rounds differently, and a kink step
    turns a rounding difference into a different step sequence)."""
    import equinox as eqx

    keys = jax.random.split(jax.random.key(7), 3)
    models = eqx.filter_vmap(lambda k: MLP(5, 16, 2, key=k))(keys)
    data = separable_gaussians(100, 5, seed=0)
    flow = RMSPropFlow(1e-5, 0.9)
    batch = simulate(flow, models, data, 1e6, n_save=3, batch=True, workers=workers)
    assert batch.success, batch.message
    assert len(batch.stats["num_kink_steps"]) == 3 and min(batch.stats["num_kink_steps"]) > 0
    for i, key in enumerate(keys):
        one = simulate(flow, MLP(5, 16, 2, key=key), data, 1e6, n_save=3)
        assert one.success, one.message
        diff = np.linalg.norm(batch.w[i, -1] - one.w[-1]) / np.linalg.norm(one.w[-1])
        print(f"member {i}: relative difference {diff:.2e}, kink steps "
              f"{batch.stats['num_kink_steps'][i]} (batch) / {one.stats['num_kink_steps']}")
        assert diff < 20 * 1e-3, diff


@pytest.mark.slow
@pytest.mark.parametrize("flow", list(FLOWS))
def test_relu_mlp_agrees_with_a_tighter_kink_tol(flow):
    # The default against a run at a 10x tighter kink_tol, at t = 1e10: the difference is
    # the default's error to first order. The error is O(kink_tol) per unit of relative
    # change of v, which grows 10-fold here, so 10 * kink_tol bounds it for every flow and
    # still fails an O(1) departure. The issue's target is 1e-3: GD and AdaGrad (Bosh3,
    # measured 1.9e-5 and 3.1e-4 in benchmarks/kinks.py) meet it. RMSProp and Adam keep
    # the 10 * kink_tol bound (benchmarks/kinks_reproducibility.py): RMSProp's default run
    # lands on one of two outcomes, 2.3-2.8e-4 or 1.4e-3 from the tight run, and a 1e-10
    # change of w0 or other save times pick which. Adam's flow is not unique from
    # t ~ 0.097 (a sliding surface turns repelling,
    # test_adams_flow_branches_where_an_output_weight_changes_sign; a run's errors pick the
    # side, and discrete Adam's step does too, docs/solvers.md): its runs at 1e-3 and 1e-4
    # end 2.1e-4 to 3.2e-3 apart across starts, save times and solvers.
    model, data = _issue_problem()
    a = simulate(FLOWS[flow], model, data, 1e10, n_save=3)
    b = simulate(FLOWS[flow], model, data, 1e10, n_save=3, kink_tol=1e-4)
    assert b.success, b.message
    diff = np.linalg.norm(a.w[-1] - b.w[-1]) / np.linalg.norm(b.w[-1])
    assert diff < (10 * 1e-3 if flow in ("rmsprop", "adam") else 1e-3), diff


@pytest.mark.slow
def test_discrete_rmsprop_approaches_the_flow_on_a_relu_mlp():
    # RMSProp at step eta, mapped through the dictionary (matching_optimizer), against
    # RMSPropFlow(1, 0.5) on the ReLU MLP above, whose flow slides (kink steps below), for
    # t in [0, 4]. Away from kinks a discrete step errs by O(eta^2), and each of the finitely
    # many crossings, or a chattering discrete run in a sliding phase, by O(eta): first
    # order, as on smooth models. Measured: errors 0.234 .. 0.0125 for eta = 0.04 ..
    # 0.0025, pairwise slopes 1.14, 1.04, 1.03, 1.02. The flow at kink_tol 1e-5 is within
    # ~1e-5 of its limit (1.1e-4 between 1e-4 and 1e-5), far below the smallest error.
    from marginflow.discrete import compare, matching_optimizer, run

    model, data = _problem()
    flow = RMSPropFlow(1.0, 0.5)
    grid = np.arange(101) * 0.04
    ref = simulate(flow, model, data, T, ts=grid, rtol=1e-10, atol=1e-14, kink_tol=1e-5,
                   max_steps=1_000_000)
    assert ref.stats["num_kink_steps"] > 0
    etas = np.array([0.02, 0.01, 0.005, 0.0025])
    errs = [
        float(compare(run(matching_optimizer(flow, eta), model, data, int(round(T / eta)),
                          save_every=int(round(0.04 / eta))), ref).max_distance())
        for eta in etas
    ]
    slope = np.polyfit(np.log(etas), np.log(errs), 1)[0]
    assert 0.9 <= slope <= 1.1, (slope, errs)


# The verification bank's late-phase checks (tests/test_bank.py) on ReLU networks, which
# the bank's oracle (scipy on the discontinuous field) cannot follow: every flow variant
# with both binary losses on a ReLU MLP, and cross-entropy on a multi-class one, to 1e100.
RELU_FLOWS = {
    **FLOWS,
    "rmsprop_out": RMSPropFlow(1e-4, 0.5, eps_placement="outside"),
    "adam_ema": AdamFlow(1e-2, 0.5, bias_correction="ema"),
}
RELU_CASES = [(f, loss) for f in RELU_FLOWS for loss in ("exponential", "logistic")] + [
    (f, "cross_entropy") for f in ("gd", "rmsprop")
]


@pytest.mark.slow
@pytest.mark.parametrize("flow,loss", RELU_CASES, ids=[f"{f}-{lo}" for f, lo in RELU_CASES])
def test_relu_mlp_late_phase_properties(flow, loss):
    from marginflow.analysis import monotone_quantity, surrogate_margin

    key = jax.random.key(5)
    if loss == "cross_entropy":
        from bank import separable_blobs  # the bank's three linearly separable classes

        model, data = MLP(4, 8, 2, out_dim=3, key=key), separable_blobs(30, 4, 3, seed=5)
    else:
        model, data = MLP(4, 8, 2, key=key), separable_gaussians(20, 4, seed=5)
    traj = simulate(RELU_FLOWS[flow], model, data, 1e100, loss=loss, n_save=120)
    assert traj.success, traj.message
    assert float(normalized_margin(model, data, traj.w[-1], loss=loss)) > 0
    # Theorem 10, as in the bank: the slope of log L against log t over the last ten
    # decades is -1 - (2 - 2/L) / log t up to 1 / log t at the window's start.
    ts = np.asarray(traj.ts)
    sel = ts >= 1e90
    lt = np.log(ts[sel])
    fit = np.polyfit(lt, np.asarray(traj.log_loss)[sel], 1)[0]
    theory = np.polyfit(lt, -lt - (2.0 - 2.0 / model.degree) * np.log(lt), 1)[0]
    assert abs(fit - theory) <= 1.0 / lt[0], (fit, theory)
    # Lemma 3's Q(t) never decreases on the Filippov solution. The run is within about
    # 10 kink_tol of it (relative on w, see test_relu_mlp_agrees_with_a_tighter_kink_tol);
    # the margins move by L times that relative to max|Phi|, so log of the smallest by
    # L * 10 kink_tol * max|Phi| / q_min, and rho and I by L * 10 kink_tol (bank's bound
    # with DELTA = 10 kink_tol).
    mq = monotone_quantity(traj, model, data)
    delta = 10 * traj.meta["kink_tol"]
    X = jnp.asarray(data.X)
    outs = np.asarray([np.max(np.abs(jax.vmap(_unflat(model, w))(X)))
                       for w in np.asarray(traj.w)[mq.i0:]])
    q_min = surrogate_margin(traj, model, data).g_value[mq.i0:]  # g(log 1/L) <= q_min
    err = model.degree * delta * (outs / q_min + 1.5 + np.abs(mq.penalty) / model.degree)
    low = np.maximum.accumulate(mq.Q - err)
    assert np.all(low <= mq.Q + err), mq.max_drop
    # Theorem 5: RMSProp's and Adam's conditioner tends to its limit, eps^(-1/2) (eps inside
    # the root) or 1/eps (outside). At 1e100 psi ~ g^2 ~ 1e-200, so what is left is m's
    # error where m ~ 0, within sqrt(2p) atol per component (the controller's RMS norm over
    # (v, m); the kink steps' increments are bounded on v only, but m's late steps are
    # kink-free), giving dm / (2 eps) (inside) or sqrt(dm) / eps (outside) in h: the
    # bank's bound, plus h's rounding (4 ulp).
    f = RELU_FLOWS[flow]
    if flow not in ("gd", "adagrad"):
        dm = np.sqrt(2 * traj.w.shape[-1]) * traj.meta["atol"]
        if f.conditioner == "eps_inside":
            h_lim, allowed = f.eps ** -0.5, dm / (2 * f.eps)
        else:
            h_lim, allowed = 1.0 / f.eps, np.sqrt(dm) / f.eps
        dev = np.max(np.abs(traj.h()[-1] / h_lim - 1.0))
        assert dev <= allowed + 4 * np.finfo(np.float64).eps, (dev, allowed)


def _unflat(model, w):
    from marginflow.models import unflatten

    return unflatten(model, jnp.asarray(w))


def _small_cnn():
    from marginflow.models import Dataset

    model = CNN(out_dim=3, widths=(2, 2, 4), key=jax.random.key(0))
    X = jax.random.uniform(jax.random.key(1), (8, 784), jnp.float64)
    return model, Dataset(X, jnp.asarray([0, 1, 2, 0, 1, 2, 0, 1]))


def test_a_small_cnn_flow_steps_with_heun():
    """The CNN's default (Heun with kink steps) end to end on a small CNN and 8 random
    images: it reaches t1 with kink steps and lowers the loss. kink_tol 1e-2 is coarse
    here: it leaves a sliding phase the flow stays in (next test), and where its loss rises
    between saves by more than kink_tol, which AdaGrad's flow never does, the run says so.
    Whether it rises depends on the rounding of XLA's kernels: on a machine with AVX-512
    (512-bit vectors) log L went from -5.04 to -4.04 at the 18th and 19th of 20 saves, a
    rise of 0.198 relative to |log L|; on a 256-bit AMD EPYC it never rose (0.007 fall)."""
    model, data = _small_cnn()
    traj = simulate(AdaGradFlow(1e-5), model, data, 1.0, loss="cross_entropy", n_save=20,
                    kink_tol=1e-2)
    assert traj.meta["solver"] == "Heun" and traj.stats["num_kink_steps"] > 0
    assert traj.log_loss[-1] < traj.log_loss[0]
    rise = np.max(np.diff(traj.log_loss) / np.maximum(1, np.abs(traj.log_loss[:-1])))
    assert traj.stats["kink_loss_rise"] == pytest.approx(max(rise, 0.0), abs=1e-15)
    assert ("The loss rose between saves" in traj.message) == (rise > 1e-2)


@pytest.mark.slow
def test_a_small_cnn_converges_as_kink_tol_falls():
    """AdaGrad on the small CNN to t = 1 at kink_tol 1e-2, 1e-3, 1e-4 (3:39 on
    2 cores, 173,012 steps at 1e-4). Measured: successive runs 0.36 and 0.070 apart
    (relative, w), log L -5.92, 1.19372, 1.19372. An explicit Euler reference with the
    model's own gradient (quadratic grid, n = 1e5 and 2e5, extrapolated; 4.6% between its
    two polygons) has log L 1.19378 and lies 0.38, 0.10 and 0.049 from the runs. So at
    1e-2 the run leaves the sliding phase the flow stays in, and its loss falls far below
    the flow's; from 1e-3 on the runs follow the flow and converge (order about 0.7 on
    this decade). Asserted: the second decade's difference under half the first's, and
    the two finer runs' log L within 1e-3 of each other and below the start's."""
    model, data = _small_cnn()
    runs = [simulate(AdaGradFlow(1e-5), model, data, 1.0, loss="cross_entropy", n_save=3,
                     kink_tol=tau, max_steps=300_000) for tau in (1e-2, 1e-3, 1e-4)]
    assert all(run.success for run in runs)
    w = [run.w[-1] for run in runs]
    first = np.linalg.norm(w[0] - w[1]) / np.linalg.norm(w[1])
    second = np.linalg.norm(w[1] - w[2]) / np.linalg.norm(w[2])
    assert second < first / 2, (first, second)
    assert abs(runs[1].log_loss[-1] - runs[2].log_loss[-1]) < 1e-3
    assert runs[2].log_loss[-1] < runs[2].log_loss[0]


def test_loss_rise_is_the_largest_relative_rise_between_saves():
    """`_loss_rise`, which `simulate` reports as stats['kink_loss_rise'] and names in the
    message beyond kink_tol: log L -1, -2, -1.5, -3 rises once, by 0.5 relative to
    max(1, 2); a falling loss gives 0; a momentum flow, whose loss may rise, gives None."""
    from marginflow.flows import MomentumFlow
    from marginflow.flows._simulate import _loss_rise

    assert float(np.max(_loss_rise(AdaGradFlow(1e-5), [-1.0, -2.0, -1.5, -3.0]))) == 0.25
    assert float(np.max(_loss_rise(AdaGradFlow(1e-5), [0.5, 0.2, -4.0]))) == 0.0
    assert _loss_rise(MomentumFlow(0.9), [-1.0, -0.5]) is None


# --------------------------------------------------------------- where the flow branches
def _hand_velocities(w, h, X, y, j, i):
    """(above, below): dz_ji/dt = -<h_j * g_j, x_i> of the reference problem's ReLU MLP
    (W1 row by row, then W2; loss sum_k exp(-y_k Phi(x_k))), g the gradient written out by
    hand with unit j's activation on sample i set to 1 (above) or 0 (below)."""
    W1, W2 = w[: WIDTH * IN].reshape(WIDTH, IN), w[WIDTH * IN:]
    Z = X @ W1.T
    out = []
    for side in (1.0, 0.0):
        M = (Z > 0).astype(float)
        M[i, j] = side
        c = -np.exp(-y * ((Z * M) @ W2)) * y  # dL/dPhi(x_k)
        g_j = W2[j] * ((c * M[:, j]) @ X)
        out.append(-(h[: WIDTH * IN].reshape(WIDTH, IN)[j] * g_j) @ X[i])
    return out


def test_switching_surfaces_against_velocities_written_out_by_hand():
    # The reference problem's GD flow slides before t = 4; its saves there are examined
    # with a random positive conditioner put in place of GD's h = 1, so that h's weighting
    # is checked too. Each one-sided velocity is a sum of a few dozen O(1) terms: 1e-10
    # relative to the largest term bounds its rounding, and a wrong side or factor is O(1).
    import equinox as eqx
    from marginflow.analysis import switching_surfaces

    model, data = _problem()
    traj = simulate(GradientFlow(), model, data, T, ts=[3.0, 3.5, T], kink_tol=1e-2)
    h = np.random.default_rng(0).uniform(0.5, 2.0, traj.w.shape)
    traj = eqx.tree_at(lambda t: t.conditioner, traj, h)
    found = switching_surfaces(traj, model, data, band=1e-2)
    assert len(found.ts) > 0 and (found.kind == 1).any()  # it slides: both sides push on
    X, y = np.asarray(data.X), np.asarray(data.y)
    for k in range(len(found.ts)):
        s, j, i = found.save[k], found.unit[k], found.sample[k]
        assert found.ts[k] == traj.ts[s]
        W1 = traj.w[s][: WIDTH * IN].reshape(WIDTH, IN)
        z = W1[j] @ X[i]
        assert abs(z) <= 1e-2 * np.linalg.norm(W1[j]) * np.linalg.norm(X[i])
        np.testing.assert_allclose(found.z[k], z / np.linalg.norm(W1[j]) / np.linalg.norm(X[i]))
        above, below = _hand_velocities(traj.w[s], h[s], X, y, j, i)
        size = np.abs(traj.w[s]).max() * np.abs(X).max() ** 2 * len(X) * 10
        np.testing.assert_allclose([found.above[k], found.below[k]], [above, below],
                                   rtol=0, atol=1e-10 * size)
        expected = 1 if above < 0 < below else 2 if below < 0 < above else 0
        assert found.kind[k] == expected
    # Bad input: the rule, the value and the fix.
    with pytest.raises(ValueError, match="band"):
        switching_surfaces(traj, model, data, band=0.0)
    with pytest.raises(ValueError, match="batched"):
        switching_surfaces(eqx.tree_at(lambda t: t.w, traj, traj.w[None]), model, data)
    with pytest.raises(ValueError, match="momentum"):
        switching_surfaces(eqx.tree_at(lambda t: t.m, traj, np.concatenate([traj.m] * 2, -1)),
                           model, data)


def test_switching_surfaces_rejects_models_without_hyperplane_kinks():
    from marginflow.analysis import switching_surfaces

    model, data = _problem()
    traj = simulate(GradientFlow(), model, data, T, ts=[3.0, 3.5, T], kink_tol=1e-2)
    for other in (MLP(IN, WIDTH, 2, activation=2, key=jax.random.key(3)),
                  Linear(IN, key=jax.random.key(3))):
        with pytest.raises(ValueError, match="needs a ReLU or leaky-ReLU MLP"):
            switching_surfaces(traj, other, data)


def test_branch_points_need_a_sliding_surface_that_turns_repelling():
    # Read off the records alone: a pair sliding at saves k - 2 and k - 1 and repelling at
    # save k is a branch point; repelling after a crossing (the state has left the
    # surface), after one sliding save only, after a gap in the saves at which the pair was
    # examined, or with any of the three at a junction, is not.
    from marginflow.analysis import SwitchingSurfaces

    rows = [  # (save, unit, sample, kind, junction)
        (2, 0, 5, 1, 0), (3, 0, 5, 1, 0), (4, 0, 5, 2, 0),  # a branch point at ts[4]
        (3, 1, 2, 0, 0), (4, 1, 2, 2, 0),  # crossing -> repelling: none
        (3, 4, 0, 1, 0), (4, 4, 0, 2, 0),  # one sliding save: none
        (1, 2, 7, 1, 0), (2, 2, 7, 1, 0), (4, 2, 7, 2, 0),  # not examined at save 3: none
        (2, 5, 3, 1, 0), (3, 5, 3, 1, 1), (4, 5, 3, 2, 0),  # a junction on the way: none
        (2, 5, 4, 1, 1), (3, 5, 4, 1, 0), (4, 5, 4, 2, 0),  # a junction first: none
        (2, 1, 6, 1, 0), (3, 1, 6, 1, 0), (4, 1, 6, 2, 1),  # repelling at a junction: none
        (5, 0, 5, 2, 0),  # the same pair again: counted once
        (6, 3, 1, 1, 0), (7, 3, 1, 1, 0), (8, 3, 1, 2, 0),  # a later one
    ]
    save, unit, sample, kind, junction = (np.array(c) for c in zip(*rows, strict=True))
    ts = 0.1 * save
    record = SwitchingSurfaces(ts=ts, save=save, unit=unit, sample=sample, z=0 * ts,
                               above=0 * ts, below=0 * ts, kind=kind,
                               junction=junction.astype(bool), band=1e-3)
    assert record.branch_points() == [(0.4, 0, 5), (0.8, 3, 1)]
    assert record.kinds()[:3] == ["sliding", "sliding", "repelling"]


def _states_near_surfaces(model, data, rng, count):
    # Random states of `model` with three first-layer units each moved to a relative
    # distance 1e-6 (either side) or 3e-3 from the surfaces of one sample, or at odd k of
    # two samples at once (w_j moved the least distance onto both hyperplanes: a junction
    # where the state slides on or is repelled by both), so that the band 1e-3 takes some
    # triples in and leaves some out.
    import equinox as eqx
    from marginflow.models import flatten, unflatten

    X = np.asarray(data.X).reshape(len(data), -1)
    w0 = np.asarray(flatten(model))
    states = []
    for k in range(count):
        model_k = unflatten(model, jnp.asarray(w0 + 0.3 * rng.standard_normal(w0.shape)))
        W1 = np.array(model_k.weights[0])
        for j in rng.choice(W1.shape[0], 3, replace=False):
            Xs = X[rng.choice(len(X), 1 + (k % 2), replace=False)]
            off = rng.choice([1e-6, -1e-6, 3e-3], len(Xs))
            target = off * np.linalg.norm(W1[j]) * np.linalg.norm(Xs, axis=1)
            W1[j] += Xs.T @ np.linalg.solve(Xs @ Xs.T, target - Xs @ W1[j])
        model_k = eqx.tree_at(lambda m: m.weights[0], model_k, jnp.asarray(W1))
        states.append(np.asarray(flatten(model_k)))
    return np.stack(states)


@pytest.mark.parametrize("activation, out_dim, depth, loss", [
    ("leaky_relu", 3, 3, None), ("relu", 1, 2, None), ("relu", 1, 2, "logistic")])
def test_switching_surfaces_finds_every_triple_in_the_band_with_its_own_sides_field(
        activation, out_dim, depth, loss):
    # On a synthetic record (states put near surfaces by hand, a random positive
    # conditioner): the triples found are exactly {(k, j, i): |z| <= band |w_j| |x_i|},
    # counted here directly; on the state's own side of its surface the velocity read is
    # the real model's, -<h_j * (grad L)_j, x_i> by autodiff at the state, to rounding
    # (1e-10 of the largest term: the same function differentiated, in float64); kind and
    # junction follow their definitions from the velocities found. Losses: cross-entropy
    # (3 classes), exponential and logistic (binary).
    from marginflow import Trajectory
    from marginflow.analysis import switching_surfaces
    from marginflow.models import Objective, unflatten

    model = MLP(4, 6, depth, activation=activation, out_dim=out_dim, key=jax.random.key(7))
    data = separable_gaussians(12, 4, seed=7)
    if out_dim > 1:
        data = type(data)(data.X, jnp.asarray(np.arange(12) % out_dim))
    objective = Objective(model, data, loss)
    rng = np.random.default_rng(5)
    w = _states_near_surfaces(model, data, rng, 6)
    h = rng.uniform(0.5, 2.0, w.shape)
    traj = Trajectory(ts=np.arange(6.0), w=w, m=h, conditioner=h,
                      log_loss=np.array([float(objective.log_loss(jnp.asarray(v))) for v in w]),
                      I=np.zeros(6), stats={}, result="successful", message="",
                      meta={"loss": objective.loss.name, "degree": depth})
    band = 1e-3
    found = switching_surfaces(traj, model, data, band=band)
    X = np.asarray(data.X)
    expected = set()
    for k in range(6):
        W1 = np.asarray(unflatten(model, jnp.asarray(w[k])).weights[0])
        Z = W1 @ X.T
        near = np.abs(Z) <= band * np.linalg.norm(W1, axis=1)[:, None] * np.linalg.norm(X, axis=1)
        expected |= {(k, int(j), int(i)) for j, i in zip(*np.nonzero(near), strict=True)}
    got = list(zip(found.save.tolist(), found.unit.tolist(), found.sample.tolist(),
                   strict=True))
    assert set(got) == expected and len(got) == len(expected) and len(expected) >= 12
    if activation == "leaky_relu":  # checked: sliding, repelling and junction triples all
        # occur among these states, so the definitions below are exercised, not vacuous
        assert {0, 1, 2} <= set(found.kind.tolist()) and found.junction.any()
    for r, (k, j, i) in enumerate(got):
        g = np.asarray(unflatten(model, objective.grad(jnp.asarray(w[k]))).weights[0][j])
        h_j = np.asarray(unflatten(model, jnp.asarray(h[k])).weights[0][j])
        own = -(h_j * g) @ X[i]
        side = found.above[r] if found.z[r] > 0 else found.below[r]
        size = np.abs(h_j * g).max() * np.abs(X[i]).sum()
        np.testing.assert_allclose(side, own, rtol=0, atol=1e-10 * size)
        a, b = found.above[r], found.below[r]
        assert found.kind[r] == (1 if a < 0 < b else 2 if b < 0 < a else 0)
        others = [q for q, key in enumerate(got) if key[:2] == (k, j) and q != r]
        assert found.junction[r] == any(found.kind[q] != 0 for q in others)


def test_switching_surfaces_rejects_runs_with_momentum():
    # dw/dt of a momentum run is its integrated first moment, continuous across surfaces:
    # a flow's run (m1 kept), or a discrete heavy-ball or Adam (b1 > 0) run (its meta).
    from marginflow.analysis import switching_surfaces
    from marginflow.discrete import Adam, SGDMomentum, run

    model, data = _problem()
    for opt in (SGDMomentum(0.05, momentum=0.9), Adam(0.01, b1=0.9)):
        traj = run(opt, model, data, 20)
        with pytest.raises(ValueError, match="momentum"):
            switching_surfaces(traj, model, data)
    # A minibatch run follows a stochastic flow: rejected too, and named.
    traj = run(Adam(0.01), model, data, 20, batch_size=4, key=jax.random.key(0))
    with pytest.raises(ValueError, match="minibatch"):
        switching_surfaces(traj, model, data)


@pytest.mark.slow
def test_adams_flow_branches_where_an_output_weight_changes_sign():
    # The issue's problem (benchmarks/kinks_reproducibility.py --branches): Adam's flow slides
    # on unit 11's surface for sample 53 until that unit's output weight a_11 passes through
    # 0 near t = 0.097; the one-sided velocities carry the factor a_11, so the surface
    # repels from there. Checked: the branch point is found there, and a_11, read off the
    # weights independently of the classification, changes sign between the two saves.
    from marginflow.analysis import switching_surfaces
    from marginflow.models import unflatten

    model, data = _issue_problem()
    ts = np.linspace(0.07, 0.13, 61)
    traj = simulate(FLOWS["adam"], model, data, ts[-1], ts=ts)
    found = switching_surfaces(traj, model, data)
    branch = [b for b in found.branch_points() if b[1:] == (11, 53)]
    assert len(branch) == 1, found.branch_points()
    k = int(np.argmin(np.abs(ts - branch[0][0])))
    a11 = [float(unflatten(model, jnp.asarray(traj.w[s])).weights[1][0, 11]) for s in (k - 1, k)]
    assert a11[0] > 0 > a11[1], a11


@pytest.mark.parametrize("activation, out_dim, depth", [("leaky_relu", 3, 3), ("relu", 1, 2)])
def test_one_sided_fields_are_the_limits_of_the_field_from_each_side(activation, out_dim,
                                                                     depth):
    # The field switching_surfaces reads on each side of <w_j, x_i> = 0 (that activation
    # forced onto one linear piece) against autodiff of the real model at points just
    # above and just below the surface (w_j moved along x_i to z = +-delta): the same
    # linear piece there, so equal up to the O(delta) change of w. Leaky ReLU, a deeper
    # net and cross-entropy included; the other pieces stay as they are at delta 1e-7
    # (checked: no other preactivation of unit j is that close).
    from marginflow.analysis._switching import _one_sided
    from marginflow.models import Objective, flatten

    model = MLP(4, 6, depth, activation=activation, out_dim=out_dim, key=jax.random.key(7))
    data = separable_gaussians(12, 4, seed=7)
    if out_dim > 1:
        data = type(data)(data.X, jnp.asarray(np.arange(12) % out_dim))
    objective = Objective(model, data)
    w = np.asarray(flatten(model))
    X = np.asarray(data.X)
    W1 = np.asarray(model.weights[0])
    below_slope = 0.01 if activation == "leaky_relu" else 0.0
    for j, i in [(0, 0), (2, 5), (5, 11)]:
        delta = 1e-7 * np.linalg.norm(W1[j]) * np.linalg.norm(X[i])
        others = np.delete(X @ W1[j], i)
        assert np.abs(others).min() > 1e3 * delta
        sides = []
        for side in (1.0, -1.0):
            moved = w.copy()
            moved[j * 4:(j + 1) * 4] += (side * delta - W1[j] @ X[i]) * X[i] / (X[i] @ X[i])
            sides.append(moved)
        h = np.random.default_rng(j).uniform(0.5, 2.0, w.shape)
        states = jnp.asarray(np.stack([sides[0], sides[0], sides[1], sides[1]]))
        log_l, u = _one_sided(objective, states, jnp.asarray(np.stack([h] * 4)),
                              jnp.full(4, i), jnp.full(4, j),
                              jnp.asarray([1.0, below_slope] * 2))
        field = np.exp(np.asarray(log_l)) * np.asarray(u)  # dz/dt on each piece
        h_j = np.asarray(objective.unravel(jnp.asarray(h)).weights[0][j])
        exact = [-(h_j * np.asarray(objective.unravel(objective.grad(jnp.asarray(v)))
                                    .weights[0][j])) @ X[i] for v in sides]
        scale = np.abs(h_j).max() * np.abs(X[i]).sum() * max(
            np.abs(np.asarray(objective.grad(jnp.asarray(v)))).max() for v in sides)
        # log L on the state's own side is the model's.
        for q, v in ((0, sides[0]), (3, sides[1])):
            np.testing.assert_allclose(log_l[q], objective.log_loss(jnp.asarray(v)),
                                       rtol=1e-12)
        # On the state's own side: the same function, so equal to rounding.
        np.testing.assert_allclose(field[0], exact[0], rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(field[3], exact[1], rtol=0, atol=1e-12 * scale)
        # Across: the other side's field, from 2 delta away: O(delta) apart, and the jump
        # itself (the unit's normal velocity between the two sides) far above that.
        np.testing.assert_allclose(field[1], exact[1], rtol=0, atol=1e-5 * scale)
        np.testing.assert_allclose(field[2], exact[0], rtol=0, atol=1e-5 * scale)
        assert abs(exact[0] - exact[1]) > 1e-3 * scale
