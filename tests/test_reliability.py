"""Failed runs keep what they computed; runs are deterministic (issue 7)."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import marginflow  # noqa: F401
import numpy as np
import pytest
from marginflow.flows import RMSPropFlow, SimulationError, simulate
from marginflow.models import Linear, ToyLeaky, toy_dataset


@pytest.fixture(scope="module")
def toy():
    return toy_dataset(0)


def test_max_steps_failure_returns_partial_trajectory(toy):
    model = ToyLeaky(key=jax.random.PRNGKey(1))
    traj = simulate(RMSPropFlow(), model, toy, 1e6, max_steps=40, throw=False)
    assert traj.result == "max_steps_reached"
    assert "max_steps" in traj.message and "Fix:" in traj.message
    # everything up to the failure is kept: the start, finite saves, times increasing
    assert traj.ts[0] == 0.0 and len(traj) >= 2
    assert np.all(np.isfinite(traj.w)) and np.all(np.diff(traj.ts) > 0)
    assert traj.ts[-1] < 1e6
    # the same run with throw=True raises and carries the same partial trajectory
    with pytest.raises(SimulationError, match="max_steps") as info:
        simulate(RMSPropFlow(), model, toy, 1e6, max_steps=40)
    np.testing.assert_array_equal(info.value.trajectory.w, traj.w)


class PoisonedFlow(RMSPropFlow):
    """RMSProp whose field turns NaN after t = 3: a forced non-finite state."""

    name: ClassVar[str] = "rmsprop"
    after: ClassVar[float] = 3.0

    def vector_field(self, t, w, m, g):
        dw, dm, h, dlogh = super().vector_field(t, w, m, g)
        poison = jnp.where(t > self.after, jnp.nan, 0.0)
        return dw + poison, dm, h, dlogh


def test_non_finite_state_returns_partial_trajectory(toy):
    model = Linear(2, key=jax.random.PRNGKey(0))
    traj = simulate(PoisonedFlow(1e-3, 0.9), model, toy, 100.0, throw=False, max_steps=2000)
    assert traj.result == "nonfinite_state"
    assert "non-finite" in traj.message and "Fix:" in traj.message
    assert np.all(np.isfinite(traj.w))
    saved_before = traj.ts[traj.ts <= 3.0]
    assert len(saved_before) >= 2 and traj.ts[-1] <= 3.0 + 1e-9
    with pytest.raises(SimulationError, match="non-finite"):
        simulate(PoisonedFlow(1e-3, 0.9), model, toy, 100.0, max_steps=2000)


def test_a_fresh_state_at_a_large_t0_follows_the_shifted_flow(toy):
    """RMSProp's field does not depend on t, so its flow from w0, m = 0 at t0 is the flow from
    0 shifted by t0. From t0 = 1e5 the first steps are 1 unit in the last place of
    u = log t (1.8e-15: the early phase of a run from w0); the guard once took a non-finite
    step within 1e-10 |u| for a non-finite field and stopped at once, with NaN saves.
    Bound: each of the run's steps errs by at most about rtol |w|, and the errors add
    (n_steps rtol, 1.8e-5 here; measured 1.3e-7 to 1.9e-7 on two machines)."""
    model, flow = ToyLeaky(key=jax.random.PRNGKey(0)), RMSPropFlow()
    rel = np.array([0.0, 1e-3, 1.0, 1e3])
    ref = simulate(flow, model, toy, rel[-1], ts=rel)
    late = simulate(flow, model, toy, 1e5 + rel[-1], t0=1e5, ts=1e5 + rel, throw=False)
    assert late.success, late.message
    np.testing.assert_array_equal(late.w[0], ref.w[0])
    bound = late.stats["num_steps"] * 1e-8
    err = np.linalg.norm(late.w - ref.w, axis=1) / np.linalg.norm(ref.w, axis=1)
    assert np.all(err <= bound), (err, bound)


def test_a_late_start_that_stops_at_once_says_why(toy):
    """From t0 > 0 with m = 0 a flow repeats its early phase at t0, where h is up to
    1/eps: with eps = 1e-12 outside the root the run from t0 = 2 does not leave t0 (at
    max_steps = 3,000 as at 300). The max_steps hint alone (more steps, looser rtol)
    points elsewhere; the message must name the start. A run that failed elsewhere, and a
    batch (whose members stop at different times), get no such note."""
    model = ToyLeaky(key=jax.random.PRNGKey(0))
    flow = RMSPropFlow(1e-12, 0.9, eps_placement="outside")
    traj = simulate(flow, model, toy, 20.0, t0=2.0, max_steps=300, n_save=5, throw=False)
    assert not traj.success and traj.ts[-1] <= 2.0 * (1 + 1e-3)
    assert "started at t0 = 2 from w0, m = 0" in traj.message, traj.message
    assert "Start at t0 = 0" in traj.message
    assert np.all(np.isfinite(traj.w))
    # Failed at t = 3, twice t0: another cause.
    later = simulate(PoisonedFlow(1e-3, 0.9), Linear(2, key=jax.random.PRNGKey(0)), toy,
                     100.0, t0=1.5, throw=False, max_steps=2000)
    assert later.result == "nonfinite_state" and "A likely cause" not in later.message
    batch = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(jax.random.split(jax.random.key(1), 2))
    both = simulate(flow, batch, toy, 20.0, t0=2.0, max_steps=300, n_save=5, throw=False,
                    batch=True)
    assert not both.success and "A likely cause" not in both.message


def test_a_run_stopped_at_its_first_step_keeps_its_start(toy):
    """From t0 = 3 on the field is NaN for every t > t0: the first step stops the run. Its
    save at t0 comes from that step's dense output, which once interpolated the NaN stages
    (0 * NaN at the step's start) and saved NaN there. (The settings of the non-finite test
    above: its compiled program.)"""
    model = Linear(2, key=jax.random.PRNGKey(0))
    traj = simulate(PoisonedFlow(1e-3, 0.9), model, toy, 100.0, t0=PoisonedFlow.after,
                    throw=False, max_steps=2000)
    assert traj.result == "nonfinite_state"
    np.testing.assert_array_equal(traj.w[0], np.asarray(model.weight).ravel())
    assert np.all(np.isfinite(traj.log_loss))


def test_same_seed_bitwise_identical(toy):
    runs = [
        simulate(RMSPropFlow(), ToyLeaky(key=jax.random.PRNGKey(7)), toy_dataset(3), 1e4)
        for _ in range(2)
    ]
    for field in ("ts", "w", "m", "conditioner", "log_loss", "I"):
        assert np.array_equal(getattr(runs[0], field), getattr(runs[1], field)), field
    assert runs[0].stats == runs[1].stats


def test_discrete_same_seed_bitwise_identical(toy):
    from marginflow.discrete import Adam, run

    runs = [run(Adam(0.05, b2=0.9, eps=1e-5), ToyLeaky(key=jax.random.PRNGKey(7)), toy, 500,
                save_every=25) for _ in range(2)]
    for field in ("ts", "w", "m", "conditioner", "log_loss"):
        assert np.array_equal(getattr(runs[0], field), getattr(runs[1], field)), field
