"""Checkpoints of long runs: one file per segment (a decade of t; ten after 1e10), atomically.

Layout of a checkpoint folder:
    run.npz             the inputs: flow, model spec and initial parameters, data, loss,
                        times, tolerances, and the run's identity (a random run id),
                        written once, before the first segment
    segment_00000.npz   the saves of segment 0 and the state at its end
    segment_00001.npz   ...
    run.lock            while a process writes to the folder (removed when it stops)

Every file is written to a temporary name in the same folder, flushed, fsync'ed and then
renamed over its final name (atomic on POSIX): a run killed at any moment leaves complete
files only, and loses at most the segment in progress. Stale temporary files of a killed
writer are removed when the folder is read again.

What `resume` may trust, and how it knows:
- **One writer.** `locked(dir)` creates run.lock with O_EXCL (atomic on POSIX and NFSv3+)
  before a run writes or a resume reads; a second process that tries gets a clear error.
  A lock left by a killed process on this host (its pid is gone) is taken over with a
  warning; a lock from another host cannot be checked and is reported with its path.
- **One run.** Each segment's header holds the run id of run.npz and the SHA-256 of the
  file before it (run.npz for segment 0): a hash chain. A segment of another run, or one
  that does not follow its predecessor (files copied between two diverged copies of a
  run), is refused, naming the file.
- **Damage.** A segment that cannot be read (a truncated or corrupted file; a disk error)
  ends the intact prefix: `resume` warns, moves it and the segments after it aside as
  `*.damaged` (nothing is deleted) and continues from the last intact segment.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
import warnings
import zipfile

import numpy as np

from ._lock import LOCK_FILE as LOCK_FILE
from ._lock import _umask, holds_lock
from ._lock import locked as locked

RUN_FILE = "run.npz"
# Version 9: the kink-step controller's state holds the step size of its last small
# rejection (`flows._solvers.CarriedPID`): a version-8 state lacks it. Version 8: a
# momentum flow on a piecewise-linear model integrates m1 itself (in t) until
# `flows._clock.lag_from`, not its lag r = m1 - g from t = 1: a version-7 segment after
# t = 1 holds r where version 8 reads m1. Version 7: AdaGrad's and RMSProp's flows integrate
# [t0, 1] in s = sqrt t (`flows._clock`), so their solver state there is in s. Version 6:
# the solver state's part for Lemma 3's I is a dead band per coordinate
# (`flows._penalty.Band`) instead of psi at the last step's end. Version 5: run.npz holds
# a run id, every segment the run id and the SHA-256 of the file before it, and pytrees
# (the solver's state, a discrete run's carry) are written one way, `save_tree`. Version
# 4: the solver state holds psi at the last step's end (Lemma 3's I is accumulated from
# the step's end states, flows/_penalty.py) and AdaGrad's late solver is Dopri8. Version
# 3: the state saved at a segment's end is (v, m, I) with v = w ||w||^(L-1), under the key
# y_v (version 2: y_w held w). Version 2: segments are ten decades wide after t = 1e10
# (version 1: decades throughout).
_FORMAT = "marginflow.checkpoint/9"
# What reading a damaged .npz raises: a truncated zip, a bad member, a bad header, I/O.
_DAMAGE = (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError)


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


# ------------------------------------------------------------------------ writing a run
# path -> ((inode, size, mtime_ns, ctime_ns), sha256): a file rewritten in place, or a
# folder deleted and made again, changes one of them even on coarse-timestamp file systems.
_HASHES: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def _sha256(path: str) -> str:
    """SHA-256 of a file's bytes (cached while its inode, size and times stay the same)."""
    st = os.stat(path)
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    cached = _HASHES.get(path)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    _HASHES[path] = (key, digest.hexdigest())
    return digest.hexdigest()


def _previous(directory: str, k: int) -> str:
    return os.path.join(directory, RUN_FILE) if k == 0 else segment_path(directory, k - 1)


def write_run(directory: str, header: dict, **arrays) -> None:
    """The inputs of a run (once), under a new run id. `header` is JSON; arrays are numpy.
    Call it holding `locked(directory)`."""
    os.makedirs(directory, exist_ok=True)
    existing = [f for f in os.listdir(directory) if f.endswith(".npz")]
    if existing:
        raise ValueError(
            f"checkpoint folder {directory!r} already holds a run ({len(existing)} files); "
            "continue it with resume(dir), or pass an empty / new folder."
        )
    header = dict(header, format=_FORMAT, run_id=uuid.uuid4().hex)
    atomic_savez(os.path.join(directory, RUN_FILE), header=np.array(json.dumps(header)),
                 **arrays)


def write_segment(directory: str, k: int, header: dict, **arrays) -> None:
    """Segment k, chained to the file before it (run.npz for k = 0)."""
    run_header, _ = _read(os.path.join(directory, RUN_FILE), header_only=True)
    header = dict(header, run_id=run_header["run_id"],
                  prev_sha256=_sha256(_previous(directory, k)))
    atomic_savez(segment_path(directory, k), header=np.array(json.dumps(header)), **arrays)


# ------------------------------------------------------------------------ reading a run
def read_checkpoint(directory: str, *, repair: bool = False):
    """(run header, run arrays, [(segment header, segment arrays), ...]) of a folder.

    Only complete files are ever present under their final names; with `repair` (under
    the lock) leftover temporary files of a killed writer are deleted. The segments
    returned are the intact prefix of the hash chain: a damaged segment ends it (with a
    warning; `repair=True`, which `resume` passes holding the lock, moves it and the later
    ones aside as *.damaged). A segment of another run, or one that does not follow the
    file before it, raises.
    """
    if not os.path.isdir(directory):
        raise ValueError(f"resume: {directory!r} is not a folder; pass the folder given as "
                         "`checkpoint=` to the run.")
    if repair:  # only under the lock: a live writer's temporary file is not a leftover
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(".tmp"):
                os.unlink(os.path.join(directory, name))
    run_path = os.path.join(directory, RUN_FILE)
    if not os.path.exists(run_path):
        raise ValueError(f"resume: {directory!r} holds no {RUN_FILE}; it is not a marginflow "
                         "checkpoint folder (or the run was killed before its first write).")
    try:
        run_header, run_arrays = _read(run_path)
    except _DAMAGE as err:
        raise ValueError(
            f"resume: {run_path} cannot be read ({type(err).__name__}: {err}); it holds the "
            "run's inputs, so the run cannot be continued: start it again in a new folder."
        ) from err
    found = run_header.get("format")
    if found != _FORMAT:
        if isinstance(found, str) and found.startswith("marginflow.checkpoint/"):
            raise ValueError(
                f"resume: {run_path} has checkpoint format {found!r}, this marginflow reads "
                f"{_FORMAT!r} (the segment layout, the state or the run identity changed); "
                "rerun it with simulate(..., checkpoint=a new folder)."
            )
        raise ValueError(f"resume: {run_path} is not a marginflow checkpoint.")
    segments = []
    k = 0
    while os.path.exists(segment_path(directory, k)):
        path = segment_path(directory, k)
        try:
            header, arrays = _read(path)
        except _DAMAGE as err:
            _damaged(directory, k, f"{type(err).__name__}: {err}", repair)
            break
        if header.get("run_id") != run_header["run_id"]:
            raise ValueError(
                f"resume: {path} belongs to another run (run id {header.get('run_id')!r}, "
                f"this folder's run.npz: {run_header['run_id']!r}); the folder mixes two "
                f"runs. Move {os.path.basename(path)} and the segments after it out of the "
                "folder to continue from the segment before it."
            )
        if header.get("prev_sha256") != _sha256(_previous(directory, k)):
            raise ValueError(
                f"resume: {path} does not follow {os.path.basename(_previous(directory, k))} "
                "(the hash chain of the run's files breaks there: the files come from two "
                f"copies of the run that diverged). Move {os.path.basename(path)} and the "
                "segments after it out of the folder to continue from the segment before it."
            )
        segments.append((header, arrays))
        k += 1
    return run_header, run_arrays, segments


def read_run(directory: str):
    """(header, arrays) of a folder's run.npz alone: the run's inputs, without reading (or
    hashing) its segments."""
    return _read(os.path.join(os.fspath(directory), RUN_FILE))


def _damaged(directory: str, k: int, why: str, repair: bool) -> None:
    later = []
    j = k
    while os.path.exists(segment_path(directory, j)):
        later.append(segment_path(directory, j))
        j += 1
    if repair:
        for path in later:  # never over an earlier repair's file: nothing is deleted
            aside, n = path + ".damaged", 1
            while os.path.exists(aside):
                aside, n = f"{path}.damaged.{n}", n + 1
            os.replace(path, aside)
    names = ", ".join(os.path.basename(p) for p in later)
    warnings.warn(
        f"resume: {segment_path(directory, k)} is damaged ({why}); continuing from the last "
        f"intact segment ({k} of them). "
        + (f"Moved aside as *.damaged: {names}." if repair else f"Not used: {names}."),
        stacklevel=3,
    )


def _read(path: str, *, header_only: bool = False):
    with np.load(path, allow_pickle=False) as f:
        header = json.loads(str(f["header"]))
        if not isinstance(header, dict):
            raise ValueError(f"the header of {path} is not a JSON object")
        arrays = {} if header_only else {k: f[k] for k in f.files if k != "header"}
    return header, arrays


# ------------------------------------------------------------------ the folder object
class CheckpointFolder:
    """A checkpoint folder, the object `simulate`, `resume`, `run` and `resume_run` work
    with (a path given as `checkpoint=` is wrapped in one). Its methods are this module's
    functions on its folder; a subclass may add to them (e.g. copy each segment elsewhere
    after `write_segment`)."""

    def __init__(self, directory):
        self.directory = os.fspath(directory)

    def __repr__(self) -> str:
        return f"CheckpointFolder({self.directory!r})"

    def locked(self, *, create: bool = True):
        return locked(self.directory, create=create)

    def write_run(self, header: dict, **arrays) -> None:
        write_run(self.directory, header, **arrays)

    def write_segment(self, k: int, header: dict, **arrays) -> None:
        write_segment(self.directory, k, header, **arrays)

    def read(self, *, repair: bool = False):
        return read_checkpoint(self.directory, repair=repair)

    def writable(self) -> bool:
        """Whether this thread holds the folder's lock (not in a read-only resume)."""
        return holds_lock(self.directory)

    def check_writable(self, what: str) -> None:
        """ValueError before `what` is computed in a folder that cannot be written."""
        if not self.writable():
            raise ValueError(f"checkpoint folder {self.directory!r} cannot be written, and "
                             f"{what} remains to be computed; copy the folder somewhere "
                             "writable and resume it there.")


def checkpoint_folder(checkpoint) -> CheckpointFolder | None:
    """`checkpoint=` as a CheckpointFolder (None stays None: no checkpoints)."""
    if checkpoint is None or isinstance(checkpoint, CheckpointFolder):
        return checkpoint
    if not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"`checkpoint` must be a folder (a str or os.PathLike) or a "
                        f"CheckpointFolder, got {checkpoint!r}.")
    return CheckpointFolder(checkpoint)


# ------------------------------------------------------------------ pytrees in a file
def save_tree(prefix: str, tree) -> dict:
    """A pytree's leaves as .npz entries `prefix_0`, `prefix_1`, ... (numpy arrays); its
    structure is not stored: `load_tree` takes it from a tree of the same kind."""
    import jax

    return {f"{prefix}_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))}


def load_tree(arrays: dict, prefix: str, like, what: str):
    """The pytree `save_tree(prefix, ...)` wrote, with the structure, leaf shapes and dtypes
    of `like` (a fresh tree of the same kind, or its `jax.eval_shape`). ValueError, ending
    with `what` (the likely cause and its fix), when the saved leaves do not fit it."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(like)
    saved = [arrays.get(f"{prefix}_{i}") for i in range(len(leaves))]
    if (any(x is None for x in saved) or f"{prefix}_{len(leaves)}" in arrays
            or [np.shape(x) for x in saved] != [np.shape(x) for x in leaves]):
        raise ValueError(f"resume: the saved {prefix!r} does not fit this run: {what}")
    return jax.tree.unflatten(
        treedef, [jnp.asarray(v, dtype=x.dtype) for v, x in zip(saved, leaves, strict=True)])
