"""Checkpoint and resume under SIGKILL (issue 7).

A child process runs a long `simulate(..., checkpoint=DIR)` (t1 = 1e300: 40 segments, one
file each) or a long discrete `run(..., checkpoint=DIR)` (200 files), and is killed with
SIGKILL once a random number of segment files exists (plus a random delay); a second child
resumes and is killed again, twice; then `resume` / `resume_run` completes the run. Every
file present under its final name must be complete at every kill, and the resumed
trajectory must equal the uninterrupted one (the same compiled steps from the same restored
state: bitwise, which is stronger than "within the solver's tolerance").
"""

import os
import signal
import subprocess
import sys
import time

import jax
import marginflow  # noqa: F401
import numpy as np
import pytest
from marginflow._checkpoint import read_checkpoint
from marginflow.discrete import RMSProp, resume_run, run
from marginflow.flows import RMSPropFlow, resume, simulate
from marginflow.models import Linear, ToyLeaky, soudry_dataset, toy_dataset

T1 = 1e300
STEPS, SAVE_EVERY = 200_000, 1000  # discrete: 200 save blocks, one file each
CHILD = f"""
import sys, jax, marginflow
from marginflow.flows import RMSPropFlow, simulate, resume
from marginflow.discrete import RMSProp, run, resume_run
from marginflow.models import ToyLeaky, toy_dataset
model, data = ToyLeaky(key=jax.random.PRNGKey(1)), toy_dataset(0)
if sys.argv[1] == "start-flow":
    simulate(RMSPropFlow(1e-5, 0.9), model, data, {T1}, checkpoint=sys.argv[2])
elif sys.argv[1] == "start-discrete":
    run(RMSProp(0.1, b=0.9, eps=1e-5), model, data, {STEPS}, save_every={SAVE_EVERY},
        checkpoint=sys.argv[2], blocks_per_checkpoint=1)
elif sys.argv[1] == "resume-flow":
    resume(sys.argv[2])
else:
    resume_run(sys.argv[2])
"""


def _segments(directory):
    if not os.path.isdir(directory):
        return 0
    return sum(1 for f in os.listdir(directory) if f.startswith("segment_"))


def _run_and_kill(args, directory, target, delay, timeout=120.0):
    """Start the child; SIGKILL it `delay` s after `target` segment files exist.

    The random delay (0..20 ms, several segments' worth) lands the kill anywhere in a
    segment: during the integration or in the middle of writing a file. True if killed.
    """
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args, directory],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if _segments(directory) >= target:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    if proc.poll() is None:
        proc.kill()
    err = proc.stderr.read().decode()
    assert proc.wait() == 0, err
    return False


def _assert_only_complete_files(directory, kind):
    # read_checkpoint opens every final-name file fully (np.load of every array) and, with
    # repair (the writer is dead), removes hidden temporary files of a killed writer.
    header, arrays, segments = read_checkpoint(directory, repair=True)
    assert {"w0", "X", "y"} <= set(arrays)
    expected = ({"ts", "w", "m", "I", "log_loss", "h", "y_v", "y_m", "y_I"} if kind == "flow"
                else {"w", "m", "h", "log_loss", "carry_0"})
    for _, seg in segments:
        assert expected <= set(seg)
        assert np.all(np.isfinite(seg["w"]))
    assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]
    return len(segments)


@pytest.mark.slow  # 43 s; resume equals the uninterrupted run bitwise in the default tests
@pytest.mark.parametrize("kind", ["flow", "discrete"])
def test_sigkill_at_random_points_then_resume(tmp_path, kind):
    model, data = ToyLeaky(key=jax.random.PRNGKey(1)), toy_dataset(0)
    if kind == "flow":
        reference = simulate(RMSPropFlow(1e-5, 0.9), model, data, T1)
        n_total = reference.stats["num_segments"]
    else:
        reference = run(RMSProp(0.1, b=0.9, eps=1e-5), model, data, STEPS, save_every=SAVE_EVERY)
        n_total = STEPS // SAVE_EVERY
    rng = np.random.default_rng(12345 if kind == "flow" else 54321)
    directory = str(tmp_path / "ckpt")
    kills = []
    first = int(rng.integers(1, n_total // 3))
    if _run_and_kill([f"start-{kind}", directory], directory, first, rng.uniform(0, 0.02)):
        kills.append(_assert_only_complete_files(directory, kind))
    for _ in range(2):
        done = _segments(directory)
        target = int(rng.integers(done + 1, max(done + 2, n_total - 5)))
        if _run_and_kill([f"resume-{kind}", directory], directory, target,
                         rng.uniform(0, 0.02)):
            kills.append(_assert_only_complete_files(directory, kind))
    assert len(kills) >= 2, "the children finished before they could be killed"
    resumed = resume(directory) if kind == "flow" else resume_run(directory)
    assert resumed.success
    for field in ("ts", "w", "m", "conditioner", "log_loss", "I"):
        np.testing.assert_array_equal(getattr(resumed, field), getattr(reference, field))
    print(f"{kind}: killed after segments {kills} of {n_total}")


def test_checkpoint_folder_rules(tmp_path):
    model, data = ToyLeaky(key=jax.random.PRNGKey(1)), toy_dataset(0)
    directory = tmp_path / "c"
    simulate(RMSPropFlow(), model, data, 1e3, checkpoint=directory, n_save=10)
    with pytest.raises(ValueError, match="already holds a run"):
        simulate(RMSPropFlow(), model, data, 1e3, checkpoint=directory)
    with pytest.raises(ValueError, match="not a folder"):
        resume(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no run.npz"):
        resume(tmp_path / "empty")
    import diffrax

    with pytest.raises(ValueError, match="needs solver=None"):
        simulate(RMSPropFlow(), model, data, 1e3, checkpoint=tmp_path / "d",
                 solver=diffrax.Tsit5())
    # a finished run resumes to itself
    again = resume(directory)
    assert again.success and len(again) == 10


def test_discrete_checkpoint_rules(tmp_path):
    model, data = ToyLeaky(key=jax.random.PRNGKey(1)), toy_dataset(0)
    flow_dir = tmp_path / "flow"
    simulate(RMSPropFlow(), model, data, 10.0, checkpoint=flow_dir, n_save=5)
    with pytest.raises(ValueError, match="holds a flow run"):
        resume_run(flow_dir)
    with pytest.raises(ValueError, match="full-batch runs"):
        run(RMSProp(0.1, b=0.9, eps=1e-5), model, data, 10, batch_size=10,
            key=jax.random.PRNGKey(0), checkpoint=tmp_path / "d")
    with pytest.raises(ValueError, match="blocks_per_checkpoint"):
        run(RMSProp(0.1, b=0.9, eps=1e-5), model, data, 10, checkpoint=tmp_path / "e",
            blocks_per_checkpoint=0)
    # ... and the mirror case (was a KeyError: 'flow' from the flow's header keys)
    run(RMSProp(0.1, b=0.9, eps=1e-5), model, data, 10, checkpoint=tmp_path / "f")
    with pytest.raises(ValueError, match="holds a discrete run.*resume_run"):
        resume(tmp_path / "f")


# workers=2 with -m slow (13 s; the test suite's budget); 1 keeps the resume of a batch.
@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_batched_resume_keeps_the_thread_chunking(tmp_path, workers):
    """The thread chunking of a batch changes its numbers at the tolerance level, so the
    checkpoint records it and `resume` uses it, whatever the machine's core count: the
    resumed batch equals the uninterrupted one bitwise."""
    import equinox as eqx

    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(jax.random.split(jax.random.key(5), 5))
    flow, data, d = RMSPropFlow(1e-5, 0.9), toy_dataset(0), str(tmp_path / "ck")
    full = simulate(flow, models, data, 1e6, batch=True, workers=workers, checkpoint=d)
    for k in range(3, 10):  # drop the later decades, as a kill would
        path = os.path.join(d, f"segment_{k:05d}.npz")
        if os.path.exists(path):
            os.remove(path)
    again = resume(d)
    np.testing.assert_array_equal(again.w, full.w)
    np.testing.assert_array_equal(again.log_loss, full.log_loss)


# One case in the default run; each of the others compiles its own programs (~10 s each):
# they run with `-m slow`.
@pytest.mark.parametrize("batch,flow_name,kinked", [
    (False, "momentum", True),
    (False, "momentum", False),
    pytest.param(False, "adam_momentum", True, marks=pytest.mark.slow),
    pytest.param(True, "momentum", True, marks=pytest.mark.slow),
    pytest.param(True, "adam_momentum", False, marks=pytest.mark.slow),
])
def test_resume_across_the_momentum_lag_switch(tmp_path, batch, flow_name, kinked):
    """A momentum flow's first moment m1 becomes its lag r = m1 - g where u becomes log t,
    and the solver's own state is made anew (docs/math.md section 9): at t = 1 on a smooth
    model, and on a piecewise-linear one (the toy) at the first decade from
    1e4 / (1 - b1) = 2e4 on, t = 1e5. Resume from a checkpoint that ends before the switch
    and from one that ends after it: both must equal the uninterrupted run bitwise."""
    import equinox as eqx
    from marginflow.flows import AdamFlow, MomentumFlow

    make = (lambda k: ToyLeaky(key=k)) if kinked else (lambda k: Linear(2, key=k))
    if batch:
        model = eqx.filter_vmap(make)(jax.random.split(jax.random.key(6), 3))
    else:
        model = make(jax.random.key(6))
    flow = MomentumFlow(0.5) if flow_name == "momentum" else AdamFlow(1e-5, 0.9, b1=0.5)
    data = toy_dataset(0) if kinked else soudry_dataset(0)
    switch, t1 = (1e5, 1e6) if kinked else (1.0, 1e4)
    full = None
    for keep in (1, 2):  # the last segment kept ends at the switch, or one decade after
        d = str(tmp_path / f"ck{keep}")
        run_ = simulate(flow, model, data, t1, batch=batch, workers=1, checkpoint=d)
        full = run_ if full is None else full
        ends = list(run_.stats["segment_ends"])
        k = ends.index(switch) + keep
        assert ends[k - 1] == switch * 10.0 ** (keep - 1)
        while os.path.exists(os.path.join(d, f"segment_{k:05d}.npz")):
            os.remove(os.path.join(d, f"segment_{k:05d}.npz"))
            k += 1
        again = resume(d)
        np.testing.assert_array_equal(again.w, full.w)
        np.testing.assert_array_equal(again.m, full.m)
        np.testing.assert_array_equal(again.log_loss, full.log_loss)
        assert again.stats["num_steps"] == full.stats["num_steps"]


def test_a_resumed_float32_run_describes_the_data_as_given(tmp_path):
    """The checkpoint kept the float32 copy of the data, so the resumed run's fingerprint
    was that copy's and the analysis refused the Dataset the run was given."""
    import jax.numpy as jnp
    from marginflow.analysis import normalized_margin

    model, data, d = ToyLeaky(key=jax.random.PRNGKey(1)), toy_dataset(0), tmp_path / "f32"
    full = run(RMSProp(0.1, b=0.9, eps=1e-5), model, data, 60, save_every=5,
               dtype=jnp.float32, checkpoint=d, blocks_per_checkpoint=3)
    os.remove(os.path.join(d, "segment_00003.npz"))  # as a kill would leave it
    again = resume_run(d)
    np.testing.assert_array_equal(again.w, full.w)
    assert again.meta["data"] == full.meta["data"]
    assert normalized_margin(model, data, again) == normalized_margin(model, data, full)
