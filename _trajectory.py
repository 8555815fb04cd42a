"""`Trajectory`: one type for continuous and discrete runs, saved without pickle; and
`SimulationError`, what a failed run raises (carrying its partial Trajectory).

It sits at the top of the package because `flows.simulate`, `discrete.run` and `analysis`
all produce or read it (`marginflow.Trajectory`; also `marginflow.flows.Trajectory`)."""

from __future__ import annotations

import json
import os
import zipfile

import equinox as eqx
import numpy as np

from ._checkpoint import atomic_savez
from ._records import record_repr


def _member_stat(key: str, value, b: int):
    """Member b's value of a batched run's statistic (shared ones returned as they are)."""
    if key == "num_steps_per_segment":
        return tuple(row[b] for row in value)  # (segments, B) -> (segments,)
    if key == "segment_ends" or np.ndim(value) == 0:
        return value
    return np.asarray(value)[b].item()


def _index(k, n: int, where: str, name: str, what: str) -> int:
    """k as an index into n items (negative ones count from the end), or IndexError."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not -n <= k < n:
        raise IndexError(f"{where}: `{name}` must be an integer in [-{n}, {n}) (this "
                         f"trajectory has {n} {what}), got {k!r}; pass e.g. {name}=-1 for the "
                         "last.")
    return int(k)


class Trajectory(eqx.Module):
    """A run saved at times `ts` (flow time; t = k * eta for a discrete run).

    Arrays (numpy, float64 unless the run was float32); a leading batch axis B on every
    per-run array when many initialisations were run in one call:
    - ts (n,): save times;
    - w (n, p): flat parameters; m (n, p): second moments (momentum flows: (n, 2p), the
      second moments then the first moments, `m1`); `h()` (n, p): the conditioner;
    - log_loss (n,): log L(w(t));
    - I (n,): the integral I(t) = int_{t0}^t sum_i (-1/2 d log h_i/ds)_+ ds of the paper's
      Lemma 3, integrated with the flow (NaN for discrete runs);
    - stats: solver statistics, the keys declared per kind of run in `STATS_KEYS`. A flow:
      num_steps, num_accepted_steps, num_rejected_steps (per member in a batch);
      num_segments; num_steps_per_segment: (segments,) or (segments, B); segment_ends: the
      t at which each segment ends; for a run with kink steps, num_kink_steps and
      kink_log_time, their span in log t, and (flows without momentum, whose loss never
      rises) kink_loss_rise, the largest rise of log L from a save to the next relative to
      max(1, |log L|): above kink_tol, the kink steps erred more than kink_tol and the
      message says so. A discrete run: num_steps (per member);
    - result: "successful" or why the run stopped (e.g. "max_steps_reached"; "nonfinite_loss"
      for discrete runs); "not_separable" when `simulate` ran a Linear / DeepLinear model on
      data that no linear function separates (an exact LP check, made only when the run
      failed or ended with L >= ell(0)): the loss cannot go to 0, whether the solver stopped
      or reached t1. message: the reason in words and what to change (for other models, a
      run whose log L stopped falling above ell(0) keeps its result and gets a note that
      the data may not be separable by the model);
    - meta: flow / optimiser and hyper-parameters, loss, model spec and degree, data
      fingerprint, tolerances, solver, dtype.
    """

    ts: np.ndarray
    w: np.ndarray
    m: np.ndarray
    conditioner: np.ndarray
    log_loss: np.ndarray
    I: np.ndarray
    stats: dict = eqx.field(static=True)
    result: str = eqx.field(static=True)
    message: str = eqx.field(static=True)
    meta: dict = eqx.field(static=True)

    __repr__ = record_repr  # values, not shapes: each array's range and last value

    @property
    def m1(self) -> np.ndarray | None:
        """The first moments m1 (n, p) of a momentum flow's run (the second half of m), or
        None for a run without them."""
        p = self.w.shape[-1]
        return self.m[..., p:] if self.m.shape[-1] == 2 * p else None

    @property
    def success(self) -> bool:
        return self.result == "successful"

    @property
    def batched(self) -> bool:
        return self.w.ndim == 3

    def h(self) -> np.ndarray:
        """The conditioner h(t) at the save times, shape like `w`."""
        return self.conditioner

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @property
    def degree(self) -> int:
        return int(self.meta["degree"])

    def member(self, b: int) -> Trajectory:
        """Member b of a batched trajectory, as an unbatched Trajectory."""
        if not self.batched:
            raise ValueError("member(b) needs a batched trajectory (w of shape (B, n, p)).")
        b = _index(b, self.w.shape[0], "member", "b", "members")
        return Trajectory(
            ts=self.ts,
            w=self.w[b],
            m=self.m[b],
            conditioner=self.conditioner[b],
            log_loss=self.log_loss[b],
            I=self.I[b],
            stats={k: _member_stat(k, v, b) for k, v in self.stats.items()},
            result=self.result,
            # The batch's verdict and note (its kink step count is the most of a member).
            message=f"(of the batch of {self.w.shape[0]}) {self.message}" if self.message else "",
            meta=self.meta,
        )

    def model_at(self, i: int, b: int | None = None):
        """The equinox model with the parameters saved at index i (member b of a batch)."""
        from .models import from_spec, unflatten

        if self.batched and b is None:
            raise ValueError(
                "model_at: this trajectory is batched; pass the member, model_at(i, b=...)."
            )
        if b is not None and not self.batched:
            raise ValueError(f"model_at: `b` is for batched trajectories, got b = {b!r}; "
                             "drop it.")
        i = _index(i, self.ts.shape[0], "model_at", "i", "saves")
        if self.batched:
            w = self.w[_index(b, self.w.shape[0], "model_at", "b", "members"), i]
        else:
            w = self.w[i]
        return unflatten(from_spec(self.meta["model"]), np.asarray(w))

    def flow(self):
        """The flow object this trajectory was integrated with (continuous runs)."""
        from .flows._flow import flow_from_meta

        meta = self.meta  # files saved before eps_placement had the key "conditioner"
        return flow_from_meta(meta["flow"], meta["hyper"],
                              meta.get("eps_placement", meta.get("conditioner")))

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write to `path` (.npz; numpy arrays + JSON metadata, loadable without pickle).

        The file is written to a temporary name and renamed: never left half-written.
        `Trajectory.load` gives back an equal trajectory (`eqx.tree_equal`): tuples in
        stats and meta are marked in the JSON so that they come back as tuples.
        """
        path = os.fspath(path)
        header = {
            "stats": self.stats,
            "result": self.result,
            "message": self.message,
            "meta": self.meta,
            "format": _FORMAT,
        }
        atomic_savez(
            path,
            **{name: getattr(self, name) for name in _ARRAYS},
            header=np.array(json.dumps(_tag_tuples(header), allow_nan=True)),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trajectory:
        """Read a file written by `save` (no pickle involved), checking what it holds.

        Raises ValueError, naming the file and the rule, for a file that is not a
        Trajectory file, is damaged, lacks an array or a header entry, or whose arrays
        disagree in length (every saved array has one row per time in `ts`) or batch size.
        """
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                files = set(f.files)
                if "header" not in files:
                    raise ValueError(f"Trajectory.load: {path} is not a marginflow Trajectory "
                                     "file (no header); write one with Trajectory.save.")
                header = json.loads(str(f["header"]), object_hook=_untag_tuples)
                missing = [k for k in _ARRAYS if k not in files]
                if missing:
                    raise ValueError(f"Trajectory.load: {path} lacks the arrays {missing}; "
                                     "the file is damaged or was not written by "
                                     "Trajectory.save.")
                arrays = {k: f[k] for k in _ARRAYS}
        except (EOFError, zipfile.BadZipFile, json.JSONDecodeError) as err:
            # A file that is there but is not a Trajectory file. A missing or unreadable
            # file raises the OSError itself (FileNotFoundError, PermissionError).
            raise ValueError(f"Trajectory.load: {path} cannot be read as a Trajectory file "
                             f"({type(err).__name__}: {err}).") from err
        found = header.get("format") if isinstance(header, dict) else header
        if found not in (_FORMAT, _FORMAT_1):
            raise ValueError(f"Trajectory.load: {path} is not a marginflow Trajectory file "
                             f"(format {found!r}).")
        _check_header(header, path)
        if header["format"] != _FORMAT_1:  # files of format 1 may predate some stats keys
            _check_stats(header, path)
        _check_shapes(arrays, path)
        stats = header["stats"]
        if header["format"] == _FORMAT_1:  # tuples were written as lists
            stats = {k: _as_tuples(v) for k, v in stats.items()}
        return cls(**arrays, stats=stats, result=header["result"],
                   message=header["message"], meta=header["meta"])


_ARRAYS = ("ts", "w", "m", "conditioner", "log_loss", "I")
# The statistics each kind of run records (meta["kind"] -> the keys of Trajectory.stats):
# every key of the first tuple is present, those of the second when the run had them.
STATS_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "flow": (("num_steps", "num_accepted_steps", "num_rejected_steps", "num_segments",
              "num_steps_per_segment", "segment_ends"),
             ("num_kink_steps", "kink_log_time", "kink_loss_rise")),
    "discrete": (("num_steps",), ()),
    "sde": (("num_steps",), ()),
}
_FORMAT = "marginflow.Trajectory/2"  # /2: tuples in stats and meta are tagged
_FORMAT_1 = "marginflow.Trajectory/1"
_HEADER_TYPES = {"stats": dict, "result": str, "message": str, "meta": dict}


def _tag_tuples(x):
    """JSON has no tuple: write a tuple as {"__tuple__": [...]} (numpy scalars as numbers)."""
    if isinstance(x, tuple):
        return {"__tuple__": [_tag_tuples(v) for v in x]}
    if isinstance(x, list):
        return [_tag_tuples(v) for v in x]
    if isinstance(x, dict):
        return {k: _tag_tuples(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return _tag_tuples(tuple(x.tolist())) if x.ndim else x.item()
    if isinstance(x, np.generic):
        return x.item()
    return x


def _untag_tuples(obj: dict):
    return tuple(obj["__tuple__"]) if set(obj) == {"__tuple__"} else obj


def _as_tuples(v):
    return tuple(_as_tuples(x) for x in v) if isinstance(v, list) else v


def _check_header(header: dict, path: str) -> None:
    for key, kind in _HEADER_TYPES.items():
        if key not in header:
            raise ValueError(f"Trajectory.load: the header of {path} lacks {key!r}; the file "
                             "is damaged or was not written by Trajectory.save.")
        if not isinstance(header[key], kind):
            raise ValueError(f"Trajectory.load: {key!r} in the header of {path} must be a "
                             f"{kind.__name__}, got {type(header[key]).__name__}; the file is "
                             "damaged.")


def _check_stats(header: dict, path: str) -> None:
    """The stats keys that header["meta"]["kind"] declares (STATS_KEYS), and no others."""
    kind = header["meta"].get("kind")
    if kind not in STATS_KEYS:
        return  # a trajectory assembled by hand: nothing declared to check
    required, optional = STATS_KEYS[kind]
    keys = set(header["stats"])
    missing, unknown = set(required) - keys, keys - set(required) - set(optional)
    if missing or unknown:
        raise ValueError(f"Trajectory.load: the stats in {path} do not match a {kind} run's "
                         f"(missing {sorted(missing)}, unknown {sorted(unknown)}); the file "
                         "is damaged or was written by another version.")


def _check_shapes(arrays: dict, path: str) -> None:
    """One row per save time in every array, and one batch size (B) across them."""
    ts = arrays["ts"]
    if ts.ndim != 1:
        raise ValueError(f"Trajectory.load: ts in {path} must be 1-D (the save times), got "
                         f"shape {ts.shape}.")
    n = ts.shape[0]
    batched = arrays["w"].ndim == 3
    for name in _ARRAYS[1:]:
        a = arrays[name]
        per_time = name in ("log_loss", "I")  # (n,) or (B, n); the others (n, p) or (B, n, p)
        ndim = (1 if per_time else 2) + batched
        axis = -1 if per_time else -2
        if a.ndim != ndim or a.shape[axis] != n:
            want = ("(B, " if batched else "(") + ("n)" if per_time else "n, p)")
            raise ValueError(f"Trajectory.load: {name} in {path} has shape {a.shape}, but ts "
                             f"holds n = {n} save times, so it must be {want}; the file is "
                             "damaged or its arrays come from different runs.")
        if batched and a.shape[0] != arrays["w"].shape[0]:
            raise ValueError(f"Trajectory.load: {name} in {path} holds {a.shape[0]} runs and "
                             f"w {arrays['w'].shape[0]}; the file is damaged.")


class SimulationError(RuntimeError):
    """A run that stopped early (`simulate`, `resume`, `run`, `resume_run` with
    throw=True). `.trajectory` holds everything computed up to the failure."""

    def __init__(self, message: str, trajectory: Trajectory):
        super().__init__(message)
        self.trajectory = trajectory


def raise_if_failed(traj: Trajectory, where: str, throw: bool) -> Trajectory:
    """`traj`, or SimulationError carrying it if the run stopped early and throw=True."""
    if traj.result != "successful" and throw:
        raise SimulationError(
            f"{where}: {traj.message} The partial trajectory is in the exception's "
            "`.trajectory`; pass throw=False to get it returned instead.",
            traj,
        )
    return traj
