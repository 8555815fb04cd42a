"""Non-separable data (issue 13, item 3): the exact LP check and what `simulate` says.

`linearly_separable` is checked against answers found without it: by hand on small 2-D /
1-D sets, by Gordan's alternative (exactly one of "some w with A w > 0" and "some lambda >= 0,
lambda != 0, with A^T lambda = 0" holds; the second is a different LP, solved here), and by
`max_margin_linear`'s feasible solution on separable sets. The simulate tests use one
configuration (GradientFlow, Linear(2), 100 samples, max_steps 2000, 8 save slots per
segment) so that it compiles once.
"""

from __future__ import annotations

import jax
import marginflow  # noqa: F401  (float64)
import numpy as np
import pytest
import scipy.optimize
from marginflow.analysis import NotSeparatedError, linearly_separable, max_margin_linear, rate_fit
from marginflow.flows import GradientFlow, SimulationError, resume, simulate
from marginflow.flows._separation import separation_verdict
from marginflow.models import (
    Dataset,
    Linear,
    Objective,
    ToyLeaky,
    separable_gaussians,
    toy_dataset,
)

XOR_X = np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
XOR_Y = np.array([1.0, 1.0, -1.0, -1.0])


def rows(X, y, C=None):
    """The rows a_c of A w >= 1, built densely and plainly (binary y x; multi-class
    (e_{y_i} - e_j) (x) x_i for W (C, d) flattened row-major)."""
    X = np.asarray(X, float)
    if np.issubdtype(np.asarray(y).dtype, np.floating):
        return y[:, None] * X
    C = int(max(y)) + 1 if C is None else C
    out = []
    for x, yi in zip(X, y, strict=True):
        for j in range(C):
            if j != yi:
                a = np.zeros((C, X.shape[1]))
                a[yi] += x
                a[j] -= x
                out.append(a.ravel())
    return np.array(out)


def gordan_certificate(A):
    """lambda >= 0, sum lambda = 1, A^T lambda = 0 (None if infeasible): a proof that no w
    has A w > 0. Rows are scaled to unit length (lambda stays >= 0 under that)."""
    A = A / np.linalg.norm(A, axis=1, keepdims=True)
    n, d = A.shape
    res = scipy.optimize.linprog(
        np.zeros(n),
        A_eq=np.vstack([A.T, np.ones((1, n))]),
        b_eq=np.concatenate([np.zeros(d), [1.0]]),
        bounds=[(0, None)] * n,
        method="highs",
    )
    assert res.status in (0, 2), res.message
    return res.x if res.status == 0 else None


# ----------------------------------------------------------------- linearly_separable
def test_binary_by_hand():
    # XOR through the origin: the rows y_i x_i are (1,1), (-1,-1), (-1,1), (1,-1) and sum to
    # 0, so sum_i q_i(w) = 0 for every w: some margin is <= 0 (Gordan, lambda = 1/4).
    A = rows(XOR_X, XOR_Y)
    np.testing.assert_array_equal(A.sum(axis=0), 0.0)
    assert not linearly_separable(Dataset(XOR_X, XOR_Y))
    # one point with both labels: q_1 = -q_2 for every w
    assert not linearly_separable(Dataset([[0.3, 2.0], [0.3, 2.0]], [1.0, -1.0]))
    # a sample at the origin has margin 0 whatever w is
    assert not linearly_separable(Dataset([[1.0, 0.0], [0.0, 0.0]], [1.0, 1.0]))
    # separable: w = (1, 1) gives margins 1, 1, 1.5
    X = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -0.5]])
    y = np.array([1.0, 1.0, -1.0])
    assert np.all(y * (X @ np.array([1.0, 1.0])) > 0)
    assert linearly_separable(Dataset(X, y))
    # ... and flipping one label of the last point breaks it: then a_3 = (-1, -0.5) =
    # -(a_1 + a_2 / 2), so a_1 + a_2 / 2 + a_3 = 0
    assert not linearly_separable(Dataset(X, np.array([1.0, 1.0, 1.0])))


def test_binary_separable_sets_agree_with_max_margin():
    for seed in range(3):
        data = separable_gaussians(40, 5, seed=seed)
        assert linearly_separable(data)
        ref = max_margin_linear(data.X, data.y)  # raises if the data is not separable
        assert np.min(np.asarray(data.y) * (np.asarray(data.X) @ ref.w)) >= 1 - 1e-9
    data = toy_dataset(0)
    assert linearly_separable(data)
    X, y = np.asarray(data.X), np.asarray(data.y).copy()
    y[:3] = -1.0  # three positives relabelled, deep inside the positive cluster
    assert not linearly_separable(Dataset(X, y))
    with pytest.raises(ValueError, match="not linearly separable"):
        max_margin_linear(X, y)
    assert gordan_certificate(rows(X, y)) is not None


@pytest.mark.parametrize("seed", range(6))
def test_random_sets_agree_with_gordan(seed):
    # Few points in few dimensions: separable about half of the time. Exactly one of the
    # two alternatives holds, each found by its own LP.
    rng = np.random.default_rng(seed)
    for n, d in [(3, 2), (5, 2), (6, 3), (9, 3)]:
        X = rng.normal(size=(n, d))
        y = rng.choice([-1.0, 1.0], size=n)
        sep = linearly_separable(Dataset(X, y))
        assert sep == (gordan_certificate(rows(X, y)) is None), (n, d)
        yc = rng.integers(0, 3, size=n)
        sep = linearly_separable(Dataset(X, yc), n_classes=3)
        assert sep == (gordan_certificate(rows(X, yc, 3)) is None), (n, d, "multi")


def test_multiclass_by_hand():
    rng = np.random.default_rng(0)
    # labels of argmax W x for a random W (3 classes, 2-D), points kept clear of ties:
    # W itself separates them
    W = rng.normal(size=(3, 2))
    X = rng.normal(size=(60, 2))
    s = np.sort(X @ W.T, axis=1)
    X = X[s[:, -1] - s[:, -2] > 0.05]
    y = np.argmax(X @ W.T, axis=1)
    assert linearly_separable(Dataset(X, y))
    # one point with two labels: q_i1 (W) for label 0 vs 1 is minus the other's
    X2 = np.concatenate([X, X[:1]])
    y2 = np.concatenate([y, [(y[0] + 1) % 3]])
    assert not linearly_separable(Dataset(X2, y2))
    # 1-D, through the origin: every x > 0 gets the class with the largest W_c, so x = 1
    # and x = 2 cannot carry different labels
    assert not linearly_separable(Dataset([[1.0], [2.0], [-1.0]], [0, 1, 2]))
    assert linearly_separable(Dataset([[1.0], [2.0], [-1.0]], [0, 0, 2]))


def test_multiclass_unused_class():
    # All samples in class 0. With C = 1 there is nothing to beat; with a second (unused)
    # output, W_0 x - W_1 x >= 1 needs one v = W_0 - W_1 with <v, x> >= 1 on every x,
    # impossible when x and -x are both samples.
    X = np.array([[1.0, 0.0], [-1.0, 0.0]])
    y = np.array([0, 0])
    assert linearly_separable(Dataset(X, y))
    assert not linearly_separable(Dataset(X, y), n_classes=2)
    assert linearly_separable(Dataset(np.array([[1.0, 0.0], [1.0, 1.0]]), y), n_classes=2)


def test_bad_input():
    with pytest.raises(TypeError, match="Dataset"):
        linearly_separable(XOR_X)
    with pytest.raises(ValueError, match="n_classes"):
        linearly_separable(Dataset(XOR_X, XOR_Y), n_classes=2)
    with pytest.raises(ValueError, match="n_classes"):
        linearly_separable(Dataset(XOR_X, np.array([0, 1, 2, 2])), n_classes=2)


# ------------------------------------------------------------------ the verdict alone
def _toy_flipped():
    data = toy_dataset(0)
    y = np.asarray(data.y).copy()
    y[:3] = -1.0
    return Dataset(np.asarray(data.X), y)


def test_verdict_runs_the_lp_only_when_stuck(monkeypatch):
    import marginflow.analysis._separability as sep

    calls = []
    real = sep.linearly_separable
    monkeypatch.setattr(sep, "linearly_separable", lambda *a, **k: calls.append(1) or real(*a, **k))
    obj = Objective(Linear(2, key=jax.random.key(0)), _toy_flipped())
    ts = np.array([0.0, 1.0, 10.0, 100.0])
    # separated at the end (log L < log ell(0) = 0): no LP, nothing changed
    out = separation_verdict(
        obj, ts, np.array([4.0, 1.0, -0.5, -3.0]), "successful", "", 1e-8, 100.0
    )
    assert out == ("successful", "") and not calls
    out = separation_verdict(
        obj,
        ts,
        np.array([4.0, 3.8, 3.7, 3.7]),
        "max_steps_reached",
        "stopped. Fix: increase `max_steps`.",
        1e-8,
        1e3,
    )
    assert out[0] == "not_separable" and "does not separate the data" in out[1]
    assert "increase `max_steps`" not in out[1] and len(calls) == 1
    # separable data stopped before separating: the LP says so and nothing changes
    obj = Objective(Linear(2, key=jax.random.key(0)), toy_dataset(0))
    out = separation_verdict(
        obj, ts, np.array([4.0, 3.8, 3.7, 3.7]), "max_steps_reached", "stopped.", 1e-8, 1e3
    )
    assert out == ("max_steps_reached", "stopped.") and len(calls) == 2


def test_verdict_note_for_non_linear_models():
    obj = Objective(ToyLeaky(key=jax.random.key(0)), _toy_flipped(), "logistic")
    level = float(np.log(np.log(2.0)))
    ts = np.array([0.0, 1.0, 10.0, 100.0, 1e3])
    flat = np.array([4.0, 3.0, 2.5, 2.5, 2.5])
    result, message = separation_verdict(
        obj, ts, flat, "max_steps_reached", "stopped. Fix: more steps.", 1e-8, 1e4
    )
    assert result == "max_steps_reached"
    assert message.startswith(
        "stopped. Fix: more steps. Note: the loss stopped falling at log L = 2.5"
    )
    assert "may not be separable by this model" in message and f"{level:.4g}" in message
    # still falling over the last decade, separated, or less than a decade saved: no note
    falling = np.array([4.0, 3.0, 2.5, 2.0, 1.5])
    assert separation_verdict(obj, ts, falling, "successful", "", 1e-8, 1e3) == ("successful", "")
    below = np.array([4.0, 3.0, -1.0, -1.0, -1.0])
    assert separation_verdict(obj, ts, below, "successful", "", 1e-8, 1e3)[1] == ""
    short = np.array([4.0, 2.5, 2.5])
    assert (
        separation_verdict(obj, np.array([0.0, 3.0, 10.0]), short, "successful", "", 1e-8, 10.0)[1]
        == ""
    )
    # a batch (B, n): counted per member, NaN after a member's failure ignored
    batch = np.stack([falling, np.array([4.0, 3.0, 2.5, 2.5, np.nan])])
    result, message = separation_verdict(obj, ts, batch, "successful", "", 1e-8, 1e3)
    assert "Note (1 of 2 runs; run 1:)" in message and "t = 100" in message


# ------------------------------------------------------------------------- simulate
MODEL = Linear(2, key=jax.random.PRNGKey(0))
RUN = {"max_steps": 2000, "n_save": 20}  # one compiled configuration for every run here


def test_simulate_non_separable_linear_says_so():
    # GD on a linear model that cannot separate the data converges to a finite minimiser:
    # its field turns stiff in log time and the solver runs out of steps in [1e3, 1e4].
    traj = simulate(GradientFlow(), MODEL, _toy_flipped(), 1e4, throw=False, **RUN)
    assert traj.result == "not_separable" and not traj.success
    assert "this model does not separate the data (an LP feasibility check" in traj.message
    assert "no step budget fixes that" in traj.message
    assert "max_steps_reached" in traj.message  # the solver's symptom is named
    assert "increase" not in traj.message and "Try" not in traj.message
    assert np.all(traj.log_loss >= 0.0)  # L >= ell(0) = 1 throughout, as it must
    assert traj.ts[-1] < 1e4
    with pytest.raises(SimulationError, match="does not separate the data") as info:
        simulate(GradientFlow(), MODEL, _toy_flipped(), 1e4, **RUN)
    assert info.value.trajectory.result == "not_separable"
    # an analysis that needs separation repeats the verdict instead of "run longer"
    with pytest.raises(NotSeparatedError, match="does not separate the data at all"):
        rate_fit(traj)


def test_simulate_reaching_t1_without_separating_is_not_separable():
    # ts keeps the save slots per segment at 8 (the configuration above)
    ts = np.concatenate([[0.0], np.geomspace(1e-2, 1e2, 12)])
    traj = simulate(GradientFlow(), MODEL, _toy_flipped(), 1e2, ts=ts, throw=False, **RUN)
    assert traj.result == "not_separable" and traj.ts[-1] == 1e2
    assert "reached t1 = 100" in traj.message
    # the same run on the separable set: separated at t1, successful, no LP
    traj = simulate(GradientFlow(), MODEL, toy_dataset(0), 1e2, ts=ts, throw=False, **RUN)
    assert traj.result == "successful" and traj.message == "" and traj.log_loss[-1] < 0


def test_resume_gives_the_same_verdict(tmp_path):
    first = simulate(
        GradientFlow(), MODEL, _toy_flipped(), 1e4, throw=False, checkpoint=tmp_path, **RUN
    )
    again = resume(tmp_path, throw=False)
    assert first.result == again.result == "not_separable"
    assert first.message == again.message


@pytest.mark.slow
def test_simulate_non_linear_stalled_loss_gets_a_note():
    # ToyLeaky's sign is sign(v) sign(<w, x>) (the leaky ReLU is increasing): it separates
    # exactly what a linear model does, so not the flipped set. No exact check is made for
    # it; the run's loss stalls and the message says the data may not be separable.
    traj = simulate(
        GradientFlow(), ToyLeaky(key=jax.random.PRNGKey(1)), _toy_flipped(), 1e4, throw=False, **RUN
    )
    assert traj.result == "max_steps_reached"
    assert "Note: the loss stopped falling at log L = " in traj.message
    assert "the data may not be separable by this model" in traj.message
