"""`run` (batching, minibatches, failures, metadata, bad input) and `compare`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import marginflow  # noqa: F401
import numpy as np
import pytest
from marginflow.analysis import normalized_margin
from marginflow.discrete import (
    GD,
    AdaGrad,
    Adam,
    RMSProp,
    SGDMomentum,
    compare,
    matching_flow,
    optimizer_from_meta,
    run,
)
from marginflow.discrete._run import _run_counted
from marginflow.flows import RMSPropFlow, SimulationError, Trajectory
from marginflow.models import (
    Dataset,
    Linear,
    ToyLeaky,
    separable_gaussians,
    toy_dataset,
    unflatten,
)


def toys(n, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return eqx.filter_vmap(lambda k: ToyLeaky(key=k))(keys)


def member(models, i):
    return jax.tree.map(lambda x: x[i] if eqx.is_inexact_array(x) else x, models)


# ------------------------------------------------------------------ batching
@pytest.mark.parametrize("opt", [RMSProp(0.1, b=0.9, eps=1e-5), AdaGrad(0.1, eps=1e-5),
                                 Adam(0.05, b2=0.99, eps=1e-3, b1=0.9, eps_placement="outside")])
def test_vmap_equals_loop(opt):
    """run(batch=True) equals separate runs of each initialisation. Tolerance 1e-12
    relative: the batched program groups the same float64 operations differently (a
    matrix product instead of matrix-vector ones), so only rounding may differ; measured
    agreement on this toy problem is ~1e-15 after 300 steps."""
    data = toy_dataset(0)
    models = toys(3)
    batched = run(opt, models, data, 300, save_every=10, batch=True)
    assert batched.batched and batched.w.shape == (3, 31, 3)
    for i in range(3):
        single = run(opt, member(models, i), data, 300, save_every=10)
        np.testing.assert_array_equal(single.ts, batched.ts)
        for name in ("w", "m", "conditioner", "log_loss"):
            a, b = getattr(batched, name)[i], getattr(single, name)
            assert np.max(np.abs(a - b)) <= 1e-12 * np.max(np.abs(b)), name
        assert batched.stats["num_steps"][i] == single.stats["num_steps"] == 300


def test_no_retrace_for_new_hyperparameters_or_steps():
    """Hyper-parameters are array leaves and the step counts are traced: same number of
    saves -> no new compilation."""
    data = toy_dataset(0)
    model = ToyLeaky(key=jax.random.PRNGKey(3))
    run(RMSProp(0.1, b=0.9, eps=1e-5), model, data, 40, save_every=4)
    n0 = eqx.debug.get_num_traces(_run_counted)
    run(RMSProp(0.05, b=0.5, eps=1e-3), model, data, 80, save_every=8)  # 10 saves + the end again
    run(RMSProp(0.2, b=0.0, eps=1.0), model, data, 37, save_every=4)  # a short last block
    assert eqx.debug.get_num_traces(_run_counted) == n0
    run(RMSProp(0.1, b=0.9, eps=1e-5), model, data, 40, save_every=2)  # 20 saves: a new shape
    assert eqx.debug.get_num_traces(_run_counted) == n0 + 1


def test_a_staged_batch_compiles_one_program():
    """A batched run of >= 8 save blocks runs its first block alone (members that overflow
    there are dropped from the rest), then the others: when nobody fails, both stages are
    calls of one compiled program (one trace), and every member takes every step."""
    data = toy_dataset(0)
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(jax.random.split(jax.random.key(7), 5))
    n0 = eqx.debug.get_num_traces(_run_counted)
    traj = run(GD(0.01), models, data, 78, save_every=6, batch=True, workers=1)  # 13 blocks
    assert eqx.debug.get_num_traces(_run_counted) == n0 + 1
    assert np.all(np.asarray(traj.stats["num_steps"]) == 78)
    assert traj.w.shape[:2] == (5, 14)  # 13 saves, then k = 78


# ------------------------------------------------------------------- save times
def test_save_times_and_final_point():
    data = toy_dataset(0)
    model = ToyLeaky(key=jax.random.PRNGKey(1))
    traj = run(AdaGrad(0.3, eps=1e-3), model, data, 23, save_every=5)
    # saves at k = 0, 5, 10, 15, 20 and the end k = 23; AdaGrad's flow time is k lr^2.
    np.testing.assert_allclose(traj.ts, np.array([0, 5, 10, 15, 20, 23]) * 0.09, rtol=1e-15)
    full = run(AdaGrad(0.3, eps=1e-3), model, data, 23, save_every=1)
    np.testing.assert_array_equal(traj.w, full.w[[0, 5, 10, 15, 20, 23]])
    assert np.all(np.isnan(traj.I))


# ------------------------------------------------------------------ failures
def _diverging_problem():
    # L(w) = e^{-w} + e^{w}: not separable; GD with lr 0.5 from w = 3 overshoots until
    # exp overflows. From w = 0.1 it converges (lr * L''(0) = 1 < 2).
    return Dataset(np.array([[1.0], [1.0]]), np.array([1.0, -1.0]))


def _numpy_failure_step(w, lr, steps):
    """The first k whose loss or gradient is non-finite (steps if none), by hand."""
    with np.errstate(over="ignore", invalid="ignore"):
        for k in range(steps + 1):
            log_l, g = np.logaddexp(-w, w), np.exp(w) - np.exp(-w)
            if not (np.isfinite(log_l) and np.isfinite(g)):
                return k
            w = w - lr * g
    return steps


def test_nonfinite_stops_and_keeps_what_it_computed():
    data = _diverging_problem()
    model = unflatten(Linear(1, key=jax.random.PRNGKey(0)), jnp.array([3.0]))
    k_fail = _numpy_failure_step(3.0, 0.5, 50)
    assert 0 < k_fail < 50
    traj = run(GD(0.5), model, data, 50, save_every=1, throw=False)
    assert traj.result == "nonfinite_loss" and not traj.success
    assert f"step {k_fail}" in traj.message and "lower `lr`" in traj.message
    assert traj.stats["num_steps"] == k_fail
    # every save before the failure, then the failing iterate itself
    np.testing.assert_allclose(traj.ts, np.arange(k_fail + 1) * 0.5, rtol=1e-15)
    assert np.all(np.isfinite(traj.log_loss[:-1]))
    with pytest.raises(SimulationError, match="non-finite") as info:
        run(GD(0.5), model, data, 50, save_every=1)
    np.testing.assert_array_equal(info.value.trajectory.w, traj.w)


def test_a_final_iterate_that_overflows_is_a_failure():
    """With steps = the failure step (numpy, by hand), the failing iterate is the final
    point, whose step is evaluated but not taken: the run reported "successful" with an
    infinite last loss. It must read as the longer run does, single and batched."""
    data = _diverging_problem()
    model = unflatten(Linear(1, key=jax.random.PRNGKey(0)), jnp.array([3.0]))
    k_fail = _numpy_failure_step(3.0, 0.5, 50)
    short = run(GD(0.5), model, data, k_fail, save_every=1, throw=False)
    longer = run(GD(0.5), model, data, 50, save_every=1, throw=False)
    assert short.result == "nonfinite_loss" and f"step {k_fail}" in short.message
    np.testing.assert_array_equal(short.w, longer.w)
    models = eqx.filter_vmap(lambda w: unflatten(Linear(1, key=jax.random.PRNGKey(0)), w))(
        jnp.array([[3.0], [0.1]]))
    batch = run(GD(0.5), models, data, k_fail, save_every=1, batch=True, throw=False)
    assert batch.result == "nonfinite_loss" and "1 of 2 runs" in batch.message
    assert np.all(np.isnan(batch.w[0, -1])) and np.all(np.isfinite(batch.w[1]))
    with pytest.raises(SimulationError, match="non-finite"):
        run(GD(0.5), model, data, k_fail, save_every=1)


def test_nonfinite_in_a_batch_masks_only_that_member():
    data = _diverging_problem()
    models = eqx.filter_vmap(lambda w: unflatten(Linear(1, key=jax.random.PRNGKey(0)), w))(
        jnp.array([[3.0], [0.1]]))
    k_fail = _numpy_failure_step(3.0, 0.5, 50)
    traj = run(GD(0.5), models, data, 50, save_every=1, batch=True, throw=False)
    assert traj.result == "nonfinite_loss" and "1 of 2 runs" in traj.message
    assert traj.stats["num_steps"] == (k_fail, 50)
    assert np.all(np.isfinite(traj.w[0, :k_fail])) and np.all(np.isnan(traj.w[0, k_fail:]))
    good = run(GD(0.5), member(models, 1), data, 50, save_every=1)
    np.testing.assert_allclose(traj.w[1], good.w, rtol=1e-12)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_failed_members_dropped_and_threads_equal_separate_runs(workers):
    """A batched run of >= 8 save blocks drops the members that failed in the first block
    and runs the rest (`workers` threads): each member must still equal its own separate
    run (saves, failure step, last point). Members starting at w = 3, 3.5, -3 overflow at
    steps 3, 2, 3 (numpy, by hand), inside the first block of 10 steps; the others
    converge. Tolerance 1e-12 relative, as in test_vmap_equals_loop."""
    data = _diverging_problem()
    starts = [3.0, 0.1, 3.5, -0.2, 2.0, -3.0, 1.2]
    models = eqx.filter_vmap(lambda w: unflatten(Linear(1, key=jax.random.PRNGKey(0)), w))(
        jnp.array([[w] for w in starts]))
    expected = [_numpy_failure_step(w, 0.5, 200) for w in starts]
    assert sorted(expected)[:3] == [2, 3, 3] and sorted(expected)[3] == 200
    traj = run(GD(0.5), models, data, 200, save_every=10, batch=True, throw=False,
               workers=workers)
    assert traj.stats["num_steps"] == tuple(expected)
    assert "3 of 7 runs" in traj.message
    for i in range(len(starts)):
        single = run(GD(0.5), member(models, i), data, 200, save_every=10, throw=False)
        n = len(single.ts) - 1  # the saves before the end (or the failure) ...
        np.testing.assert_allclose(traj.w[i, :n], single.w[:n], rtol=1e-12)
        if expected[i] == 200:  # ... and the end point
            np.testing.assert_allclose(traj.w[i, -1], single.w[-1], rtol=1e-12)
            np.testing.assert_allclose(traj.log_loss[i], single.log_loss, rtol=1e-12)
        else:
            assert np.all(np.isnan(traj.w[i, n:]))


def test_workers_argument_is_checked():
    with pytest.raises(ValueError, match="`workers` must be an integer >= 1"):
        run(GD(0.1), toys(2), toy_dataset(0), 10, batch=True, workers=0)


# ---------------------------------------------------------------- minibatches
def test_minibatch_of_everything_is_full_batch():
    """batch_size = N: each minibatch is a permutation of the data, so the gradient is the
    full one summed in another order (rounding only, hence 1e-12)."""
    data = toy_dataset(1)
    model = ToyLeaky(key=jax.random.PRNGKey(2))
    full = run(RMSProp(0.1, b=0.9, eps=1e-5), model, data, 200, save_every=20)
    mini = run(RMSProp(0.1, b=0.9, eps=1e-5), model, data, 200, save_every=20, batch_size=100,
               key=jax.random.PRNGKey(5))
    assert np.max(np.abs(mini.w - full.w)) <= 1e-12 * np.max(np.abs(full.w))
    assert mini.meta["batch_size"] == 100


def _hand_sgd(sampling: str, indices):
    """GD(0.05) with batches of 4 of 10 points against numpy SGD whose step k uses the
    points indices(key, k); returns (the run, the numpy iterates)."""
    d = separable_gaussians(10, 3, seed=2)
    X, y = np.asarray(d.X) * 0.5, np.asarray(d.y)
    w0 = np.array([0.2, -0.1, 0.3])
    model = unflatten(Linear(3, key=jax.random.PRNGKey(0)), jnp.asarray(w0))
    key = jax.random.PRNGKey(7)
    traj = run(GD(0.05), model, Dataset(X, y), 12, save_every=1, batch_size=4, key=key,
               sampling=sampling)
    w, ws = w0.copy(), []
    for k in range(12 + 1):
        ws.append(w.copy())
        idx = indices(key, k)
        assert len(set(idx.tolist())) == 4  # without replacement
        e = np.exp(-y[idx] * (X[idx] @ w))
        w = w + 0.05 * (e * y[idx]) @ X[idx]
    ws = np.array(ws)
    assert np.max(np.abs(traj.w - ws)) <= 1e-12 * np.max(np.abs(ws))
    return traj, ws, X, y


def test_minibatch_gd_matches_hand_written_sgd():
    """Minibatch GD against numpy SGD on the documented sampling (a permutation per epoch
    from fold_in(key, epoch), partial last batch dropped); log L saved on the full data."""
    def epochs(key, k):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, k // 2), 10))
        return perm[(k % 2) * 4:(k % 2) * 4 + 4]

    traj, ws, X, y = _hand_sgd("epochs", epochs)
    full_log_l = np.log(np.sum(np.exp(-y[None] * (ws @ X.T)), axis=1))
    np.testing.assert_allclose(traj.log_loss, full_log_l, rtol=1e-12)


def test_independent_sampling_matches_hand_written_sgd():
    """sampling="independent": B of the N samples without replacement, afresh at every step
    (the first B of a permutation from fold_in(key, k)), against numpy SGD."""
    def independent(key, k):
        return np.asarray(jax.random.permutation(jax.random.fold_in(key, k), 10))[:4]

    traj, _, _, _ = _hand_sgd("independent", independent)
    assert traj.meta["sampling"] == "independent"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_batch_of_keys_gives_each_member_its_own_minibatches(workers):
    """run(batch=True, key=keys): member j is the single run with keys[j] (threads or not);
    one shared key gives every member the same minibatches."""
    data = toy_dataset(1)
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=jax.random.PRNGKey(2)))(keys)
    opt = GD(0.05)
    kw = dict(save_every=10, batch_size=20, sampling="independent")
    batch = run(opt, models, data, 40, key=jax.random.split(jax.random.key(9), 3), batch=True,
                workers=workers, **kw)
    for j, k in enumerate(jax.random.split(jax.random.key(9), 3)):
        single = run(opt, ToyLeaky(key=jax.random.PRNGKey(2)), data, 40, key=k, **kw)
        np.testing.assert_allclose(batch.w[j], single.w, rtol=1e-13, atol=1e-15)
    assert np.max(np.abs(batch.w[0] - batch.w[1])) > 1e-3  # other batches, other paths
    shared = run(opt, models, data, 40, key=jax.random.key(9), batch=True, **kw)
    np.testing.assert_array_equal(shared.w[0], shared.w[1])
    with pytest.raises(ValueError, match="one key per member"):
        run(opt, models, data, 40, key=jax.random.split(jax.random.key(9), 2), batch=True,
            **kw)
    with pytest.raises(ValueError, match="`sampling` must be one of"):
        run(opt, models, data, 40, key=jax.random.key(9), batch=True, batch_size=20,
            sampling="with_replacement")
    with pytest.raises(ValueError, match="batch_size = None"):
        run(opt, models, data, 40, batch=True, sampling="independent")


def test_per_member_keys_follow_their_members_when_some_fail():
    # >= 8 save blocks: the batch runs in two stages and drops the members that failed in
    # the first (discrete/_batch.py); the survivors' keys must go with them. Member 1's
    # output layer is flipped and scaled by 1000: every margin is hugely negative and the
    # exponential loss overflows at once. Raw PRNGKey splits as the keys.
    data = toy_dataset(1)
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(keys)
    models = eqx.tree_at(lambda m: m.v, models, models.v.at[1].multiply(-1000.0))
    opt, kw = GD(0.05), dict(save_every=5, batch_size=30, sampling="independent", throw=False)
    run_keys = jax.random.split(jax.random.PRNGKey(11), 3)
    batch = run(opt, models, data, 60, key=run_keys, batch=True, workers=2, **kw)
    assert batch.stats["num_steps"][1] < 60 and batch.stats["num_steps"][0] == 60
    for j in (0, 2):
        member = jax.tree.map(lambda a, j=j: a[j] if eqx.is_array(a) else a, models)
        single = run(opt, member, data, 60, key=run_keys[j], **kw)
        np.testing.assert_allclose(batch.w[j], single.w, rtol=1e-13, atol=1e-15)

# ------------------------------------------------------------------ metadata
def test_meta_model_at_flow_and_save_load(tmp_path):
    data = toy_dataset(0)
    model = ToyLeaky(key=jax.random.PRNGKey(4))
    opt = RMSProp(0.1, b=0.95, eps=1e-5)
    traj = run(opt, model, data, 100, save_every=10)
    meta = traj.meta
    assert meta["kind"] == "discrete" and meta["optimizer"] == "rmsprop"
    assert meta["optimizer_hyper"] == {"lr": 0.1, "b": 0.95, "eps": 1e-5}
    assert meta["eta"] == 0.1 and meta["model"] == model.spec() and meta["degree"] == 2
    assert meta["data"]["fingerprint"] == data.fingerprint() and meta["loss"] == "exponential"
    flow = traj.flow()  # the matching flow, rebuilt from meta
    assert isinstance(flow, RMSPropFlow)
    assert abs(float(flow.b) - float(matching_flow(opt).b)) < 1e-15
    assert optimizer_from_meta(meta).hyperparameters() == opt.hyperparameters()
    m5 = traj.model_at(5)
    np.testing.assert_array_equal(np.concatenate([np.ravel(m5.v), m5.w]), traj.w[5])
    traj.save(tmp_path / "d.npz")
    back = Trajectory.load(tmp_path / "d.npz")
    np.testing.assert_array_equal(back.w, traj.w)
    assert back.meta == traj.meta and back.stats["num_steps"] == 100
    # Heavy ball with lr = 0.1, mu = 0.9: eta = 1, 1 - mu = eta (1 - b1) gives b1 = 0.9;
    # with lr = 0.001 momentum forgets within a tenth of a unit of flow time (eta = 0.01,
    # 1 - b1 = 0.1 / 0.01): b1 = -9, the fast-forgetting flow.
    heavy = run(SGDMomentum(0.1), model, data, 5)
    assert heavy.meta["flow"] == "momentum" and abs(heavy.meta["hyper"]["b1"] - 0.9) < 1e-12
    np.testing.assert_allclose(heavy.ts, np.arange(6) * 1.0, rtol=1e-12)  # t = k lr / (1 - mu)
    fast = run(SGDMomentum(0.001), model, data, 5).meta
    assert fast["flow"] == "momentum" and abs(fast["hyper"]["b1"] + 9.0) < 1e-9


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GD(0.0), r"`lr` must be a finite number > 0, got 0.0"),
        (lambda: GD(float("nan")), r"`lr` must be a finite number > 0"),
        (lambda: AdaGrad(0.1, eps=-1e-5), r"`eps` must be a finite number > 0, got -1e-05"),
        (lambda: RMSProp(0.1, b=1.0), r"`b` must be in \[0, 1\), got 1.0"),
        (lambda: RMSProp(0.1, b=-0.1), r"`b` must be in \[0, 1\), got -0.1"),
        (lambda: Adam(0.1, b2=0.9, eps=0.0), r"`eps` must be a finite number > 0, got 0.0"),
        (lambda: Adam(0.1, b2=0.9, b1=1.5), r"`b1` must be in \[0, 1\), got 1.5"),
        (lambda: SGDMomentum(0.1, momentum=1.0), r"`momentum` must be in \[0, 1\), got 1.0"),
        (lambda: RMSProp(0.1, eps_placement="torch"), r"`eps_placement` must be 'inside'"),
        (lambda: RMSProp(0.1, convention="torch"), r"`convention` must be one of"),
        (lambda: GD("0.1"), r"`lr` must be a real number"),
    ],
)
def test_bad_hyperparameters(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_bad_run_arguments():
    data = toy_dataset(0)
    model = ToyLeaky(key=jax.random.PRNGKey(0))
    opt = GD(0.1)
    with pytest.raises(TypeError, match="marginflow.discrete optimiser"):
        run(RMSPropFlow(), model, data, 10)
    with pytest.raises(ValueError, match=r"`steps` must be an integer >= 1, got 0"):
        run(opt, model, data, 0)
    with pytest.raises(ValueError, match=r"`save_every` must be an integer >= 1, got 2.5"):
        run(opt, model, data, 10, save_every=2.5)
    with pytest.raises(ValueError, match=r"`batch_size` must be at most .* 100, got 101"):
        run(opt, model, data, 10, batch_size=101, key=jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="need a PRNG key"):
        run(opt, model, data, 10, batch_size=10)
    with pytest.raises(ValueError, match="`key` is only used for minibatches"):
        run(opt, model, data, 10, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="leading batch axis"):
        run(opt, model, data, 10, batch=True)
    with pytest.raises(ValueError, match="`dtype`"):
        run(opt, model, data, 10, dtype=jnp.int32)


# -------------------------------------------------------------------- compare
def _synthetic(ts, w, model_spec=None, log_loss=None):
    w = np.asarray(w, float)
    return Trajectory(
        ts=np.asarray(ts, float), w=w, m=np.zeros_like(w), conditioner=np.ones_like(w),
        log_loss=np.zeros(w.shape[:-1]) if log_loss is None else log_loss,
        I=np.full(w.shape[:-1], np.nan), stats={}, result="successful", message="",
        meta={"model": model_spec or {"class": "Linear", "kwargs": {"in_dim": 2,
                                                                    "out_dim": 1}},
              "loss": "exponential", "degree": 1},
    )


def test_compare_angle_distance_and_loss():
    """b is a rotated, rescaled copy of a: angle = the rotation (to 1e-13, atan2 form),
    distance and log-loss difference as written out."""
    ts = np.linspace(0.0, 2.0, 9)
    theta = np.linspace(0.0, 1e-7, 9) * np.arange(9)  # includes tiny angles
    w_a = np.stack([np.cos(ts), np.sin(ts)], axis=1) * 3.0
    rot = np.stack([np.cos(ts + theta), np.sin(ts + theta)], axis=1) * 2.0
    c = compare(_synthetic(ts, w_a, log_loss=ts**2), _synthetic(ts, rot, log_loss=ts))
    assert not c.interpolated
    np.testing.assert_allclose(c.angle, theta, rtol=1e-8, atol=1e-15)
    np.testing.assert_allclose(c.distance, np.linalg.norm(w_a - rot, axis=1), rtol=1e-14)
    np.testing.assert_allclose(c.log_loss_difference, ts**2 - ts, rtol=1e-14)
    assert np.all(np.isnan(c.margin_difference))  # no data given


def test_compare_interpolates_linearly_in_log_t():
    """b saved on another grid; w_b(t) = c0 + c1 log t is reproduced exactly by
    interpolation in log t, and on [0, t_1] the interpolation is linear in t."""
    c0, c1 = np.array([1.0, -2.0]), np.array([0.5, 0.25])
    ts_b = np.concatenate([[0.0], np.geomspace(1e-2, 1e3, 40)])
    w_b = np.where(ts_b[:, None] > 0, c0 + c1 * np.log(np.where(ts_b > 0, ts_b, 1.0))[:, None],
                   0.0)
    w_b[0] = [7.0, 7.0]
    ts_a = np.array([0.0, 5e-3, 0.3, 2.0, 57.0, 999.0, 1e3])
    w_a = np.zeros((len(ts_a), 2)) + [1.0, 0.0]
    c = compare(_synthetic(ts_a, w_a), _synthetic(ts_b, w_b))
    assert c.interpolated
    expect = c0 + c1 * np.log(ts_a[2:])[:, None]
    np.testing.assert_allclose(c.distance[2:], np.linalg.norm(w_a[2:] - expect, axis=1),
                               rtol=1e-12)
    half = 0.5 * (np.array([7.0, 7.0]) + c0 + c1 * np.log(1e-2))  # t = 5e-3: mid of [0, 1e-2]
    np.testing.assert_allclose(c.distance[1], np.linalg.norm(w_a[1] - half), rtol=1e-12)


def test_compare_margins_match_analysis_and_batches():
    data = toy_dataset(0)
    models = toys(2, seed=3)
    a = run(RMSProp(0.1, b=0.9, eps=1e-5), models, data, 200, save_every=50, batch=True)
    b = run(Adam(0.1, b2=0.9, eps=1e-5), models, data, 200, save_every=50, batch=True)
    c = compare(a, b, data)
    assert c.distance.shape == (2, 5) and c.max_distance().shape == (2,)
    for i in range(2):
        ref = normalized_margin(ToyLeaky(key=jax.random.PRNGKey(0)), data, a.w[i])
        np.testing.assert_allclose(c.margin_a[i], ref, rtol=1e-12)
    np.testing.assert_allclose(c.margin_difference, c.margin_a - c.margin_b, rtol=1e-15)
    same = compare(a, a, data)
    assert np.all(same.distance == 0) and np.all(same.margin_difference == 0)


def test_compare_errors():
    ts = np.linspace(0, 1, 3)
    a = _synthetic(ts, np.ones((3, 2)))
    with pytest.raises(ValueError, match="different models"):
        compare(a, _synthetic(ts, np.ones((3, 2)), model_spec={"class": "ToyLeaky",
                                                               "kwargs": {}}))
    with pytest.raises(ValueError, match="do not overlap"):
        compare(a, _synthetic(ts + 5.0, np.ones((3, 2))))
    with pytest.raises(TypeError, match="must be a Trajectory"):
        compare(a, np.ones((3, 2)))
    data = toy_dataset(0)
    traj = run(RMSProp(0.1), ToyLeaky(key=jax.random.PRNGKey(0)), data, 10)
    with pytest.raises(ValueError, match="not the data set trajectory `a` ran on"):
        compare(traj, traj, toy_dataset(1))


class _NotHomogeneous(ToyLeaky):
    def __call__(self, x):
        return super().__call__(x) + 0.1  # a bias: Phi(2w) != 4 Phi(w)


def test_non_homogeneous_model_is_refused():
    model = _NotHomogeneous(key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="not homogeneous of the degree it claims"):
        run(GD(0.1), model, toy_dataset(0), 10)


def test_float32_runs_in_float32():
    """dtype=float32 (GPU speed runs): float32 arrays throughout, the float64 time axis and
    metadata, and agreement with float64 to float32 accuracy (1e-4 relative after 200
    steps of a mild problem; float32 rounding is 6e-8 per operation)."""
    data = toy_dataset(0)
    model = ToyLeaky(key=jax.random.PRNGKey(2))
    opt = RMSProp(0.01, b=0.995, eps=1.0)
    t32 = run(opt, model, data, 200, save_every=20, dtype=jnp.float32)
    t64 = run(opt, model, data, 200, save_every=20)
    assert t32.w.dtype == np.float32 and t32.meta["dtype"] == "float32"
    np.testing.assert_array_equal(t32.ts, t64.ts)
    assert t32.meta["optimizer_hyper"] == t64.meta["optimizer_hyper"]
    assert np.max(np.abs(t32.w - t64.w)) <= 1e-4 * np.max(np.abs(t64.w))
    # The run describes the data as given (it once hashed its float32 copy, and the
    # analysis functions then refused the run's own Dataset).
    assert t32.meta["data"] == t64.meta["data"]
    assert t32.meta["data"]["fingerprint"] == data.fingerprint()
    from marginflow.analysis import normalized_margin

    # w agrees to 1e-4 relative (above); the margin q_min / ||w||^2, to a few times that.
    np.testing.assert_allclose(normalized_margin(model, data, t32),
                               normalized_margin(model, data, t64), rtol=1e-3, atol=1e-5)
