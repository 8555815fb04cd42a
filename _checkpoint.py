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

import contextlib
import errno
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
import warnings
import zipfile

import numpy as np

RUN_FILE = "run.npz"
LOCK_FILE = "run.lock"
# Version 5: run.npz holds a run id, every segment the run id and the SHA-256 of the file
# before it, and pytrees (the solver's state, a discrete run's carry) are written one way,
# `save_tree`. Version 4: the solver state holds psi at the last step's end (Lemma 3's I is
# accumulated from the step's end states, flows/_penalty.py) and AdaGrad's late solver is
# Dopri8. Version 3: the state saved at a segment's end is (v, m, I) with
# v = w ||w||^(L-1), under the key y_v (version 2: y_w held w). Version 2: segments are ten
# decades wide after t = 1e10 (version 1: decades throughout).
_FORMAT = "marginflow.checkpoint/5"
# What reading a damaged .npz raises: a truncated zip, a bad member, a bad header, I/O.
_DAMAGE = (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError)


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


# ------------------------------------------------------------------------------ the lock
# Folders this process holds, per thread: a run holds its folder for its whole length, and
# `resume` takes it before reading and keeps it through the `simulate` / `run` it calls.
_HELD: dict[str, tuple[int, int, bool]] = {}  # real path -> (thread, depth, lock held)
_HELD_GUARD = threading.Lock()


def _process_start(pid: int):
    """(state, start time in clock ticks since boot) of a process from /proc, or None where
    there is no /proc (not Linux) or no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int, start=None) -> bool:
    """Whether process `pid` runs and, where /proc tells, is the one that started at
    `start` (a pid reused after a restart, e.g. pid 1 in a restarted container, is not);
    a zombie does not run."""
    proc = _process_start(pid)
    if proc is not None:
        state, started = proc
        return state != "Z" and (start is None or started == start)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _describe(owner: dict) -> str:
    if not owner:
        return "an empty or unreadable lock file, which says no owner"
    since = owner.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
    return f"process {owner.get('pid', '?')} on host {owner.get('host', '?')} since {when}"


def _create_lock(path: str) -> bool:
    """Create the lock file with O_EXCL; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
    except FileExistsError:
        return False
    proc = _process_start(os.getpid())
    with os.fdopen(fd, "w") as fh:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                   "start": proc[1] if proc else None}, fh)
    return True


def _read_owner(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or damaged: treat as held


def _take_over_stale(path: str, owner: dict) -> None:
    """Move a dead process's lock aside (atomically) and delete it; if what moved was not
    that lock (another process replaced it meanwhile), put it back."""
    aside = f"{path}.{os.getpid()}.stale"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_owner(aside) != owner:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.unlink(aside)


# A lock file is filled right after it is created; one still unreadable after this long
# was left by a writer killed in between.
_FILL_SECONDS = 10.0


def _stale(path: str, owner: dict, key: str) -> bool:
    """Whether the lock `owner` describes was left by a run that no longer runs."""
    if not owner:  # unreadable: a writer killed between creating and filling it
        try:
            return time.time() - os.stat(path).st_mtime > _FILL_SECONDS
        except OSError:
            return False
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False  # another host's process cannot be checked from here
    if pid == os.getpid():
        # This process does not hold it (a holding thread is in _HELD): the lock is from an
        # earlier process that had the same pid (a restarted container's pid 1, say).
        with _HELD_GUARD:
            return key not in _HELD
    return not _pid_alive(pid, owner.get("start"))


def _acquire(directory: str, key: str) -> bool:
    """Take the lock; False (no lock held) for a folder this process may only read."""
    path = os.path.join(directory, LOCK_FILE)
    for _ in range(3):
        try:
            if _create_lock(path):
                return True
        except OSError as err:  # a read-only folder: nobody can write to it, so no lock
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                warnings.warn(f"checkpoint folder {directory!r} cannot be written "
                              f"({err.strerror}): it is read without a lock; a run with "
                              "segments still to compute cannot continue there.",
                              stacklevel=5)
                return False
            raise
        owner = _read_owner(path)
        if owner is None:
            continue  # released meanwhile
        if not _stale(path, owner, key):
            break
        warnings.warn(f"checkpoint folder {directory!r}: taking over the lock of a process "
                      f"that no longer runs ({_describe(owner)}); its run was killed.",
                      stacklevel=5)
        _take_over_stale(path, owner)
    owner = _read_owner(path) or {}
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        raise ValueError(
            f"checkpoint folder {directory!r} is in use by another thread of this process; "
            "two writers would splice their segments: wait for that run to end, or use "
            "another folder."
        )
    raise ValueError(
        f"checkpoint folder {directory!r} is in use: {path} names {_describe(owner)} as "
        "its writer, and two writers would splice their segments. Wait for that run to "
        "end, or use another folder; if no run uses the folder (a run killed on another "
        "host, which cannot be checked from here), delete the lock file."
    )


@contextlib.contextmanager
def locked(directory, *, create: bool = True):
    """Hold `directory`'s lock for the block; the folder is made if missing (`create`, for
    a new run) or must exist (a resume). A resume of a read-only folder reads it without a
    lock (with a warning): nothing can write there.

    Re-entrant within a thread; `locked(None)` does nothing (a run without checkpoints).
    """
    if directory is None:
        yield
        return
    directory = os.fspath(directory)
    if not create and not os.path.isdir(directory):
        raise ValueError(f"resume: {directory!r} is not a folder; pass the folder given as "
                         "`checkpoint=` to the run.")
    os.makedirs(directory, exist_ok=True)
    key = os.path.realpath(directory)
    me = threading.get_ident()
    with _HELD_GUARD:
        holder = _HELD.get(key)
        nested = holder is not None and holder[0] == me
        if nested:
            _HELD[key] = (me, holder[1] + 1, holder[2])
    if not nested:
        held = _acquire(directory, key)
        if not held and create:
            raise ValueError(f"checkpoint folder {directory!r} cannot be written; pass a "
                             "folder you can write to.")
        with _HELD_GUARD:
            _HELD[key] = (me, 1, held)
    try:
        yield
    finally:
        with _HELD_GUARD:
            tid, depth, held = _HELD[key]
            if depth > 1:
                _HELD[key] = (tid, depth - 1, held)
            else:
                del _HELD[key]
                if held:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, LOCK_FILE))


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
