"""float32 runs are traced at full float32 matrix-product precision (marginflow/_precision.py).

On recent NVIDIA GPUs JAX's default precision rounds float32 matrix products and
convolutions to TF32 (measured on an H200: the paper CNN's gradient 4.6e-3 from float64,
4.3e-7 at "highest"), too coarse for a controller at rtol >= 1e-6 or for comparing a
discrete run with its flow. The setting is read where the model is traced, so these tests
check it on any platform: a model records the precision each time it is traced.
"""

import os

import equinox as eqx
import jax
import marginflow  # noqa: F401  (float64)
import numpy as np
import pytest
from marginflow.discrete import RMSProp, run
from marginflow.flows import GradientFlow, simulate, simulate_sde
from marginflow.models import ToyLeaky, toy_dataset

_TRACED: list = []


def _recording_toy():
    """A new class each time (so no program traced for another test is reused): the toy,
    noting (input dtype, JAX's matmul precision) each time it is traced."""

    class RecordsPrecision(ToyLeaky):
        def __call__(self, x):
            _TRACED.append((x.dtype, jax.config.jax_default_matmul_precision))
            return super().__call__(x)

    return RecordsPrecision


def _simulate(model, data, dtype):
    return simulate(GradientFlow(), model, data, 10.0, dtype=dtype, rtol=1e-5, atol=1e-8,
                    n_save=3)


def _run(model, data, dtype):
    return run(RMSProp(0.01, b=0.9, eps=1e-5), model, data, 20, dtype=dtype)


def _sde(model, data, dtype):
    return simulate_sde(GradientFlow(), model, data, 0.01, batch_size=50, eta=0.001,
                        key=jax.random.key(0), n_paths=2, n_save=3, dtype=dtype)


def _batch(model):
    """Three initialisations (the recording class), for the batched runs: on a CPU they are
    cut into chunks integrated from worker threads, which must see the caller's setting."""
    return eqx.filter_vmap(lambda k: type(model)(key=k))(jax.random.split(jax.random.key(1), 3))


def _simulate_batch(model, data, dtype):
    return simulate(GradientFlow(), _batch(model), data, 10.0, dtype=dtype, rtol=1e-5,
                    atol=1e-8, n_save=3, batch=True, workers=2)


def _run_batch(model, data, dtype):
    return run(RMSProp(0.01, b=0.9, eps=1e-5), _batch(model), data, 20, dtype=dtype,
               batch=True, workers=2)


@pytest.mark.parametrize("entry", [_simulate, _run, _sde, _simulate_batch, _run_batch])
def test_float32_runs_are_traced_at_full_precision(entry):
    """A float32 run is traced at "highest", in every entry point and in the worker threads
    of a batch on a CPU (the entry checks evaluate the model in float64 whatever the run's
    dtype, so only traces in the run's dtype are looked at)."""
    model, data = _recording_toy()(key=jax.random.key(0)), toy_dataset(0)
    _TRACED.clear()
    traj = entry(model, data, np.float32)
    assert traj.success, traj.message
    in_dtype = {p for x, p in _TRACED if x == np.float32}
    assert in_dtype == {"highest"}, (entry.__name__, _TRACED)


def test_a_chosen_precision_and_float64_are_left_alone():
    """A precision the user chose is kept ("default" keeps TF32 for those who want it), and
    float64 runs are traced as the user's settings say. One helper decides this for every
    entry point (marginflow/_precision.py), so `run`, the cheapest to compile, stands for
    them."""
    model, data = _recording_toy()(key=jax.random.key(0)), toy_dataset(0)
    for dtype, chosen, expected in [(np.float32, "default", "default"),
                                    (np.float64, None, None)]:
        _TRACED.clear()
        with jax.default_matmul_precision(chosen):
            traj = _run(model, data, dtype)
        assert traj.success, traj.message
        in_dtype = {p for x, p in _TRACED if x == dtype}
        assert in_dtype == {expected}, (dtype, chosen, _TRACED)


def test_a_resume_continues_at_the_checkpoints_precision(tmp_path, monkeypatch):
    """The checkpoint of a float32 run records the precision it ran at, and `resume` /
    `resume_run` continue at it whatever the resuming process has set: full precision
    stays full inside `default_matmul_precision("default")`, and TF32 ("default") stays
    TF32 outside it. A float64 run records none and is resumed as the process says. Spied
    on: the precision in force when the resume calls `simulate` / `run` (the test above
    shows that the setting in force is the one traced), and the flow's thread chunks: a
    batch in 2 chunks, whose chunking the checkpoint records, once fell back to one call
    under the resume's precision. Each run loses its last checkpoint file, as a kill would
    leave it, so the resumes compute."""
    from marginflow.discrete import _resume as discrete_resume
    from marginflow.discrete import resume_run
    from marginflow.flows import _plan as flows_plan
    from marginflow.flows import _simulate as flows_simulate
    from marginflow.flows import resume

    seen, chunks = [], []

    def spy(original, into, value):
        def called(*args, **kwargs):
            out = original(*args, **kwargs)
            into.append(value(out))
            return out
        return called

    precision = lambda _: jax.config.jax_default_matmul_precision  # noqa: E731
    monkeypatch.setattr(flows_simulate, "simulate", spy(flows_simulate.simulate, seen, precision))
    monkeypatch.setattr(discrete_resume, "run", spy(discrete_resume.run, seen, precision))
    monkeypatch.setattr(flows_plan, "n_workers", spy(flows_plan.n_workers, chunks, int))
    model, data = ToyLeaky(key=jax.random.key(0)), toy_dataset(0)
    rule, files = RMSProp(0.01, b=0.9, eps=1e-5), dict(save_every=5, blocks_per_checkpoint=3)
    flow = simulate(GradientFlow(), _batch(model), data, 10.0, dtype=np.float32, rtol=1e-5,
                    atol=1e-8, n_save=3, batch=True, workers=2,
                    checkpoint=tmp_path / "flow")  # 2 files: [0, 1] and [1, 10]
    with jax.default_matmul_precision("default"):
        tf32 = run(rule, model, data, 60, dtype=np.float32, checkpoint=tmp_path / "tf32",
                   **files)  # 60 steps: 4 files of 3 saves
    f64 = run(rule, model, data, 60, checkpoint=tmp_path / "f64", **files)
    for name in ("flow", "tf32", "f64"):
        names = sorted(f for f in os.listdir(tmp_path / name) if f.startswith("segment_"))
        assert len(names) == (2 if name == "flow" else 4), names
        os.remove(tmp_path / name / names[-1])
    assert seen == []  # the spies see resumes only
    with jax.default_matmul_precision("default"):
        flow_again, f64_again = resume(tmp_path / "flow"), resume_run(tmp_path / "f64")
    tf32_again = resume_run(tmp_path / "tf32")
    assert seen == ["highest", "default", "default"]  # flow, f64, tf32
    assert chunks == [2, 2]  # the run's and the resume's
    for first, again in ((flow, flow_again), (tf32, tf32_again), (f64, f64_again)):
        np.testing.assert_array_equal(again.w, first.w)
