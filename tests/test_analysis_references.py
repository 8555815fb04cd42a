"""Exact max-margin references, checked independently of how they were computed.

The L2 solution is certified by weak duality: for min 1/2||w||^2 s.t. A w >= 1 every
alpha >= 0 gives the dual value D(alpha) = sum(alpha) - 1/2 ||A^T alpha||^2 <= the optimum,
so a feasible w with w = A^T alpha, alpha >= 0 and sum(alpha) = ||w||^2 (zero duality
gap) is optimal. The L-infinity solution is certified the same way with the LP dual
max sum(mu) s.t. ||A^T mu||_1 <= 1, mu >= 0. These checks use only numpy on the returned
arrays, not the solver's own KKT report.
"""

from __future__ import annotations

import jax
import marginflow  # noqa: F401  (float64)
import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st
from marginflow.analysis import angle, max_margin_linear, normalized_margin, toy_max_margin
from marginflow.models import Dataset, Linear, ToyLeaky, soudry_dataset, toy_dataset

# Rounding in the refinement's linear algebra is ~1e-15 per entry on these O(1) problems;
# 1e-10 leaves room for conditioning and still demands far more than the 1e-9 the API
# promises for the margin.
TIGHT = 1e-10


def random_separable(seed: int, n: int, d: int, gap: float = 0.2):
    """Points with labels of a random hyperplane through the origin, a margin >= gap."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    X = rng.normal(size=(n, d))
    y = np.where(X @ u >= 0, 1.0, -1.0)
    X += (y * gap)[:, None] * u  # push every point away from the hyperplane
    return X, y


def certify_l2(A, w, alpha):
    """The weak-duality certificate of min 1/2||w||^2 s.t. A w >= 1 (module docstring)."""
    assert np.min(A @ w) >= 1.0 - TIGHT, "primal infeasible"
    assert np.min(alpha) >= 0.0, "negative multiplier"
    nw2 = float(w @ w)
    assert np.linalg.norm(w - A.T @ alpha) <= TIGHT * np.sqrt(nw2), "w != A^T alpha"
    assert abs(alpha.sum() - nw2) <= TIGHT * nw2, "duality gap"


def test_soudry_l2_is_the_constructed_direction():
    # soudry_dataset is built so that (1,1)/sqrt(2) is the unique L2 max-margin direction
    # with margin sqrt(2) (support vectors (0.5, 1.5), (1.5, 0.5)): an exact reference.
    data = soudry_dataset(0)
    res = max_margin_linear(data.X, data.y)
    u = np.ones(2) / np.sqrt(2)
    assert np.linalg.norm(res.direction - u) <= 1e-12
    assert abs(res.margin - np.sqrt(2)) <= 1e-12
    assert res.verified
    assert set(res.support.tolist()) == {0, 1, 2, 3}
    certify_l2(np.asarray(data.y)[:, None] * np.asarray(data.X), res.w, res.multipliers)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000), n=st.integers(3, 40), d=st.integers(2, 12), weighted=st.booleans()
)
def test_l2_max_margin_is_certified_optimal(seed, n, d, weighted):
    X, y = random_separable(seed, n, d)
    weights = None
    if weighted:
        weights = np.exp(np.random.default_rng(seed + 1).uniform(-1.5, 1.5, size=d))
    res = max_margin_linear(X, y, weights=weights)
    s = np.ones(d) if weights is None else weights
    # In v = s * w the weighted problem is the plain one with rows a_c / s.
    A = (y[:, None] * X) / s
    certify_l2(A, s * res.w, res.multipliers)
    assert abs(res.margin - 1.0 / np.linalg.norm(s * res.w)) <= 1e-12 * res.margin
    assert abs(np.linalg.norm(res.direction) - 1.0) <= 1e-12


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(3, 30), d=st.integers(2, 8))
def test_linf_max_margin_is_certified_optimal(seed, n, d):
    X, y = random_separable(seed, n, d)
    res = max_margin_linear(X, y, norm="linf")
    A = y[:, None] * X
    t = np.max(np.abs(res.w))
    mu = res.multipliers
    assert np.min(A @ res.w) >= 1.0 - TIGHT
    assert np.min(mu) >= 0.0
    # dual feasibility ||A^T mu||_1 <= 1 and zero gap sum(mu) = t prove optimality.
    assert np.sum(np.abs(A.T @ mu)) <= 1.0 + TIGHT
    assert abs(mu.sum() - t) <= TIGHT * t
    assert abs(res.margin - 1.0 / t) <= 1e-12 * res.margin


def test_multiclass_l2_against_the_model_margin():
    # Three classes in R^3 around orthogonal means: separable by W = I with margins >= 1.
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 5).astype(np.int32)
    X = 3.0 * np.eye(3)[y] + 0.3 * rng.normal(size=(15, 3))
    res = max_margin_linear(X, y)
    assert res.verified
    # Pairwise rows (e_{y_i} - e_j) (x) x_i, built here independently of the library.
    rows = []
    for i in range(15):
        for j in range(3):
            if j != y[i]:
                a = np.zeros((3, 3))
                a[y[i]] += X[i]
                a[j] -= X[i]
                rows.append(a.ravel())
    certify_l2(np.asarray(rows), res.w, res.multipliers)
    model = Linear(3, out_dim=3, key=jax.random.key(0))
    gam = normalized_margin(model, Dataset(X, y), res.w)
    assert abs(gam - res.margin) <= 1e-9 * res.margin


def test_problems_P_and_PA_differ_when_N_below_d():
    # docs/math.md section 3: with N < d the weighted and unweighted solutions differ (26-37
    # degrees measured on 6 points in 12 dimensions); with as many support vectors as
    # dimensions (and the same support set) they coincide. Both facts are checked.
    X, y = random_separable(7, 6, 12)
    weights = np.exp(np.random.default_rng(8).uniform(-1.0, 1.0, size=12))
    p = max_margin_linear(X, y)
    pa = max_margin_linear(X, y, weights=weights)
    assert angle(p.direction, pa.direction) > 0.05
    # Each is the max-min normalised margin in its own norm, evaluated by the model code
    # (Linear, normalized_margin) rather than by the constraint rows: each solution beats
    # the other in its own norm.
    model, data = Linear(12, key=jax.random.key(0)), Dataset(X, y)
    assert abs(normalized_margin(model, data, p.w) - p.margin) <= 1e-9 * p.margin
    gamma_a = normalized_margin(model, data, pa.w, weights=weights)
    assert abs(gamma_a - pa.margin) <= 1e-9 * pa.margin
    assert normalized_margin(model, data, pa.w) < p.margin
    assert normalized_margin(model, data, p.w, weights=weights) < pa.margin
    # soudry: support vectors (0.5, 1.5), (1.5, 0.5) pin w = (0.5, 0.5) by a.w = 1; with
    # weights (1.1, 0.9) its multipliers stay positive (s^2 w = A_S^T alpha gives alpha =
    # (0.1525, 0.3525)), so the weighted solution is the same point.
    data = soudry_dataset(0)
    p2 = max_margin_linear(data.X, data.y)
    pa2 = max_margin_linear(data.X, data.y, weights=np.array([1.1, 0.9]))
    assert angle(p2.direction, pa2.direction) <= 1e-12


def toy_brute_force(X, y, positive_branch: bool):
    """1/2 max_theta min(...) of docs/math.md section 6 by a scan of 2e5 angles + a local refine."""
    pos, neg = X[y > 0], X[y < 0]

    def inner(phi):
        u = np.array([np.cos(phi), np.sin(phi)])
        if positive_branch:
            return min(np.min(pos @ u), np.min(-(neg @ u)) / 2)
        return min(np.min(-(neg @ u)), np.min(pos @ u) / 2)

    grid = np.linspace(-np.pi, np.pi, 200_001)
    U = np.stack([np.cos(grid), np.sin(grid)])
    if positive_branch:
        vals = np.minimum(np.min(pos @ U, axis=0), np.min(-(neg @ U), axis=0) / 2)
    else:
        vals = np.minimum(np.min(-(neg @ U), axis=0), np.min(pos @ U, axis=0) / 2)
    k = int(np.argmax(vals))
    step = grid[1] - grid[0]
    opt = scipy.optimize.minimize_scalar(
        lambda p: -inner(p),
        bounds=(grid[k] - step, grid[k] + step),
        method="bounded",
        options={"xatol": 1e-13},
    )
    return 0.5 * max(vals[k], -opt.fun)


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 1000))
def test_toy_gamma_star_against_angle_scan_and_model(seed):
    data = toy_dataset(seed)
    X, y = np.asarray(data.X), np.asarray(data.y)
    ref = toy_max_margin(data)
    # The scan's grid step is 3e-5 rad; the bounded refine converges to 1e-13 rad around the
    # (kinked) maximum, where the objective is Lipschitz with constant max|x| < 2: the
    # scan is then accurate to ~1e-12.
    assert abs(ref.gamma_plus - toy_brute_force(X, y, True)) <= 1e-9
    assert abs(ref.gamma_minus - toy_brute_force(X, y, False)) <= 1e-9
    # The returned parameters (v, w) attain gamma* in the model's own margin code, on each
    # branch, and select their branch by sign(v).
    model = ToyLeaky(key=jax.random.key(0))
    for theta, gam in ((ref.theta_plus, ref.gamma_plus), (ref.theta_minus, ref.gamma_minus)):
        assert abs(np.linalg.norm(theta) - 1.0) <= 1e-12
        assert abs(normalized_margin(model, data, theta) - gam) <= 1e-12
        assert ref.gamma_for(theta) == gam


def test_angle_is_accurate_for_tiny_angles():
    # arccos(<a^, b^>) returns 0 here (1 - 5e-21 rounds to 1); the reference is
    # atan(1e-10) = 1e-10 - 3e-31.
    assert abs(angle(np.array([1.0, 0.0]), np.array([1.0, 1e-10])) - 1e-10) <= 1e-22
    assert angle(np.array([1.0, 2.0]), np.array([-2.0, -4.0])) == pytest.approx(np.pi, abs=1e-15)
    a = np.random.default_rng(0).normal(size=(5, 3))
    b = np.random.default_rng(1).normal(size=(5, 3))
    cos = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    np.testing.assert_allclose(angle(a, b), np.arccos(cos), rtol=1e-12)


def test_reference_errors_name_the_rule():
    with pytest.raises(ValueError, match="not linearly separable"):
        max_margin_linear(np.array([[1.0, 0.0], [1.0, 0.0]]), np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="`norm` must be 'l2' or 'linf'"):
        max_margin_linear(np.eye(2), np.array([1.0, -1.0]), norm="l1")
    with pytest.raises(ValueError, match="`weights` must be a finite positive vector"):
        max_margin_linear(np.eye(2), np.array([1.0, -1.0]), weights=np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="must be in \\{-1, \\+1\\}"):
        max_margin_linear(np.eye(2), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="non-zero"):
        angle(np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="2-D inputs"):
        toy_max_margin(soudry_dataset(0).__class__(np.ones((2, 3)), np.array([1.0, -1.0])))


@pytest.mark.parametrize("q, norm, degree", [
    (1e300, 10.0, 400),       # 10^400 overflows; the ratio is 1e-100
    (-2.5e200, 1e3, 150),     # 10^450 overflows; -2.5e-250
    (1e-300, 1e-3, 200),      # 10^-600 underflows to 0; 1e300
    (0.0, 1e3, 150),          # 0 over an overflowing power is 0, not NaN
])
def test_margins_over_a_power_that_leaves_float64(q, norm, degree):
    """gamma = q / ||w||^L read 0, inf or NaN where ||w||^L over- or underflows although
    the ratio is a float64 number (high-degree ReLU^k nets). The reference is mpmath at 50
    digits; the log form loses about (|log q| + L |log norm|) ulps, the tolerance."""
    import mpmath
    from marginflow.analysis._common import over_norm_power

    mpmath.mp.dps = 50
    exact = float(mpmath.mpf(q) / mpmath.mpf(norm) ** degree)
    got = float(over_norm_power(q, norm, degree))
    ulps = (abs(np.log(abs(q))) if q else 0.0) + degree * abs(np.log(norm))
    assert got == pytest.approx(exact, rel=4 * ulps * np.finfo(float).eps, abs=0.0)


def test_margins_over_a_power_in_range_are_the_plain_ratio():
    from marginflow.analysis._common import over_norm_power

    rng = np.random.default_rng(0)
    q, norm = rng.normal(size=50), rng.uniform(0.1, 10.0, size=50)
    np.testing.assert_array_equal(over_norm_power(q, norm, 3), q / norm**3)


@pytest.mark.parametrize("scale", [1e-200, 1e-160, 1e150, 1e200, 1e300])
def test_normalized_margin_where_q_or_the_norm_leaves_float64(scale):
    """gamma(c w) = gamma(w) for c > 0. On the toy (L = 2) at ||w|| ~ 1e200 the margins
    q_i ~ 1e400 leave float64 and gamma read NaN, and at 1e-200 the sum of squares
    underflowed to 0 ("w must be non-zero"); it now comes from q_min(w / ||w||). Both
    are the same function of the direction in float64, so a few ulps of w / ||w|| (times
    the condition of q_min, O(1) here) bound the difference: 1e-13 relative. The weighted
    margin (AdaGrad's gamma_A, weights up to 1e10, so that weights * w overflows where w
    does not) and several states at once are checked the same way."""
    data = toy_dataset(0)
    model = ToyLeaky(key=jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 3))
    weights = rng.uniform(0.5, 2.0, size=3) * np.array([1.0, 1e10, 1.0])
    for kw in ({}, {"weights": weights}):
        ref = normalized_margin(model, data, w, **kw)
        got = normalized_margin(model, data, scale * w, **kw)
        assert np.all(np.isfinite(got)), got
        np.testing.assert_allclose(got, ref, rtol=1e-13, atol=0)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("scale", [1e-8, 1e8, 1e-150])
def test_max_margin_scales_with_the_data(norm, scale):
    """The margin of c X is c times that of X, the direction the same. At c = 1e-8 the
    solvers' absolute tolerances gave an l2 margin 13% too high (0.2454 against 0.2171,
    the constraints violated by 2.3) and an unverified answer. Both solves are verified to
    1e-9 KKT residuals, so 1e-8 relative bounds their difference."""
    X = np.random.default_rng(0).normal(size=(10, 3))
    y = np.sign(X @ np.ones(3))
    a, b = max_margin_linear(X, y, norm=norm), max_margin_linear(scale * X, y, norm=norm)
    assert a.verified and b.verified
    assert b.margin / scale == pytest.approx(a.margin, rel=1e-8)
    np.testing.assert_allclose(b.direction, a.direction, atol=1e-8)


def test_max_margin_with_classes_no_sample_has():
    """x1 = e1 in class 0, x2 = e2 in class 1, C = 3: per coordinate the constraints
    w_0 - w_1 >= 1, w_0 - w_2 >= 1 are met at least norm by (2/3, -1/3, -1/3), so
    ||W||^2 = 2 * 2/3 and the margin is (4/3)^(-1/2) = sqrt(3)/2 (by hand)."""
    r = max_margin_linear(np.eye(2), np.array([0, 1]), n_classes=3)
    assert r.w.shape == (6,) and r.verified
    assert r.margin == pytest.approx(np.sqrt(3) / 2, rel=1e-12)
    np.testing.assert_allclose(r.w.reshape(3, 2), [[2 / 3, -1 / 3], [-1 / 3, 2 / 3],
                                                   [-1 / 3, -1 / 3]], atol=1e-12)
    with pytest.raises(ValueError, match=r"one class .*pass n_classes=C"):
        max_margin_linear(np.eye(2), np.array([0, 0]))
    with pytest.raises(ValueError, match=r"`n_classes` must be an integer >= max\(y\) \+ 1 = 2"):
        max_margin_linear(np.eye(2), np.array([0, 1]), n_classes=1)
