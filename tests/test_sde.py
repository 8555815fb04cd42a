"""`flows.simulate_sde`: the SDE minibatch SGD follows, against exact enumeration and against
minibatch runs.

The problem: a 2-parameter linear model on 16 separable Gaussian points, the logistic
loss (its per-sample gradients are bounded: with the exponential loss a Gaussian increment
that pushes a margin far below 0 meets an exponentially growing gradient, and 1 of 4096
Euler-Maruyama paths at eta = 0.2 overflowed), batches of B = 4 drawn without replacement
afresh at each step (`run(..., sampling="independent")`), flow time t = k eta B / N,
compared at T = 5.
"""

from __future__ import annotations

import functools
import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import marginflow  # noqa: F401  (float64)
import numpy as np
import pytest
from marginflow.discrete import GD, run
from marginflow.flows import AdamFlow, GradientFlow, RMSPropFlow, simulate, simulate_sde
from marginflow.flows._sde import _diffusion, _noise, _noise_scale
from marginflow.models import Dataset, Linear, Objective, separable_gaussians

N, B, T = 16, 4, 5.0
# Monte Carlo: 4096 paths and runs put the standard error of a mean of log L at ~3e-4 and
# of a variance at sqrt(2 / 4096) = 2.2% relative, below the effects measured here (weak
# errors 4e-3 to 2e-2 over eta = 0.05..0.2); the default run's variance check uses 1024
# (4.4%), the slope and the scaling rule (-m slow) 4096.
P = 4096
P_QUICK = 1024
ETAS = (0.2, 0.1, 0.05)


def problem():
    return Linear(2, key=jax.random.key(0)), separable_gaussians(N, 2, seed=0)


@functools.cache
def statistics(eta: float, batch: int = B, T: float = T, P: int = P,
               brownian: str = "increments"):
    """(SDE, minibatch runs, flow): each (log L(T), ||w(T)||) per path / run. The many
    paths of the slow checks use independent increments (6x cheaper than the tree)."""
    model, data = problem()
    sde = simulate_sde(GradientFlow(), model, data, T, batch_size=batch, eta=eta,
                       key=jax.random.key(1), n_paths=P, ts=[T], loss="logistic",
                       brownian=brownian)
    assert sde.success, sde.message
    steps = round(T * N / (eta * batch))
    assert abs(steps * eta * batch / N - T) < 1e-9  # the runs end exactly at T
    models = eqx.filter_vmap(lambda k: problem()[0])(jax.random.split(jax.random.key(0), P))
    disc = run(GD(eta), models, data, steps, batch_size=batch, sampling="independent",
               key=jax.random.split(jax.random.key(2), P), batch=True, save_every=steps,
               loss="logistic")
    flow = simulate(GradientFlow(), model, data, T, ts=[T], loss="logistic")

    def stats(log_loss, w):
        return np.asarray(log_loss)[:, -1], np.linalg.norm(np.asarray(w)[:, -1], axis=-1)

    return (stats(sde.log_loss, sde.w), stats(disc.log_loss, disc.w),
            (float(flow.log_loss[-1]), float(np.linalg.norm(flow.w[-1]))))


def test_the_noise_is_the_covariance_of_one_minibatch_step_by_enumeration():
    # sigma sigma^T dt (dt = eta B / N, sigma the diffusion operator as a p x N matrix)
    # against eta^2 Cov(g_B) over all C(N, B) batches, listed: Cochran's formula and the
    # VJP form of G^T dW, checked exactly (to rounding).
    model, data = Linear(3, key=jax.random.key(3)), separable_gaussians(7, 3, seed=4)
    obj = Objective(model, data)
    w, eta, b = obj.w0(), 0.3, 2
    per_sample = np.asarray(jax.jacrev(lambda v: jnp.exp(obj.log_terms(v)))(w))  # (N, p)
    batches = [np.sum(per_sample[list(c)], axis=0) for c in itertools.combinations(range(7), b)]
    exact = eta**2 * np.cov(np.array(batches).T, bias=True)
    args = (obj, _noise_scale(7, b, eta), jnp.asarray(False))
    sigma = np.stack([np.asarray(_noise(0.0, w, args, e)) for e in np.eye(7)], axis=1)
    # and the operator over paths applies it path by path
    op = _diffusion(0.0, jnp.stack([w, 2 * w]), args)
    dW = jax.random.normal(jax.random.key(6), (2, 7))
    np.testing.assert_allclose(op.mv(dW)[1], _noise(0.0, 2 * w, args, dW[1]), rtol=1e-14)
    np.testing.assert_allclose(sigma @ sigma.T * (eta * b / 7), exact, rtol=1e-12, atol=1e-15)


def test_in_log_time_the_noise_is_rescaled_by_sqrt_t():
    # dW_t = sqrt(t) dW_u and dt = t du: the u-form's operator is e^{u/2} times the t-form's.
    model, data = problem()
    obj = Objective(model, data)
    w, u = obj.w0() * 3.0, 2.5
    dW = jax.random.normal(jax.random.key(5), (N,))
    in_t = _noise(np.exp(u), w, (obj, 0.7, jnp.asarray(False)), dW)
    in_u = _noise(u, w, (obj, 0.7, jnp.asarray(True)), dW)
    np.testing.assert_allclose(in_u, np.exp(u / 2) * in_t, rtol=1e-13)


@pytest.mark.parametrize("eta", [0.2, pytest.param(0.05, marks=pytest.mark.slow)])
def test_paths_have_the_variance_of_minibatch_runs_which_the_flow_lacks(eta):
    # The flow has no spread: its error on Var is Var itself. The SDE's is O(eta) relative:
    # measured |ratio - 1| <= 0.035 over eta = 0.05..0.2 at P = 4096, within its Monte
    # Carlo error. Bound: 0.3 eta plus 4 Monte Carlo standard errors of the ratio of two
    # variance estimates (4 sqrt(2 * 2 / P) = 0.125): 0.185 at eta = 0.2, so a noise off by
    # Cochran's factor (N - B) / (N - 1) = 0.8 in variance, or by 1.25, fails it.
    (l_s, n_s), (l_d, n_d), _ = statistics(eta)
    for s, d in ((l_s, l_d), (n_s, n_d)):
        rel = abs(s.var() / d.var() - 1.0)
        assert rel <= 0.3 * eta + 4 * np.sqrt(4 / P), (eta, s.var(), d.var())


@pytest.mark.slow
def test_the_tree_and_the_increments_give_the_same_statistics():
    # The default Brownian tree against independent increments (the paths above): both
    # are Brownian motions, so over 1024 paths their variances agree within 4 Monte Carlo
    # standard errors of the ratio (4 sqrt(4 / 1024) = 0.25).
    (l_t, n_t), _, _ = statistics(0.2, P=P_QUICK, brownian="tree")
    (l_i, n_i), _, _ = statistics(0.2, P=P_QUICK)
    for a, b in ((l_t, l_i), (n_t, n_i)):
        assert abs(a.var() / b.var() - 1.0) <= 4 * np.sqrt(4 / P_QUICK), (a.var(), b.var())


@pytest.mark.slow
def test_the_weak_error_falls_at_first_order():
    # |E_sde f - E_runs f| for f = log L(T) and ||w(T)||, over eta = 0.2, 0.1, 0.05: the
    # fitted log-log slope must lie in [0.8, 1.2] (first order, Li, Tai and E). The Monte
    # Carlo error of each difference (~4e-4, measured weak errors 4e-3 and up) moves the
    # slope by ~0.05.
    for k in (0, 1):
        errs = []
        for eta in ETAS:
            s, d, _ = statistics(eta)
            errs.append(abs(s[k].mean() - d[k].mean()))
        slope = np.polyfit(np.log(ETAS), np.log(errs), 1)[0]
        assert 0.8 <= slope <= 1.2, (k, errs, slope)


@pytest.mark.slow
def test_the_scaling_rule_keeps_the_sde_and_the_statistics():
    # On the sum loss, runs at (B, eta) and (kappa B, eta') with eta' (N - kappa B) =
    # eta (N - B) have the same SDE: drift -grad L in t = k eta B / N, noise
    # eta (N - B) / (N - 1) G^T G (the mean-loss linear scaling rule, lr proportional to B,
    # with Cochran's finite-population factor). So their statistics at T agree up to the
    # weak error O(eta): the variances within 1.5 eta' + 4 MC errors, as above.
    eta, kappa, T_ = 0.05, 2, 4.5  # 360 and 120 steps
    eta2 = eta * (N - B) / (N - kappa * B)
    assert _noise_scale(N, B, eta) == pytest.approx(_noise_scale(N, kappa * B, eta2))
    (l_1, n_1), (l_d1, n_d1), _ = statistics(eta, B, T_)
    (l_2, n_2), (l_d2, n_d2), _ = statistics(eta2, kappa * B, T_)
    for a, b in ((l_d1, l_d2), (n_d1, n_d2), (l_1, l_2)):
        assert abs(a.var() / b.var() - 1.0) <= 1.5 * eta2 + 4 * np.sqrt(4 / P), (a.var(),
                                                                                  b.var())


def test_a_full_batch_has_no_noise_and_follows_the_flow():
    model, data = problem()
    sde = simulate_sde(GradientFlow(), model, data, 1.0, batch_size=N, eta=0.01,
                       key=jax.random.key(0), n_paths=3, ts=[0.5, 1.0])
    flow = simulate(GradientFlow(), model, data, 1.0, ts=[0.5, 1.0])
    assert np.all(sde.w == sde.w[:1])  # no noise: the paths are one
    # Euler-Maruyama at dt = eta / 4 (weak order 1): within 5 dt relative of the flow
    np.testing.assert_allclose(sde.w[0], flow.w, rtol=5 * 0.01 / 4)


def test_paths_are_fixed_by_the_key_and_a_finer_grid_refines_them():
    # The Brownian tree is a function of the key: the same call gives the same paths, and
    # a 4x finer grid (substeps 16) gives nearly the same paths (Euler-Maruyama converges
    # pathwise), much closer to them than paths of another key are.
    model, data = problem()
    kw = dict(batch_size=2, eta=0.1, ts=[0.5, 1.0], n_paths=16)
    a = simulate_sde(GradientFlow(), model, data, 1.0, key=jax.random.key(7), **kw)
    b = simulate_sde(GradientFlow(), model, data, 1.0, key=jax.random.key(7), **kw)
    np.testing.assert_array_equal(a.w, b.w)
    assert a.meta["kind"] == "sde" and a.w.shape == (16, 2, 2) and a.log_loss.shape == (16, 2)
    fine = simulate_sde(GradientFlow(), model, data, 1.0, key=jax.random.key(7), substeps=16,
                        **kw)
    other = simulate_sde(GradientFlow(), model, data, 1.0, key=jax.random.key(8), **kw)
    refined = np.mean(np.linalg.norm(fine.w[:, -1] - a.w[:, -1], axis=-1))
    apart = np.mean(np.linalg.norm(other.w[:, -1] - a.w[:, -1], axis=-1))
    assert refined < 0.3 * apart, (refined, apart)


@pytest.mark.parametrize("bad, err, match", [
    ({"flow": AdamFlow(bias_correction="paper")}, ValueError, "bias_correction='paper'"),
    ({"flow": "gd"}, TypeError, "`flow` must be a marginflow flow"),
    ({"exact_steps": 4}, ValueError, "`exact_steps` is for the adaptive flows"),
    ({"flow": RMSPropFlow(), "exact_steps": -1}, ValueError, "exact_steps"),
    ({"flow": RMSPropFlow(), "ts": [0.05]}, ValueError, "must be multiples of eta"),
    ({"batch_size": N + 1}, ValueError, "at most the number of samples"),
    ({"eta": True}, TypeError, "`eta` must be a real number"),
    ({"eta": -0.1}, ValueError, "`eta` must be a finite number > 0"),
    ({"t1": "5"}, TypeError, "`t1` must be a real number"),
    ({"ts": [0.0, 1.0]}, ValueError, "save times in"),
    ({"brownian": "fast"}, ValueError, "`brownian` must be"),
])
def test_bad_input_is_refused_by_name(bad, err, match):
    model, data = problem()
    kw = dict(flow=GradientFlow(), t1=1.0, batch_size=2, eta=0.1, key=jax.random.key(0),
              n_paths=2) | bad
    with pytest.raises(err, match=match):
        simulate_sde(kw.pop("flow"), model, data, kw.pop("t1"), **kw)


def _three_classes():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(12, 2))
    y = np.argmax(X @ rng.normal(size=(3, 2)).T, axis=1).astype(np.int32)  # separable
    return Linear(2, out_dim=3, key=jax.random.key(0)), Dataset(X, y)


def test_multiclass_paths_without_noise_are_the_flow_and_the_run():
    """Cross-entropy on 3 classes (integer labels, which the SDE once cast to floats and
    could not index with: the noise is traced at B = N too, scaled by 0). Full batch: no
    noise, Euler at dt = eta / 4 within 5 dt of the flow, and RMSProp's paths are its
    matching run exactly."""
    from marginflow.discrete import matching_optimizer

    model, data = _three_classes()
    full = simulate_sde(GradientFlow(), model, data, 1.0, batch_size=12, eta=0.01,
                        key=jax.random.key(0), n_paths=2, ts=[0.5, 1.0])
    flow = simulate(GradientFlow(), model, data, 1.0, ts=[0.5, 1.0])
    assert np.all(full.w == full.w[:1])
    np.testing.assert_allclose(full.w[0], flow.w, rtol=5 * 0.01 / 4)
    rms = RMSPropFlow(1e-5, 0.9)
    paths = simulate_sde(rms, model, data, 0.5, batch_size=12, eta=0.05,
                         key=jax.random.key(0), n_paths=2, ts=[0.5])
    disc = run(matching_optimizer(rms, 0.05), model, data, 10, save_every=10)
    np.testing.assert_allclose(paths.w[0, -1], disc.w[-1], rtol=1e-12, atol=1e-14)


@pytest.mark.slow
def test_multiclass_paths_have_the_variance_of_minibatch_runs():
    """B = 4 on the 3 classes: the variance bound of the binary test above (0.3 eta + 4
    Monte Carlo errors, 0.31 at P = 1024; measured 0.99). -m slow (6 s of compiling): the
    noise is built from the per-sample gradients of log ell_i whatever the loss, and the
    binary test checks its statistics in the default run."""
    model, data = _three_classes()
    eta, steps = 0.2, 30  # t = k eta B / N = 2
    sde = simulate_sde(GradientFlow(), model, data, 2.0, batch_size=4, eta=eta,
                       key=jax.random.key(1), n_paths=P_QUICK, ts=[2.0],
                       brownian="increments")
    models = eqx.filter_vmap(lambda k: _three_classes()[0])(
        jax.random.split(jax.random.key(0), P_QUICK))
    runs = run(GD(eta), models, data, steps, batch_size=4, sampling="independent",
               key=jax.random.split(jax.random.key(2), P_QUICK), batch=True, save_every=steps)
    ratio = np.asarray(sde.log_loss)[:, -1].var() / np.asarray(runs.log_loss)[:, -1].var()
    assert abs(ratio - 1.0) <= 0.3 * eta + 4 * np.sqrt(4 / P_QUICK), ratio
