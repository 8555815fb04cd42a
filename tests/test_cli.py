"""The `marginflow` command line: the main job and its errors (issues 2 and 7)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from marginflow.experiments._cli import main
from marginflow.flows import Trajectory


def test_simulate_writes_trajectory_plot_and_summary(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["simulate", "--flow", "rmsprop", "--model", "toy", "--t1", "1e4", "--out",
               str(out), "--no-progress", "--n-save", "40"])
    assert rc == 0
    printed = capsys.readouterr().out
    for row in ("log L (final loss)", "||w||", "normalised margin", "h spread"):
        assert row in printed
    traj = Trajectory.load(out / "trajectory.npz")
    assert traj.success and traj.ts[-1] == pytest.approx(1e4)
    assert traj.meta["flow"] == "rmsprop" and traj.meta["model"]["class"] == "ToyLeaky"
    with open(out / "trajectory.png", "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert float(summary["log L (final loss)"]) == pytest.approx(traj.log_loss[-1], rel=1e-5)
    assert float(summary["||w||"]) == pytest.approx(np.linalg.norm(traj.w[-1]), rel=1e-5)


def test_simulate_a_relu_mlp_with_kink_steps(tmp_path, capsys):
    # --model relu-mlp has kinks: the RMSProp flow (the default) goes into the late phase
    # with kink steps, separates the data, and the job reports the kink steps. Without
    # them it stops before t = 0.1 (tests/test_kinks.py, benchmarks/kinks.py).
    out = tmp_path / "relu"
    rc = main(["simulate", "--model", "relu-mlp", "--data", "gaussians", "--t1", "1e10",
               "--kink-tol", "2e-3", "--out", str(out), "--no-progress", "--n-save", "10"])
    assert rc == 0
    traj = Trajectory.load(out / "trajectory.npz")
    assert traj.success and traj.meta["kink_tol"] == 2e-3
    assert traj.stats["num_kink_steps"] > 0 and traj.stats["num_steps"] <= 20_000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["normalised margin"] > 0
    assert summary["kink steps"] == traj.stats["num_kink_steps"]
    assert "kink steps" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--b", "1.2"], "`--b` must be a finite number < 1 (the m-equation decays at rate "
                          "1 - b, which must be > 0), got 1.2"),
        (["--eps", "0"], "`--eps` must be a finite number > 0, got 0.0"),
        (["--t1", "-5"], "--t1 must be > 0, got -5.0"),
        (["--model", "toy", "--data", "gaussians"], "--model toy takes 2-D inputs"),
        # The library's names in the command line's words: flags, and a fix to type.
        (["--n-save", "1"], "`--n-save` must be an integer >= 2, got 1; pass e.g. --n-save 100"),
        (["--kink-tol", "-1"], "`--kink-tol` must be 0 (off) or in (0, 1), got -1.0; pass "
                               "e.g. --kink-tol 1e-3"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    rc = main(["simulate", "--out", str(tmp_path / "x"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert "Traceback" not in err


def test_console_script_without_traceback(tmp_path):
    # The installed entry point: bad input exits non-zero with no Python traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "marginflow.experiments", "simulate", "--out",
         str(tmp_path / "y"), "--b", "1"],
        capture_output=True, text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2
    assert "`--b` must be a finite number < 1" in proc.stderr and "got 1.0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_reader_that_leaves_early_is_not_bad_input(tmp_path):
    """`marginflow simulate ... | true`: the pipe is closed before the summary is printed.
    It once exited with code 2 ("error: cannot access: Broken pipe"), the code of bad
    input; now 1 (a run whose output was cut short), with nothing on stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "marginflow.experiments", "simulate", "--out",
         str(tmp_path / "o"), "--t1", "1e3", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ | {"JAX_PLATFORMS": "cpu"},
    )
    proc.stdout.close()  # the reader leaves at once
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1, err
    assert "cannot access" not in err and "Traceback" not in err, err
    assert (tmp_path / "o" / "trajectory.npz").exists()  # written before the summary


def test_simulate_checkpoint_and_resume(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    rc = main(["simulate", "--t1", "1e8", "--out", str(tmp_path / "a"), "--no-progress",
               "--checkpoint", str(ckpt), "--n-save", "30"])
    assert rc == 0
    full = Trajectory.load(tmp_path / "a" / "trajectory.npz")
    # drop the last three decades, as a kill would, and resume from the command line
    for k in (6, 7, 8):
        (ckpt / f"segment_{k:05d}.npz").unlink()
    rc = main(["resume", str(ckpt), "--out", str(tmp_path / "b"), "--no-progress"])
    assert rc == 0 and "marginflow resume" in capsys.readouterr().out
    resumed = Trajectory.load(tmp_path / "b" / "trajectory.npz")
    np.testing.assert_array_equal(resumed.w, full.w)
    rc = main(["resume", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")])
    assert rc == 2 and "not a folder" in capsys.readouterr().err


def test_simulate_switches_the_cache_on_before_building_the_model(tmp_path, monkeypatch):
    """The model's random initialisation is a dozen small programs: with the persistent
    cache on before they compile, a warm process loads them (docs/performance.md)."""
    import marginflow._cache
    from marginflow.experiments import _cli

    order = []

    class Stop(Exception):
        pass

    def build(args):
        order.append("build")
        raise Stop

    monkeypatch.setattr(marginflow._cache, "use_cache", lambda: order.append("cache"))
    monkeypatch.setattr(_cli, "_build", build)
    with pytest.raises(Stop):
        main(["simulate", "--out", str(tmp_path / "x"), "--no-progress"])
    assert order == ["cache", "build"]


def test_console_entry_tunes_the_collector_of_its_own_process(monkeypatch):
    """`entry` (the console script and `python -m marginflow.experiments`) runs `main` with
    fewer collections and freezes the heap at the end, even when `main` raises, so the exit
    does not walk it; `main` leaves the collector alone (docs/performance.md)."""
    import gc
    from importlib.metadata import entry_points

    from marginflow.experiments import _cli

    (script,) = entry_points(group="console_scripts", name="marginflow")  # as installed
    assert script.value == "marginflow.experiments._cli:entry"
    before = gc.get_threshold()  # the suite's own (tests/conftest.py); Python's is below
    seen = []
    try:
        gc.set_threshold(700, 10, 10)
        monkeypatch.setattr(_cli, "main", lambda: seen.append(gc.get_threshold()) or 7)
        assert _cli.entry() == 7
        assert seen == [(10_000, 10, 10)] and gc.get_freeze_count() > 0
        gc.unfreeze()

        def fails():
            raise KeyboardInterrupt

        monkeypatch.setattr(_cli, "main", fails)
        with pytest.raises(KeyboardInterrupt):
            _cli.entry()
        assert gc.get_freeze_count() > 0
        # main itself, as a test or notebook calls it (bad input: it returns at once)
        monkeypatch.undo()
        gc.unfreeze()
        gc.set_threshold(700, 10, 10)
        assert _cli.main(["simulate", "--out", "x", "--t1", "-1"]) == 2
        assert gc.get_threshold() == (700, 10, 10) and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
