"""Checkpoints know their run, saved trajectories are checked, and the CLI never loses a run
to a file it cannot write (issue 17's red-team cases).

- Two runs on one checkpoint folder: the second is refused (an O_EXCL lock), whether the
  other writer is another process or another thread; a killed writer's lock is taken over.
- A segment of another run, or one that does not follow its predecessor (the hash chain),
  is refused by name; a damaged newest (or middle) segment is moved aside with a warning
  and recomputed, and the resumed run equals the uninterrupted one bitwise.
- `Trajectory.load` refuses damaged files and arrays of different lengths, and a
  save/load round trip is exact (`eqx.tree_equal`).
- The CLI checks `--out` and `--checkpoint` before it computes, and every failure to write
  is one line and exit code 2.

The runs are the toy's RMSProp flow to t = 1e3 (four segment files) with the programs of
tests/test_checkpoint.py, so a session compiles them once.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import warnings

import equinox as eqx
import jax
import numpy as np
import pytest
from marginflow import _checkpoint as ckpt
from marginflow import _lock
from marginflow.discrete import RMSProp, resume_run, run
from marginflow.experiments._cli import main
from marginflow.flows import RMSPropFlow, Trajectory, resume, simulate
from marginflow.models import ToyLeaky, toy_dataset

FLOW = RMSPropFlow()
T1 = 1e3  # segments [0, 1], [1, 10], [10, 100], [100, 1000]


@pytest.fixture(scope="module")
def setup():
    return ToyLeaky(key=jax.random.PRNGKey(1)), toy_dataset(0)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The uninterrupted run and its checkpoint folder (copied by each test)."""
    model, data = setup
    directory = tmp_path_factory.mktemp("ref") / "c"
    traj = simulate(FLOW, model, data, T1, checkpoint=directory, n_save=10)
    assert traj.success and traj.stats["num_segments"] == 4
    assert not os.path.exists(directory / ckpt.LOCK_FILE)  # released at the end
    return traj, directory


def _copy(reference, tmp_path, name="c"):
    target = tmp_path / name
    shutil.copytree(reference[1], target)
    return target


def _assert_same(a, b):
    for field in ("ts", "w", "m", "conditioner", "log_loss", "I"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


# ------------------------------------------------------------------ one writer per folder
def test_a_folder_held_by_a_live_process_is_refused(setup, tmp_path):
    """Another process holds the lock (a live pid on this host): simulate and resume are
    refused with the lock's path and owner, before anything is written."""
    model, data = setup
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        directory = tmp_path / "c"
        directory.mkdir()
        (directory / ckpt.LOCK_FILE).write_text(json.dumps(
            {"pid": holder.pid, "host": os.uname().nodename, "since": 0}))
        with pytest.raises(ValueError, match=rf"is in use: .*process {holder.pid} on host"):
            simulate(FLOW, model, data, T1, checkpoint=directory, n_save=10)
        assert sorted(os.listdir(directory)) == [ckpt.LOCK_FILE]  # nothing written
        with pytest.raises(ValueError, match="is in use"):
            resume(directory)
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, taken over with a warning, and the run goes on.
    with pytest.warns(UserWarning, match="no longer runs"):
        traj = simulate(FLOW, model, data, T1, checkpoint=directory, n_save=10)
    assert traj.success and not os.path.exists(directory / ckpt.LOCK_FILE)


def test_an_empty_lock_file_is_stale_only_when_old(setup, tmp_path):
    """A writer killed between creating the lock and filling it leaves an empty file: in
    use while fresh (its writer may be about to fill it), stale after _lock._FILL_SECONDS."""
    import time

    model, data = setup
    directory = tmp_path / "c"
    directory.mkdir()
    lock = directory / ckpt.LOCK_FILE
    lock.write_text("")
    with pytest.raises(ValueError, match="is in use"):
        simulate(FLOW, model, data, T1, checkpoint=directory, n_save=10)
    old = time.time() - 2 * _lock._FILL_SECONDS
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="no longer runs"):
        assert simulate(FLOW, model, data, T1, checkpoint=directory, n_save=10).success


def test_two_runs_started_together_do_not_splice(setup, reference, tmp_path):
    """Two threads start a run on the same empty folder at the same moment. One of them
    writes the folder; the other is refused (the lock, or the folder already holding a
    run), and resuming the folder gives the one run, bitwise."""
    model, data = setup
    directory = tmp_path / "c"
    barrier, outcomes = threading.Barrier(2), [None, None]

    def start(i):
        barrier.wait()
        try:
            outcomes[i] = simulate(FLOW, model, data, T1, checkpoint=directory, n_save=10)
        except ValueError as err:
            outcomes[i] = err

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [o for o in outcomes if isinstance(o, ValueError)]
    runs = [o for o in outcomes if isinstance(o, Trajectory)]
    assert len(errors) == 1 and len(runs) == 1, outcomes
    assert "is in use" in str(errors[0]) or "already holds a run" in str(errors[0])
    _assert_same(resume(directory), reference[0])


# ------------------------------------------------------------------------- one run
def test_a_segment_of_another_run_is_refused(setup, reference, tmp_path):
    model, data = setup
    other = tmp_path / "other"
    simulate(FLOW, ToyLeaky(key=jax.random.PRNGKey(2)), data, T1, checkpoint=other, n_save=10)
    directory = _copy(reference, tmp_path)
    shutil.copy(other / "segment_00002.npz", directory / "segment_00002.npz")
    with pytest.raises(ValueError, match=r"segment_00002.npz belongs to another run"):
        resume(directory)


def test_a_segment_that_does_not_follow_its_predecessor_is_refused(reference, tmp_path):
    """Same run id, but segment 1 was rewritten after segment 2 was written (two copies of
    a run that diverged): the hash chain breaks at segment 2."""
    directory = _copy(reference, tmp_path)
    header, arrays = ckpt._read(str(directory / "segment_00001.npz"))
    header = {k: v for k, v in header.items() if k not in ("run_id", "prev_sha256")}
    arrays["w"] = arrays["w"] * (1 + 1e-12)
    ckpt.write_segment(str(directory), 1, header, **arrays)
    with pytest.raises(ValueError, match=r"segment_00002.npz does not follow segment_00001"):
        resume(directory)


# ------------------------------------------------------------------------- damage
@pytest.mark.parametrize("damaged", [3, 1], ids=["newest", "middle"])
def test_a_damaged_segment_is_moved_aside_and_recomputed(reference, tmp_path, damaged):
    directory = _copy(reference, tmp_path)
    path = directory / f"segment_{damaged:05d}.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a truncated write
    with pytest.warns(UserWarning, match=rf"segment_{damaged:05d}.npz is damaged"):
        again = resume(directory)
    assert again.success
    _assert_same(again, reference[0])
    aside = sorted(f for f in os.listdir(directory) if f.endswith(".damaged"))
    assert aside == [f"segment_{k:05d}.npz.damaged" for k in range(damaged, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the repaired folder reads cleanly
        _, _, segments = ckpt.read_checkpoint(str(directory))
    assert len(segments) == 4


def test_a_damaged_run_file_names_itself(reference, tmp_path):
    directory = _copy(reference, tmp_path)
    (directory / "run.npz").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ValueError, match=r"run.npz cannot be read .*new folder"):
        resume(directory)


def test_a_discrete_run_recovers_from_a_damaged_chunk(setup, tmp_path):
    model, data = setup
    opt = RMSProp(0.1, b=0.9, eps=1e-5)
    full = run(opt, model, data, 400, save_every=50, checkpoint=tmp_path / "d",
               blocks_per_checkpoint=2)
    path = tmp_path / "d" / "segment_00003.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="segment_00003.npz is damaged"):
        again = resume_run(tmp_path / "d")
    np.testing.assert_array_equal(again.w, full.w)
    np.testing.assert_array_equal(again.log_loss, full.log_loss)


# ------------------------------------------------------------------- Trajectory files
def test_trajectory_round_trip_is_exact(reference, tmp_path):
    traj = reference[0]
    traj.save(tmp_path / "t.npz")
    back = Trajectory.load(tmp_path / "t.npz")
    assert eqx.tree_equal(back, traj) is True
    assert back.stats == traj.stats and back.meta == traj.meta  # tuples stay tuples


def test_trajectory_round_trip_of_a_batched_discrete_run(setup, tmp_path):
    model, data = setup
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(jax.random.split(jax.random.key(3), 3))
    traj = run(RMSProp(0.1, b=0.9, eps=1e-5), models, data, 100, save_every=10, batch=True,
               workers=1)
    traj.save(tmp_path / "b.npz")
    back = Trajectory.load(tmp_path / "b.npz")
    # eqx.tree_equal treats NaN as unequal, and a discrete run's I is NaN: compare each
    # array bitwise (NaN equal to NaN) and the static fields exactly.
    for field in ("ts", "w", "m", "conditioner", "log_loss", "I"):
        assert getattr(back, field).dtype == getattr(traj, field).dtype
        np.testing.assert_array_equal(getattr(back, field), getattr(traj, field))
    assert (back.stats, back.meta, back.result, back.message) == (
        traj.stats, traj.meta, traj.result, traj.message)
    assert isinstance(back.stats["num_steps"], tuple)


def _rewrite(src, dst, **changes):
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(changes)
    np.savez(dst, **arrays)


def _header(**changes):
    """A header edit: changes[key] = None drops the key."""
    def edit(arrays, header):
        new = {k: v for k, v in dict(header, **changes).items() if v is not None}
        return {"header": np.array(json.dumps(new))}
    return edit


@pytest.mark.parametrize("change,needle", [
    (lambda a, h: {"w": a["w"][:5]}, r"w in .* has shape \(5, 3\), but ts holds n = 10"),
    (lambda a, h: {"log_loss": a["log_loss"][:, None]}, r"log_loss in .* has shape"),
    (lambda a, h: {"header": np.array("{not json")}, r"cannot be read as a Trajectory"),
    (_header(meta=None), r"header of .* lacks 'meta'"),
    (_header(result=3), r"'result' .* must be a str"),
    (_header(format="x"), r"not a marginflow Trajectory"),
    (lambda a, h: _header(stats={k: v for k, v in h["stats"].items() if k != "num_segments"})(
        a, h), r"stats in .* do not match a flow run's \(missing \['num_segments'\]"),
], ids=["rows", "ndim", "json", "missing-key", "type", "format", "stats"])
def test_trajectory_load_refuses_damaged_files(reference, tmp_path, change, needle):
    reference[0].save(tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz", allow_pickle=False) as f:
        arrays, header = {k: f[k] for k in f.files}, json.loads(str(f["header"]))
    _rewrite(tmp_path / "t.npz", tmp_path / "bad.npz", **change(arrays, header))
    with pytest.raises(ValueError, match=needle):
        Trajectory.load(tmp_path / "bad.npz")


def test_trajectory_load_of_a_truncated_file(reference, tmp_path):
    reference[0].save(tmp_path / "t.npz")
    data = (tmp_path / "t.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"cut.npz cannot be read as a Trajectory"):
        Trajectory.load(tmp_path / "cut.npz")


# ----------------------------------------------------------------------------- the CLI
CLI = ["simulate", "--flow", "rmsprop", "--model", "toy", "--t1", "1e4", "--no-progress",
       "--n-save", "40"]  # tests/test_cli.py's run


@pytest.mark.parametrize("where", ["read-only", "under-a-file"])
def test_cli_refuses_an_unwritable_out_before_computing(tmp_path, capsys, monkeypatch, where):
    """The report: 42 s of compute, then a PermissionError traceback and nothing written.
    Now the folder is checked first: simulate is never called."""
    import marginflow.flows

    calls = []
    monkeypatch.setattr(marginflow.flows, "simulate", lambda *a, **k: calls.append(1))
    if where == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o555)
        cause = "Permission denied"
    else:
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "out"  # a folder inside a file: ENOTDIR, even for root
        cause = "Not a directory"
    try:
        assert main([*CLI, "--out", str(out)]) == 2
    finally:
        if where == "read-only":
            out.chmod(0o755)
    err = capsys.readouterr().err
    assert calls == [] and len(err.strip().splitlines()) == 1
    assert "--out" in err and "cannot be written" in err and cause in err, err


@pytest.mark.parametrize("what", ["file", "too-long"])
def test_cli_out_naming_a_file_or_a_too_long_name(tmp_path, capsys, what):
    if what == "file":
        out = tmp_path / "a-file"
        out.write_text("")
        needle = "is a file"
    else:
        out = tmp_path / ("x" * 300)
        needle = "cannot be written"
    assert main([*CLI, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_cli_an_os_error_late_in_the_run_is_one_line(tmp_path, capsys, monkeypatch):
    """A write that fails after the run (the disk filled up meanwhile): one line, exit 2."""
    def full_disk(self, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(Trajectory, "save", full_disk)
    assert main([*CLI, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err
    assert "trajectory.npz" in err


# ------------------------------------------------------- progress and checkpoints as objects
def test_a_progress_meter_object_hears_every_segment(setup, reference, tmp_path):
    """`progress=` takes a meter object (as diffrax's progress_meter): it hears the start,
    "compiling" before the first call only, each segment's end time, and the close; a
    resumed run reports its restored segments at once."""
    from marginflow.flows import AbstractProgressMeter

    class Log(AbstractProgressMeter):
        def __init__(self):
            self.events = []

        def start(self, total):
            self.events.append(("start", total))

        def calling(self, first):
            self.events.append(("call", first))

        def compiled(self):
            self.events.append(("compiled",))

        def done(self, t, steps, compile_seconds, count=1):
            self.events.append(("done", t, count))

        def close(self):
            self.events.append(("close",))

    model, data = setup
    log = Log()
    simulate(FLOW, model, data, T1, n_save=10, progress=log)
    # A program made in this run (none if an earlier test compiled it) is reported within
    # the first call, before its segment is done: the rest of that call integrates.
    made = [k for k, e in enumerate(log.events) if e == ("compiled",)]
    assert all(1 < k < log.events.index(("done", 1.0, 1)) for k in made), log.events
    log.events = [e for e in log.events if e != ("compiled",)]
    assert log.events == [("start", 4), ("call", True), ("done", 1.0, 1), ("call", False),
                          ("done", 10.0, 1), ("call", False), ("done", 100.0, 1),
                          ("call", False), ("done", 1000.0, 1), ("close",)]
    directory = _copy(reference, tmp_path)
    os.remove(directory / "segment_00003.npz")
    log = Log()
    resume(directory, progress=log)
    log.events = [e for e in log.events if e != ("compiled",)]
    assert log.events == [("start", 4), ("done", 1000.0 / 10, 3), ("call", True),
                          ("done", 1000.0, 1), ("close",)]
    # A segment that fails reports where it stopped (the message's t), not its end.
    log = Log()
    traj = simulate(FLOW, model, data, T1, n_save=10, progress=log, max_steps=3, throw=False)
    stopped = [e for e in log.events if e[0] == "done"][-1][1]
    assert traj.result == "max_steps_reached" and stopped < 1.0, log.events
    assert f"at t = {stopped:.6g}:" in traj.message
    with pytest.raises(TypeError, match="`progress` must be True, False or a progress meter"):
        simulate(FLOW, model, data, T1, n_save=10, progress="yes")


def test_the_bar_says_integrating_only_after_the_segment_call():
    """Programs made before the first segment call (the homogeneity check, the start state)
    once turned the bar to "integrating" before anything was integrated."""
    from marginflow.flows._progress import TqdmProgressMeter

    meter = TqdmProgressMeter()
    meter.start(3)
    desc = lambda: meter.bar.desc.rstrip(": ")  # noqa: E731  (tqdm adds ": ")
    try:
        meter.compiled()  # the homogeneity check's program
        assert desc() == "simulate"
        meter.calling(True)
        assert desc() == "simulate (compiling)"
        meter.compiled()
        assert desc() == "simulate (integrating)"
        meter.done(1.0, 10, 2.0)
        meter.calling(False)
        meter.compiled()  # a later program (another save layout) does not relabel the bar
        assert desc() == "simulate"
    finally:
        meter.close()


def test_a_checkpoint_folder_object(setup, reference, tmp_path):
    """`checkpoint=` takes a CheckpointFolder, whose methods a subclass can extend: here
    one that counts the segments it writes."""
    from marginflow import CheckpointFolder

    class Counting(CheckpointFolder):
        written = 0

        def write_segment(self, k, header, **arrays):
            super().write_segment(k, header, **arrays)
            type(self).written += 1

    model, data = setup
    traj = simulate(FLOW, model, data, T1, n_save=10, checkpoint=Counting(tmp_path / "c"))
    assert Counting.written == 4
    _assert_same(traj, reference[0])
    _assert_same(resume(CheckpointFolder(tmp_path / "c")), reference[0])
    with pytest.raises(TypeError, match="`checkpoint` must be a folder"):
        simulate(FLOW, model, data, T1, checkpoint=3)


# ------------------------------------------------------------- the review's cases
def test_a_lock_with_this_pid_but_no_holder_is_stale(setup, tmp_path):
    """A restarted container gives its process the same pid (often 1) on the same host:
    a lock naming this pid that no thread of this process holds is an earlier process's.
    So is a lock naming a live pid whose start time differs (the pid was reused)."""
    import socket

    model, data = setup
    for name, owner in (("same-pid", {"pid": os.getpid()}),
                        ("reused-pid", {"pid": os.getppid(), "start": -1})):
        directory = tmp_path / name
        directory.mkdir()
        (directory / ckpt.LOCK_FILE).write_text(json.dumps(
            {"host": socket.gethostname(), "since": 0, **owner}))
        with pytest.warns(UserWarning, match="no longer runs"):
            assert simulate(FLOW, model, data, T1, checkpoint=directory, n_save=10).success


def test_a_read_only_folder_resumes_a_finished_run(reference, tmp_path, monkeypatch):
    """Archived checkpoints on a read-only mount: a finished run is read without a lock (a
    warning says so); a new run there is refused before anything is computed."""
    import errno

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", path)

    directory = _copy(reference, tmp_path)
    monkeypatch.setattr(_lock, "_create_lock", read_only)
    with pytest.warns(UserWarning, match="cannot be written"):
        _assert_same(resume(directory), reference[0])
    with pytest.raises(ValueError, match="cannot be written"), pytest.warns(UserWarning):
        simulate(FLOW, *reference_inputs(), T1, checkpoint=tmp_path / "new", n_save=10)


def reference_inputs():
    return ToyLeaky(key=jax.random.PRNGKey(1)), toy_dataset(0)


def test_a_bad_progress_writes_nothing(setup, tmp_path):
    model, data = setup
    with pytest.raises(TypeError, match="`progress`"):
        simulate(FLOW, model, data, T1, n_save=10, checkpoint=tmp_path / "c", progress="yes")
    assert not (tmp_path / "c" / "run.npz").exists()
    # None, 0 / 1 and numpy booleans still mean off / on
    assert simulate(FLOW, model, data, T1, n_save=10, progress=None).success


def test_reading_leaves_a_live_writers_temporary_file(reference, tmp_path):
    directory = _copy(reference, tmp_path)
    tmp = directory / ".segment_00004.npz.tmp"
    tmp.write_bytes(b"being written")
    ckpt.read_checkpoint(str(directory))  # a reader (a monitor, the CLI) leaves it
    assert tmp.exists()
    ckpt.read_checkpoint(str(directory), repair=True)  # the locked resume removes it
    assert not tmp.exists()


def test_a_second_repair_keeps_the_first_damaged_file(reference, tmp_path):
    directory = _copy(reference, tmp_path)
    path = directory / "segment_00003.npz"
    for _ in range(2):
        path.write_bytes(path.read_bytes()[:100])
        with pytest.warns(UserWarning, match="is damaged"):
            resume(directory)
    assert sorted(f for f in os.listdir(directory) if ".damaged" in f) == [
        "segment_00003.npz.damaged", "segment_00003.npz.damaged.1"]


def test_trajectory_load_of_a_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        Trajectory.load(tmp_path / "nowhere.npz")


# ------------------------------------------------------------- the second review's cases
def test_a_thread_cannot_take_over_a_lock_another_thread_is_creating(tmp_path, monkeypatch):
    """Between a thread creating the lock file and recording itself as its holder, another
    thread of the process used to see "this pid, no holder" and take the live lock over.
    The holder is now reserved before the file is created."""
    create = _lock._create_lock
    created, tried = threading.Event(), threading.Event()
    outcome = {}

    def slow_create(path):
        ok = create(path)
        if threading.current_thread().name == "A":
            created.set()
            tried.wait(10)
        return ok

    monkeypatch.setattr(_lock, "_create_lock", slow_create)

    def a():
        with _lock.locked(tmp_path / "c"):
            outcome["a"] = "held"

    thread = threading.Thread(target=a, name="A")
    thread.start()
    assert created.wait(10)
    try:
        with _lock.locked(tmp_path / "c"):
            outcome["b"] = "held"
    except ValueError as err:
        outcome["b"] = str(err)
    tried.set()
    thread.join()
    assert outcome["a"] == "held" and "another thread of this process" in outcome["b"]
    assert not (tmp_path / "c" / ckpt.LOCK_FILE).exists()  # released, no KeyError


def test_a_read_only_folder_does_not_compute_or_repair(reference, tmp_path, monkeypatch):
    import errno

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", path)

    directory = _copy(reference, tmp_path)
    os.remove(directory / "segment_00003.npz")
    (directory / ".segment_00003.npz.tmp").write_bytes(b"left by a killed writer")
    monkeypatch.setattr(_lock, "_create_lock", read_only)
    with pytest.raises(ValueError, match=r"cannot be written, and segment 3 .* remains"), \
            pytest.warns(UserWarning, match="read without a lock"):
        resume(directory)
    assert sorted(os.listdir(directory)) == [
        ".segment_00003.npz.tmp", "run.npz", "segment_00000.npz", "segment_00001.npz",
        "segment_00002.npz"]  # nothing written, nothing cleaned up


def test_a_checkpoint_written_before_eps_placement_resumes(setup, reference, tmp_path,
                                                          monkeypatch):
    """Folders of the first format-5 writers named the eps placement "conditioner"."""
    from marginflow.flows import _plan

    header = _plan.Setup.checkpoint_header

    def old_header(self):
        h = header(self)
        h["conditioner"] = "eps_" + h.pop("eps_placement")
        return h

    model, data = setup
    monkeypatch.setattr(_plan.Setup, "checkpoint_header", old_header)
    simulate(FLOW, model, data, T1, n_save=10, checkpoint=tmp_path / "c")
    monkeypatch.undo()
    os.remove(tmp_path / "c" / "segment_00003.npz")
    _assert_same(resume(tmp_path / "c"), reference[0])


def test_the_old_placement_names_stay_apart():
    from marginflow.discrete import GD
    from marginflow.flows import GradientFlow

    with pytest.raises(ValueError, match=r"`conditioner` must be one of \['eps_inside'"):
        GradientFlow(conditioner="paper")
    with pytest.raises(ValueError, match=r"`convention` must be one of \['paper'"):
        GD(0.1, convention="eps_outside")
    with pytest.warns(DeprecationWarning, match="optimizer.convention is deprecated"):
        assert GD(0.1, eps_placement="outside").convention == "pytorch"
