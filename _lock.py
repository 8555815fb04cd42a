"""One writer per checkpoint folder: the lock file `run.lock`, created with O_EXCL.

A run, and a resume, hold it from before their first write to their end (`locked`).
Another process, or another thread of this one, that tries to write to the folder
meanwhile gets an error naming the owner. A lock left by a run that no longer runs on this
host (its process is gone, is a zombie, or its pid now belongs to a later process) is
taken over with a warning; one from another host cannot be checked. A read-only folder
(an archive) is read without a lock."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import warnings

LOCK_FILE = "run.lock"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
        # No other thread of this process holds it (`locked` reserves the entry of the
        # thread acquiring it before it calls `_acquire`): the lock is from an earlier
        # process that had the same pid (a restarted container's pid 1, say).
        with _HELD_GUARD:
            holder = _HELD.get(key)
        return holder is None or holder[0] == threading.get_ident()
    return not _pid_alive(pid, owner.get("start"))


def _read_only(directory: str, err: OSError) -> bool:
    warnings.warn(f"checkpoint folder {directory!r} cannot be written ({err.strerror}): it "
                  "is read without a lock; a run with segments still to compute cannot "
                  "continue there.", stacklevel=6)
    return False


def _acquire(directory: str, key: str) -> bool:
    """Take the lock; False (no lock held) for a folder this process may only read."""
    path = os.path.join(directory, LOCK_FILE)
    for _ in range(3):
        try:
            if _create_lock(path):
                return True
        except OSError as err:  # a read-only folder: nobody can write to it, so no lock
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return _read_only(directory, err)
            raise
        owner = _read_owner(path)
        if owner is None:
            continue  # released meanwhile
        if not _stale(path, owner, key):
            break
        try:
            _take_over_stale(path, owner)
        except OSError as err:  # a read-only archive that kept a killed writer's lock
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                return _read_only(directory, err)
            raise
        warnings.warn(f"checkpoint folder {directory!r}: took over the lock of a process "
                      f"that no longer runs ({_describe(owner)}); its run was killed.",
                      stacklevel=5)
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
        elif holder is not None:
            raise ValueError(
                f"checkpoint folder {directory!r} is in use by another thread of this "
                "process; two writers would splice their segments: wait for that run to "
                "end, or use another folder.")
        else:  # reserved before the lock file exists, so no other thread takes it meanwhile
            _HELD[key] = (me, 1, None)
    if not nested:
        try:
            held = _acquire(directory, key)
            if not held and create:
                raise ValueError(f"checkpoint folder {directory!r} cannot be written; pass "
                                 "a folder you can write to.")
        except BaseException:
            with _HELD_GUARD:
                del _HELD[key]
            raise
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


def holds_lock(directory) -> bool:
    """Whether this thread holds `directory`'s lock (False inside a read-only resume): only
    then may it write there, or clean it up."""
    with _HELD_GUARD:
        holder = _HELD.get(os.path.realpath(os.fspath(directory)))
    return holder is not None and holder[0] == threading.get_ident() and bool(holder[2])
