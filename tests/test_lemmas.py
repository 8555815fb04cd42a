"""Property tests of the lemmas of docs/math.md section 4 along random runs (hypothesis).

Random separable data, initialisations and hyper-parameters; every flow; float64. Each
example simulates one short run (the compiled solver is shared between examples of one
flow: the data shape is fixed) and checks, after separation:
- Lemma 3: Q(t) = log gamma_tilde + L * I(t) non-decreasing (up to the solver's tolerance);
- eq. (12) pointwise at the saved states, from the vector field:
  d/dt log gamma_tilde >= -L sum_i (-1/2 d log h_i/dt)_+, with the split A + B of the
  proof of Lemma 2, A >= 0 (Lemma 19 + Cauchy-Schwarz) and B >= -L * penalty;
- Lemma 18: g(log 1/L) <= q_min and gamma_tilde <= q_min / rho^L (at every save);
- Lemma 19: <w, grad L> = -L nu (Euler) to 1e-10 relative, nu > g(x)/g'(x) L(w);
- Theorem 4: AdaGrad's h is non-increasing.
"""

from __future__ import annotations

import jax
import marginflow  # noqa: F401  (float64)
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marginflow.analysis import lemma3_terms, monotone_quantity, surrogate_margin
from marginflow.flows import AdaGradFlow, AdamFlow, GradientFlow, RMSPropFlow, simulate
from marginflow.models import Dataset, DeepLinear, Linear

# The shapes of the runs in test_analysis_trajectories (soudry_dataset: 16 points in 2-D;
# AdaGrad: 6 points in 12-D) and the same save density (4 per decade): the compiled
# solver segments are shared with those tests.
SHAPES = {"gd": (16, 2), "rmsprop": (16, 2), "adam": (16, 2), "adagrad": (6, 12)}
T1 = 1e4
TS = np.concatenate([[0.0], np.logspace(-2, 4, 25)])

FLOWS = {
    "gd": lambda eps, b: GradientFlow(),
    "adagrad": lambda eps, b: AdaGradFlow(eps),
    "rmsprop": lambda eps, b: RMSPropFlow(eps, b),
    "adam": lambda eps, b: AdamFlow(eps, b),
}


def random_data(seed: int, scale: float, n: int = 16, d: int = 2) -> Dataset:
    """n points in R^d labelled by a random hyperplane through the origin, pushed off it by
    0.3 (times `scale`)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    X = rng.normal(size=(n, d))
    y = np.where(X @ u >= 0, 1.0, -1.0)
    X = scale * (X + (0.3 * y)[:, None] * u)
    return Dataset(X, y)


def check_lemmas(flow, model, data, traj):
    L = model.degree
    sm = surrogate_margin(traj, model, data)
    # Every run here separates well before T1 (margin >= 0.3 scale, t1 = 1e4); a run that
    # does not would make monotone_quantity raise, failing the test loudly.
    mq = monotone_quantity(traj, model, data)
    i0 = mq.i0

    # Lemma 3. The saved states carry the solver's error (rtol 1e-8 relative per step on
    # (w, m)); a drop of Q beyond 100 rtol would be a real violation (measured: 0).
    assert mq.max_drop <= 100 * traj.meta["rtol"], mq.max_drop

    terms = lemma3_terms(flow, model, data, traj.ts[i0:], traj.w[i0:], traj.m[i0:])
    scale = np.abs(terms.A) + np.abs(terms.B) + L * terms.penalty_rate
    # The split is an identity: autodiff along the field equals A + B up to rounding
    # (each term is computed to ~1e-15 relative; 1e-9 of their magnitudes is generous).
    np.testing.assert_array_less(
        np.abs(terms.A + terms.B - terms.dlog_gamma_tilde), 1e-9 * scale + 1e-300
    )
    # eq. (12) pointwise, A >= 0 and B >= -L * penalty: exact inequalities, rounding only.
    assert np.all(terms.dlog_gamma_tilde >= -L * terms.penalty_rate - 1e-12 * scale)
    assert np.all(terms.A_over_loss >= -1e-12 * np.abs(terms.A_over_loss).max())
    assert np.all(terms.cauchy_schwarz_gap >= -1e-14)
    assert np.all(terms.B >= -L * terms.penalty_rate - 1e-12 * scale)

    # Lemma 18, at every save (before and after separation): exact inequalities.
    q_min = terms.q_min
    assert np.all(sm.g_value[i0:] <= q_min + 1e-12 * np.abs(q_min))
    assert np.all(sm.gamma_tilde[i0:] <= (q_min + 1e-12 * np.abs(q_min)) / sm.rho[i0:] ** L)

    # Lemma 19 (Euler's identity): <w, grad L> = -L nu, both divided by L(w).
    lhs, rhs = terms.euler_lhs_over_loss, -L * terms.nu_over_loss
    np.testing.assert_array_less(np.abs(lhs - rhs), 1e-10 * np.abs(rhs))
    # ... and nu > g(x)/g'(x) L(w) once all q_i > 0 (strict: N >= 2 samples).
    assert np.all(terms.nu_over_loss > terms.g_over_gprime)
    return terms


@pytest.mark.parametrize("flow_name", sorted(FLOWS))
@settings(max_examples=2, deadline=None, derandomize=True)
@given(
    data_seed=st.integers(0, 10_000),
    init_seed=st.integers(0, 10_000),
    scale=st.floats(0.3, 3.0),
    log_eps=st.floats(-7.0, -1.0),
    b=st.floats(0.5, 0.99),
)
def test_lemmas_along_random_linear_runs(flow_name, data_seed, init_seed, scale, log_eps, b):
    n, d = SHAPES[flow_name]
    data = random_data(data_seed, scale, n, d)
    model = Linear(d, key=jax.random.key(init_seed))
    flow = FLOWS[flow_name](10.0**log_eps, b)
    traj = simulate(flow, model, data, T1, ts=TS)
    check_lemmas(flow, model, data, traj)
    if flow_name == "adagrad":
        h = traj.h()
        # Theorem 4: dm/dt = g^2 >= 0, so h is non-increasing; 1e-8 relative covers the
        # solver's error on the saved m.
        assert np.all(h[1:] <= h[:-1] * (1 + 1e-8))


@pytest.mark.parametrize("flow", [RMSPropFlow(1e-2, 0.9, eps_placement="outside"),
                                  AdamFlow(1e-2, 0.9, eps_placement="outside")], ids=repr)
def test_lemmas_late_with_eps_outside_the_root(flow):
    """To t = 1e8 the saved m falls below the solver's resolution and undershoots 0 (to
    -9e-13 here): with eps outside the root, sqrt(m) once made A, B and rho NaN at 9 of
    39 separated saves, and autodiff through h an infinite rate where m was clipped to 0."""
    data = random_data(8, 1.0, 10, 3)
    model = Linear(3, key=jax.random.key(2))
    traj = simulate(flow, model, data, 1e8, n_save=50)
    terms = check_lemmas(flow, model, data, traj)
    assert np.all(np.isfinite(terms.A)) and np.all(np.isfinite(terms.dlog_gamma_tilde))
    last = lemma3_terms(flow, model, data, traj)
    assert np.isfinite(last.A) and np.isfinite(last.dlog_gamma_tilde)


@pytest.mark.slow
@settings(max_examples=3, deadline=None, derandomize=True)
@given(
    data_seed=st.integers(0, 10_000),
    init_seed=st.integers(0, 10_000),
    log_eps=st.floats(-6.0, -2.0),
)
def test_lemmas_along_random_deep_linear_runs(data_seed, init_seed, log_eps):
    # Degree L = 2: the factor L in eq. (12), Lemma 19 and gamma_tilde = g / rho^L matters.
    # (Slow: one more compilation; the default run checks L = 2 at arbitrary states below.)
    data = random_data(data_seed, 1.0)
    model = DeepLinear([2, 3, 1], key=jax.random.key(init_seed))
    flow = RMSPropFlow(10.0**log_eps, 0.9)
    check_lemmas(flow, model, data, simulate(flow, model, data, T1, ts=TS))


def separating_direction(data):
    X, y = np.asarray(data.X), np.asarray(data.y)
    u = np.linalg.lstsq(X * y[:, None], np.ones(len(y)), rcond=None)[0]
    return u / np.linalg.norm(u)


def random_states(seed: int, degree: int, k: int = 32):
    """k separating states (t, w, m) of a Linear (degree 1) or DeepLinear([2, 3, 1]) (degree
    2) model on random_data(seed, 1.0), with m spread over 20 decades."""
    rng = np.random.default_rng(seed)
    data = random_data(seed, 1.0)
    # The least-squares direction u has y_i <u, x_i> ~ 1 > 0 on this well-separated data;
    # an end-to-end map c (u + small noise) keeps every q_i > 0 and makes L small enough
    # that g(log 1/L) > 0 (checked below, not assumed).
    u = separating_direction(data)
    c = rng.uniform(20.0, 60.0, size=(k, 1))
    end = c * (u + 0.05 * rng.normal(size=(k, 2)))
    if degree == 1:
        w = end
        model = Linear(2, key=jax.random.key(0))
    else:
        # DeepLinear weights (W1 (3x2), W2 (1x3)) flattened in that order, with W2 W1 = end:
        # W2 = end pinv(W1) (W1 has full column rank almost surely).
        model = DeepLinear([2, 3, 1], key=jax.random.key(0))
        W1 = rng.normal(size=(k, 3, 2))
        W2 = np.einsum("kj,kji->ki", end, np.linalg.pinv(W1))
        w = np.concatenate([W1.reshape(k, 6), W2], axis=1)
    m = np.exp(rng.uniform(-20.0, 2.0, size=w.shape))
    t = np.exp(rng.uniform(np.log(1e-2), np.log(1e3), size=k))
    return model, data, t, w, m


@pytest.mark.parametrize(
    "flow_name,degree", [("adagrad", 1), ("rmsprop", 1), ("adam", 1), ("rmsprop", 2)]
)
@settings(max_examples=3, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), log_eps=st.floats(-7.0, -1.0), b=st.floats(0.5, 0.99))
def test_eq12_pointwise_at_arbitrary_separated_states(flow_name, degree, seed, log_eps, b):
    # The split of Lemma 2's proof holds at ANY separated state, not only along a run: with
    # m far from its equilibrium, h moves fast and B is strongly negative, the regime in
    # which eq. (12) is tight (along the runs above d/dt log gamma_tilde stayed > 0).
    model, data, t, w, m = random_states(seed, degree)
    flow = FLOWS[flow_name](10.0**log_eps, b)
    all_terms = lemma3_terms(flow, model, data, t, w, m)
    # The lemmas are statements after separation: keep the separated states. With c >= 20
    # and 5% noise nearly all are (q_min ~ c y<u,x> >= 5); demand most, so that the test
    # cannot pass by checking nothing.
    sel = all_terms.g_value > 0
    assert sel.mean() >= 0.75
    terms = jax.tree.map(lambda a: a[sel], all_terms)
    L = degree
    scale = np.abs(terms.A) + np.abs(terms.B) + L * terms.penalty_rate
    np.testing.assert_array_less(
        np.abs(terms.A + terms.B - terms.dlog_gamma_tilde), 1e-9 * scale + 1e-300
    )
    assert np.all(terms.dlog_gamma_tilde >= -L * terms.penalty_rate - 1e-12 * scale)
    assert np.all(terms.A >= 0.0) and np.all(terms.B >= -L * terms.penalty_rate - 1e-12 * scale)
    lhs, rhs = terms.euler_lhs_over_loss, -L * terms.nu_over_loss
    np.testing.assert_array_less(np.abs(lhs - rhs), 1e-10 * np.abs(rhs))
    assert np.all(terms.nu_over_loss > terms.g_over_gprime)
    assert np.all(terms.g_value <= terms.q_min * (1 + 1e-12))


def test_eq12_is_not_vacuous():
    # RMSProp with m = 0 and a large gradient: dm/dt = (1 - b) g^2 > 0, h falls at the rate
    # (1 - b) g^2 / (2 eps) per coordinate, and d/dt log gamma_tilde < 0: the penalty term
    # of eq. (12) is needed (without it the inequality would fail here).
    data = random_data(1, 1.0)
    w = 10.0 * separating_direction(data)  # separated: q_min ~ 5, L(w) ~ 0.05
    flow = RMSPropFlow(1e-8, 0.9)
    terms = lemma3_terms(flow, Linear(2, key=jax.random.key(0)), data, 1.0, w, np.zeros(2))
    assert terms.g_value > 0
    assert terms.dlog_gamma_tilde < 0
    assert terms.dlog_gamma_tilde >= -terms.penalty_rate


@pytest.mark.parametrize("placement", ["inside", "outside"])
def test_lemma3_terms_read_a_discrete_adagrad_run_on_the_flows_scale(placement):
    """A discrete AdaGrad run saves S_k; the matching flow's m is lr^2 S_k and its h is
    h_k / lr (the dictionary, docs/math.md section 5). lemma3_terms on the Trajectory read
    m = S_k as the flow's m: rho was sqrt(lr) times too large (62.9 against 19.9 on the
    toy). rho = sqrt(sum w^2 / h) is checked against h_k / lr, from the saved h_k."""
    from marginflow.discrete import AdaGrad, run
    from marginflow.models import ToyLeaky, toy_dataset

    lr = 0.1
    model, data = ToyLeaky(key=jax.random.PRNGKey(0)), toy_dataset(0)
    traj = run(AdaGrad(lr, eps=1e-5, eps_placement=placement), model, data, 300)
    terms = lemma3_terms(traj.flow(), model, data, traj)
    w, h_k = traj.w[-1], traj.h()[-1]
    expected = np.sqrt(np.sum(w**2 / (h_k / lr)))
    # h from the flow's m and eps against h_k / lr: the same root, two roundings apart.
    assert terms.rho == pytest.approx(expected, rel=1e-12)
