"""kkt_residual and normalized_margin at fixed parameters (no ODE solver involved)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import marginflow  # noqa: F401  (float64)
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marginflow.analysis import (
    NotSeparatedError,
    kkt_residual,
    max_margin_linear,
    normalized_margin,
)
from marginflow.models import Dataset, DeepLinear, Linear, Objective, flatten, soudry_dataset


def test_kkt_residual_vanishes_at_the_exact_svm_solution():
    # The exact max-margin w of (P) is a KKT point: the best residual is rounding error.
    data = soudry_dataset(0)
    model = Linear(2, key=jax.random.key(0))
    w = max_margin_linear(data.X, data.y).w
    r = kkt_residual(model, data, 7.0 * w)
    assert r.residual_best <= 1e-12
    assert abs(r.gamma - np.sqrt(2)) <= 1e-12


def test_pa_residual_vanishes_at_the_weighted_solution_and_not_p():
    rng = np.random.default_rng(0)
    u = rng.normal(size=12)
    X = rng.normal(size=(6, 12))
    y = np.where(X @ u > 0, 1.0, -1.0)
    data = Dataset(X, y)
    weights = np.exp(rng.uniform(-1, 1, size=12))
    model = Linear(12, key=jax.random.key(0))
    wa = max_margin_linear(X, y, weights=weights).w
    assert kkt_residual(model, data, wa, weights=weights).residual_best <= 1e-12
    # The same point is far from a KKT point of the unweighted problem: the (P) solution
    # is unique and differs (checked in test_analysis_references), so some residual must
    # remain; 1e-3 is far above rounding and far below what this data gives (~0.3).
    assert kkt_residual(model, data, wa).residual_best > 1e-3


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 30.0))
def test_paper_multipliers_give_the_closed_form(seed, scale):
    # A homogeneous model of degree 2 (deep linear) at a random separating point. The
    # closed form eps = gamma^{-1/L} sqrt(2 (1 - cos theta)) (Lemma 21) is compared with the
    # residual of the paper's multipliers computed here from scratch with jax.jacobian.
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(8, 3))
    model = DeepLinear([3, 2, 1], key=jax.random.key(seed))
    w = np.asarray(flatten(model)) * scale
    out = np.asarray(Objective(model, Dataset(X, np.ones(8))).outputs(jnp.asarray(w)))
    y = np.where(out > 0, 1.0, -1.0)  # labels the model separates: q_min > 0
    data = Dataset(X, y)
    r = kkt_residual(model, data, w)
    obj = Objective(model, data)
    L = 2
    q = np.asarray(obj.margins(jnp.asarray(w)))
    q_min = q.min()
    wt = w / q_min ** (1 / L)
    jac = np.asarray(jax.jacobian(obj.margins)(jnp.asarray(wt)))  # (N, p) at w~
    resid = np.linalg.norm(wt - jac.T @ r.lambda_paper)
    assert resid == pytest.approx(r.eps_paper, rel=1e-9, abs=1e-12)
    cos = r.cos_theta
    gam = q_min / np.linalg.norm(w) ** L
    assert r.gamma == pytest.approx(gam, rel=1e-12)
    # sqrt(2(1 - cos)) loses digits when cos -> 1: compare where 1 - cos is not tiny.
    if 1 - cos > 1e-6:
        assert r.eps_paper == pytest.approx(gam ** (-1 / L) * np.sqrt(2 * (1 - cos)), rel=1e-7)
    # delta of the paper's multipliers, and the best multipliers never lose to them.
    assert r.delta_paper == pytest.approx(
        float(r.lambda_paper @ (q / q_min - 1)), rel=1e-9, abs=1e-14
    )
    assert r.residual_best <= r.residual_paper * (1 + 1e-9)
    assert np.all(r.lambda_best >= 0) and np.all(r.lambda_paper >= 0)
    # Scale invariance (homogeneity): the relative residuals and gamma do not depend on |w|.
    r2 = kkt_residual(model, data, 3.0 * w)
    assert r2.residual_best == pytest.approx(r.residual_best, rel=1e-6, abs=1e-12)
    assert r2.gamma == pytest.approx(r.gamma, rel=1e-12)


def test_multiclass_kkt_per_pair_constraint():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 5).astype(np.int32)
    X = 3.0 * np.eye(3)[y] + 0.3 * rng.normal(size=(15, 3))
    data = Dataset(X, y)
    model = Linear(3, out_dim=3, key=jax.random.key(0))
    ref = max_margin_linear(X, y)
    r = kkt_residual(model, data, 5.0 * ref.w)
    # 15 samples x 2 other classes: one multiplier per (i, j != y_i) pair (App. E).
    assert r.lambda_best.shape == (30,)
    assert r.residual_best <= 1e-12
    assert abs(normalized_margin(model, data, ref.w) - ref.margin) <= 1e-12
    # a perturbed point is not a KKT point.
    w2 = ref.w + 0.05 * rng.normal(size=9)
    assert kkt_residual(model, data, w2).residual_best > 1e-3


def test_stacked_states_and_errors():
    data = soudry_dataset(0)
    model = Linear(2, key=jax.random.key(0))
    W = np.array([[1.0, 1.0], [1.0, 0.5], [2.0, 1.0]])
    r = kkt_residual(model, data, W)
    assert r.residual_best.shape == (3,) and r.lambda_best.shape == (3, 16)
    single = kkt_residual(model, data, W[1])
    assert single.residual_best == r.residual_best[1]
    np.testing.assert_allclose(
        normalized_margin(model, data, W),
        [normalized_margin(model, data, x) for x in W],
        rtol=1e-15,
    )
    with pytest.raises(NotSeparatedError, match="q_min > 0"):
        kkt_residual(model, data, np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="last axis p = 2"):
        kkt_residual(model, data, np.ones(3))
    with pytest.raises(ValueError, match="`weights` must be finite and > 0"):
        kkt_residual(model, data, np.ones(2), weights=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="non-zero"):
        normalized_margin(model, data, np.zeros(2))
