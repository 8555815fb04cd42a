"""What `simulate` checks and decides before it integrates: the arguments (`_check_args`),
the segments and the save slots of each compiled call, the kink tolerance, the devices a
batch is split over."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._cache import use_cache
from .._checks import check_finite_params, check_int, check_real_type, require_x64
from .._precision import precision_of
from .._threads import n_workers
from ..models import Objective
from ..models._homogeneity import check_homogeneous
from ..models._objective import initial_point
from ._flow import AbstractFlow
from ._solvers import default_controller, default_solver

# Segments are decades up to t = 1e10 and ten decades wide after. A segment's end clips the
# step that would cross it, which costs about one step per segment: measured on GD, MLP(4, 8,
# 2, k=2), t1 = 1e100, 485 steps from 1e5 on with decade segments against 359 in one solve.
# Late decades cost 2-15 steps each, so decade segments there spent 7-30% of the steps (and a
# Python round trip each) on clipping; the first ten decades hold the transients measured.
_DECADE_SEGMENTS_UNTIL = 10
_LATE_SEGMENT_DECADES = 10
# Save slots of one compiled segment call: a number fixed per model size, so that a run with
# another t1, n_save or ts reuses the compiled program; a segment holding more save times is
# integrated in several calls, each ending at a save time (about one clipped step each).
# The slots live in the solver state, which diffrax selects (accepted or not) at every step.
# Measured on MLP(50, 512, 2) (p = 26112), RMSProp to t = 1e3, n_save = 200, against diffrax's
# own saves (5.25 s, 333 steps): 64 slots 6.5-7.3 s (334 steps), 32 slots 5.1-5.4 s (341),
# 8 slots 5.9-6.8 s (374: more pieces, more clipped steps). So the slots shrink as p grows,
# keeping slots * p <= 2^20; the toy gets 64 (25-50 saves per decade with the default
# n_save = 200 and t1 <= 1e8). Medians of 3 on the shared 2-core machine.
_SAVE_SLOTS = 64
_SAVE_SLOTS_MIN = 4
# What `_save_fn` saves at each save time, in the Trajectory's and the checkpoints' order.
_SAVED = ("w", "m", "I", "log_loss", "h")
_SAVE_BUDGET = 2**20


def save_slots(p: int) -> int:
    """Save slots per segment call for p numbers per slot (B * p for a batch): the largest
    power of two <= 2^20 / p, within [4, 64]."""
    fit = _SAVE_BUDGET // max(int(p), 1)
    return int(min(_SAVE_SLOTS, max(_SAVE_SLOTS_MIN, 1 << max(fit.bit_length() - 1, 0))))


def _segment_bounds(t0: float, t1: float) -> list[float]:
    """t0, the segment ends strictly between t0 and t1, t1 (see the comment above)."""
    lo = 0 if t0 <= 0 else math.floor(math.log10(t0)) + 1
    hi = math.ceil(math.log10(t1)) - 1
    inner = [
        10.0**k
        for k in range(lo, hi + 1)
        if t0 < 10.0**k < t1
        and (k <= _DECADE_SEGMENTS_UNTIL or k % _LATE_SEGMENT_DECADES == 0)
    ]
    return [t0, *inner, t1]


def default_save_times(t0: float, t1: float, n_save: int) -> np.ndarray:
    """t0 then n_save - 1 log-spaced times of t - t0 up to t1 (first at min(1e-2, span/100))."""
    span = t1 - t0
    if n_save == 2:  # geomspace(first, span, 1) would be [first], not [span]
        return np.array([t0, t1])
    first = min(1e-2, span / 100.0)
    return np.concatenate([[t0], t0 + np.geomspace(first, span, n_save - 1)])


# ------------------------------------------------------------------- validation
def _check_number(x, name: str, rule: str, ok, example: str, where: str = "simulate") -> float:
    check_real_type(x, name, where, example)
    try:
        v = float(x)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: `{name}` must be a real number, got {x!r}.") from None
    if not ok(v):
        raise ValueError(f"{where}: `{name}` {rule}, got {x!r}; pass e.g. {name}={example}.")
    return v


def _check_args(flow, t0, t1, n_save, ts, rtol, atol, max_steps):
    if not isinstance(flow, AbstractFlow):
        raise TypeError(
            "simulate: `flow` must be a marginflow flow (GradientFlow(), AdaGradFlow(eps), "
            "RMSPropFlow(eps, b), AdamFlow(eps, b, b1=None), MomentumFlow(b1)), got "
            f"{type(flow).__name__}."
        )
    t0 = _check_number(t0, "t0", "must be finite and >= 0",
                       lambda v: math.isfinite(v) and v >= 0, "0.0")
    t1 = _check_number(t1, "t1", "must be finite", math.isfinite, "1e6")
    if not t1 > t0:
        raise ValueError(
            f"simulate: `t1` must be greater than `t0`, got t0 = {t0!r}, t1 = {t1!r}; "
            "pass the end time of the integration as t1 (e.g. 1e6)."
        )
    if t1 > 1e300:
        raise ValueError(f"simulate: `t1` must be <= 1e300 (float64 time axis), got {t1!r}; "
                         "pass e.g. t1=1e300.")
    rtol = _check_number(rtol, "rtol", "must be in (0, 1)", lambda v: 0 < v < 1, "1e-8")
    atol = _check_number(atol, "atol", "must be > 0", lambda v: math.isfinite(v) and v > 0,
                          "1e-12")
    max_steps = check_int(max_steps, "max_steps", "simulate", 1,
                          "pass e.g. max_steps=100_000 (a limit per segment)")
    if ts is None:
        n_save = check_int(n_save, "n_save", "simulate", 2,
                           "pass e.g. n_save=100 (t0 and log-spaced times up to t1)")
        ts = default_save_times(t0, t1, int(n_save))
    else:
        ts = np.asarray(ts, dtype=np.float64)
        if ts.ndim != 1 or ts.size < 1:
            raise ValueError(
                f"simulate: `ts` must be a 1-D array of save times, got shape {ts.shape}."
            )
        if not np.all(np.isfinite(ts)):
            raise ValueError("simulate: `ts` must be finite, found NaN/inf save times.")
        if ts[0] < t0 or ts[-1] > t1:
            raise ValueError(
                f"simulate: save times `ts` must lie in [t0, t1] = [{t0}, {t1}], got "
                f"[{ts[0]}, {ts[-1]}]; clip them or change t0/t1."
            )
        if np.any(np.diff(ts) <= 0):
            raise ValueError(
                "simulate: save times `ts` must be strictly increasing; sort them and "
                "drop duplicates (np.unique)."
            )
    return t0, t1, ts, rtol, atol, int(max_steps)


# The kink tolerance a piecewise-linear model gets by default (`_kink_tol`). Measured on
# MLP(5, 16, 2) with ReLU, 100 points, to t = 1e10 (benchmarks/kinks.py, docs/solvers.md):
# 6.6-9.0 thousand steps for the four flows, within 2e-5 (GD) to 2.6e-3 (Adam) of a run at
# 1e-4; 1e-2 took 0.6-1.3 thousand steps but differed by 3e-4 to 2.4e-2 (then with Dopri8
# for GD and AdaGrad, which now take Bosh3 on such models: `default_solver`).
DEFAULT_KINK_TOL = 1e-3


def _kink_tol(kink_tol, model, rtol: float) -> float | None:
    """The kink tolerance of the run: None (no kink steps) or a float in [rtol, 1)."""
    if kink_tol is None:
        return DEFAULT_KINK_TOL if model.piecewise_linear else None
    v = _check_number(kink_tol, "kink_tol", "must be 0 (off) or in (0, 1)",
                      lambda v: 0 <= v < 1, "1e-3")
    if 0 < v < rtol:
        raise ValueError(
            f"simulate: `kink_tol` must be 0 (off) or >= rtol = {rtol:g} (a kink step may "
            f"err up to kink_tol; below rtol it would accept nothing), got {kink_tol!r}; "
            "pass kink_tol=0 to resolve every kink at rtol."
        )
    return v or None


def _check_solver(solver) -> None:
    """A solver `simulate` can control: an adaptive diffrax solver instance, and an implicit
    one with its own root-finder tolerances (the step controller lends none: `CarriedPID`
    is not diffrax's PIDController, whose tolerances diffrax would copy)."""
    if isinstance(solver, type):
        raise TypeError(
            f"simulate: `solver` must be a solver instance, got the class "
            f"{solver.__name__}; pass {solver.__name__}(), or solver=None for the default."
        )
    if not isinstance(solver, dfx.AbstractSolver):
        raise TypeError(
            f"simulate: `solver` must be a diffrax solver (or marginflow's DecayIMEX(), "
            f"DecayHeun()), got {solver!r}; pass e.g. solver=diffrax.Dopri8(), or "
            "solver=None for the default."
        )
    if not isinstance(solver, dfx.AbstractAdaptiveSolver):
        raise ValueError(
            f"simulate: `solver` must be adaptive (its error estimate sizes the steps), got "
            f"{type(solver).__name__}, which has none; pass e.g. diffrax.Heun() for a "
            "low-order explicit solver, or solver=None for the default."
        )
    finder = getattr(solver, "root_finder", None)
    # diffrax's default is a marker, "taken from diffeqsolve(..., stepsize_controller=...)".
    try:
        from diffrax._root_finder import use_stepsize_tol
    except ImportError:  # another diffrax layout: let diffrax itself report it
        use_stepsize_tol = object()
    lent = [getattr(finder, tol, None) is use_stepsize_tol for tol in ("rtol", "atol")]
    if isinstance(solver, dfx.AbstractImplicitSolver) and any(lent):
        raise ValueError(
            f"simulate: an implicit `solver` needs its root finder's own tolerances, got "
            f"{type(solver).__name__} whose {type(finder).__name__} takes them from the step "
            "controller, which lends none here; pass e.g. newton_solver(1e-8), or "
            f"diffrax.{type(solver).__name__}(root_finder=diffrax.VeryChord(rtol=1e-8, "
            "atol=1e-12))."
        )


def _devices(batch: bool, shard, n_batch: int) -> list:
    """The devices a batch is split over: all local ones by default (shard=None)."""
    if shard is not None and not isinstance(shard, bool):
        raise TypeError(f"simulate: `shard` must be None, True or False, got {shard!r}.")
    if shard and not batch:
        raise ValueError(
            "simulate: shard=True splits a batch of initialisations over devices and needs "
            "batch=True; pass batch=True with stacked models, or drop `shard`."
        )
    if not batch or shard is False:
        return jax.local_devices()[:1]
    devices = jax.local_devices()
    return devices if n_batch > 1 else devices[:1]


@dataclasses.dataclass(frozen=True)
class Setup:
    """A checked run: everything `simulate` decides before it integrates."""

    flow: Any  # its float hyper-parameters in `dtype`
    objective: Any
    w0: Any  # (p,) or (B, p) in `dtype`, as given (the checkpoint's initial point)
    dtype: Any
    solver: Any
    controller: Any
    kink_tol: float | None  # None: every kink resolved at rtol
    t0: float
    t1: float
    save_ts: np.ndarray
    rtol: float
    atol: float
    max_steps: int
    batch: bool
    n_batch: int  # 0 for one run
    shard: bool | None
    devices: list
    threads: int

    @property
    def padded_w0(self):
        """w0 with the batch padded to a multiple of the device count (copies of the last
        member, dropped at the end): the vmapped segment then runs as one SPMD program,
        each device integrating its share of the initialisations."""
        extra = (-self.n_batch) % len(self.devices) if len(self.devices) > 1 else 0
        if not extra:
            return self.w0
        return jnp.concatenate([self.w0, jnp.repeat(self.w0[-1:], extra, axis=0)], axis=0)

    def checkpoint_header(self) -> dict:
        """What `resume` needs to rebuild the run (run.npz's header)."""
        flow, objective = self.flow, self.objective
        return {
            "flow": flow.name, "hyper": flow.hyperparameters(),
            "eps_placement": flow.eps_placement, "loss": objective.loss.name,
            "model": objective.model.spec(), "t0": self.t0, "t1": self.t1, "rtol": self.rtol,
            "atol": self.atol, "max_steps": self.max_steps,
            "dtype": jnp.dtype(self.dtype).name, "batch": self.batch, "shard": self.shard,
            # The chunking changes batched results at the tolerance level: resume with the
            # same one, whatever this machine's core count.
            "workers": self.threads,
            "kink_tol": self.kink_tol if self.kink_tol is not None else 0.0,
            # float32: TF32 or full products on a GPU; resume continues at the same one.
            "matmul_precision": precision_of(self.dtype),
        }

    def checkpoint_arrays(self) -> dict:
        return {"w0": np.asarray(self.w0), "X": np.asarray(self.objective.data.X),
                "y": np.asarray(self.objective.data.y), "save_ts": self.save_ts}


def setup(flow, model, data, t1, *, loss, t0, n_save, ts, solver, rtol, atol, max_steps,
          batch, dtype, shard, workers, kink_tol, checkpoint) -> Setup:
    """Check `simulate`'s arguments (ValueError / TypeError naming the rule, the value and
    the fix) and decide the solver, the controller, the devices and the threads."""
    t0, t1, save_ts, rtol, atol, max_steps = _check_args(
        flow, t0, t1, n_save, ts, rtol, atol, max_steps
    )
    if dtype not in (jnp.float64, jnp.float32):
        raise ValueError(f"simulate: `dtype` must be jnp.float64 or jnp.float32, got {dtype!r}.")
    require_x64(dtype, "simulate")
    if dtype == jnp.float32:
        if rtol < 1e-6:
            raise ValueError(
                f"simulate: with dtype=float32 `rtol` must be >= 1e-6 (float32 resolves "
                f"relative changes of 1.2e-7), got rtol = {rtol!r}; pass e.g. rtol=1e-5, "
                "atol=1e-8, or use float64."
            )
        if t1 > 1e30:
            raise ValueError(
                f"simulate: with dtype=float32 `t1` must be <= 1e30 (t = e^u and t * grad L "
                f"must stay below float32's 3.4e38), got t1 = {t1!r}; use float64 beyond."
            )
    template, w0 = initial_point(model, batch)
    objective = Objective(template, data, loss, where="simulate")
    if batch and w0.ndim != 2:
        raise ValueError("simulate: batch=True needs parameters with a leading batch axis.")
    check_finite_params(w0, "simulate")
    use_cache()  # compiled segments persist across processes (marginflow._cache)
    check_homogeneous(objective, w0, "simulate")

    w0 = jnp.asarray(w0, dtype=dtype)
    flow = jax.tree.map(lambda x: jnp.asarray(x, dtype) if eqx.is_inexact_array(x) else x, flow)
    if checkpoint is not None and solver is not None:
        raise ValueError(
            "simulate: `checkpoint` needs solver=None (the default solver), so that "
            "`resume` can rebuild it; got a custom solver."
        )
    kink_tol = _kink_tol(kink_tol, objective.model, rtol)
    if solver is not None:
        _check_solver(solver)
    if solver is None:
        kinks = kink_tol is not None
        solver = default_solver(flow, int(w0.shape[-1]), rtol=rtol, atol=atol,
                                dense_kinks=kinks and objective.model.dense_kinks,
                                frequent_kinks=kinks and objective.model.frequent_kinks)
    n_batch = int(w0.shape[0]) if batch else 0
    devices = _devices(batch, shard, n_batch)
    threads = n_workers(workers, n_batch if len(devices) == 1 else 1, "simulate")
    return Setup(flow=flow, objective=objective, w0=w0, dtype=dtype, solver=solver,
                 controller=default_controller(rtol, atol, kink_tol), kink_tol=kink_tol,
                 t0=t0, t1=t1, save_ts=save_ts, rtol=rtol, atol=atol, max_steps=max_steps,
                 batch=bool(batch), n_batch=n_batch, shard=shard, devices=devices,
                 threads=threads)


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    """The segments of a run and the save times each holds, and the save slots of one
    compiled segment call (a segment with more saves is integrated in several calls)."""

    bounds: list[float]
    saves: list[np.ndarray]  # the save times of segment k, in (bounds[k], bounds[k + 1]]
    slots: int

    @classmethod
    def of(cls, run: Setup) -> SegmentPlan:
        bounds = _segment_bounds(run.t0, run.t1)
        ts = run.save_ts
        saves = [ts[(ts > lo) & (ts <= hi)] if k else ts[ts <= hi]
                 for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))]
        return cls(bounds, saves, save_slots(run.padded_w0.size))  # B * p numbers per slot
