"""Checkpoints of long runs: one file per segment (a decade of t; ten after 1e10), atomically.

Layout of a checkpoint folder:
    run.npz             the inputs: flow, model spec and initial parameters, data, loss,
                        times, tolerances (written once, before the first segment)
    segment_00000.npz   the saves of segment 0 and the state at its end
    segment_00001.npz   ...
Every file is written to a temporary name in the same folder, flushed, fsync'ed and then
renamed over its final name (atomic on POSIX): a run killed at any moment leaves complete
files only, and loses at most the segment in progress. Stale temporary files of a killed
writer are removed when the folder is read again.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

RUN_FILE = "run.npz"
# Version 4: the solver state holds psi at the last step's end (Lemma 3's I is accumulated
# from the step's end states, flows/_penalty.py) and AdaGrad's late solver is Dopri8.
# Version 3: the state saved at a segment's end is (v, m, I) with v = w ||w||^(L-1), under
# the key y_v (version 2: y_w held w). Version 2: segments are ten decades wide after
# t = 1e10 (version 1: decades throughout).
_FORMAT = "marginflow.checkpoint/4"


def _umask() -> int:
    # os.umask only reads by setting: set a value and put the old one back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_savez(path: str, **arrays) -> None:
    """np.savez to `path` through a temporary file and an atomic rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 minus
        # the umask), which the rename keeps, so saved runs match the user's other files.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def segment_path(directory: str, k: int) -> str:
    return os.path.join(directory, f"segment_{k:05d}.npz")


def write_run(directory: str, header: dict, **arrays) -> None:
    """The inputs of a run (once). `header` is JSON; arrays are numpy."""
    os.makedirs(directory, exist_ok=True)
    existing = [f for f in os.listdir(directory) if f.endswith(".npz")]
    if existing:
        raise ValueError(
            f"checkpoint folder {directory!r} already holds a run ({len(existing)} files); "
            "continue it with resume(dir), or pass an empty / new folder."
        )
    header = dict(header, format=_FORMAT)
    atomic_savez(os.path.join(directory, RUN_FILE), header=np.array(json.dumps(header)),
                 **arrays)


def write_segment(directory: str, k: int, header: dict, **arrays) -> None:
    atomic_savez(segment_path(directory, k), header=np.array(json.dumps(header)), **arrays)


def read_checkpoint(directory: str):
    """(run header, run arrays, [(segment header, segment arrays), ...]) of a folder.

    Only complete files are ever present under their final names; leftover temporary files
    of a killed writer are deleted here.
    """
    if not os.path.isdir(directory):
        raise ValueError(f"resume: {directory!r} is not a folder; pass the folder given as "
                         "`checkpoint=` to the run.")
    for name in os.listdir(directory):
        if name.startswith(".") and name.endswith(".tmp"):
            os.unlink(os.path.join(directory, name))
    run_path = os.path.join(directory, RUN_FILE)
    if not os.path.exists(run_path):
        raise ValueError(f"resume: {directory!r} holds no {RUN_FILE}; it is not a marginflow "
                         "checkpoint folder (or the run was killed before its first write).")
    run_header, run_arrays = _read(run_path)
    found = run_header.get("format")
    if found != _FORMAT:
        if isinstance(found, str) and found.startswith("marginflow.checkpoint/"):
            raise ValueError(
                f"resume: {run_path} has checkpoint format {found!r}, this marginflow reads "
                f"{_FORMAT!r} (the segment layout or the state changed); rerun it with "
                "simulate(..., checkpoint=a new folder)."
            )
        raise ValueError(f"resume: {run_path} is not a marginflow checkpoint.")
    segments = []
    k = 0
    while os.path.exists(segment_path(directory, k)):
        segments.append(_read(segment_path(directory, k)))
        k += 1
    return run_header, run_arrays, segments


def _read(path: str):
    with np.load(path, allow_pickle=False) as f:
        header = json.loads(str(f["header"]))
        arrays = {k: f[k] for k in f.files if k != "header"}
    return header, arrays
