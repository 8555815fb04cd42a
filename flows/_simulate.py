"""`simulate`: integrate a flow on a model and data set with a diffrax adaptive solver.

The integration runs in segments, one per decade of t up to 1e10 ([0, 1], [1, 10], ...,
[1e9, 1e10]) and one per ten decades after ([1e10, 1e20], ...), each a call of ONE
jit-compiled diffeqsolve that carries the solver's and the step-size controller's state
across the boundary (so nothing restarts). Segments give a progress
meter that moves on the log scale the theory lives on, and a place to stop, report and
checkpoint.

`simulate` is a pipeline: check the arguments and decide the solver (`_plan.setup`), lay
out the segments and saves (`_plan.SegmentPlan`), run the segment loop (`_engine.Engine`,
with the compiled programs of `_kernels` and the fields of `_fields`), and build the
Trajectory.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from .. import _checkpoint as ckpt
from .._precision import at_precision, matmul_precision
from .._trajectory import Trajectory, raise_if_failed
from ._engine import Engine, Outcome
from ._flow import AbstractFlow
from ._plan import DEFAULT_KINK_TOL as DEFAULT_KINK_TOL
from ._plan import SegmentPlan, Setup, setup
from ._plan import default_save_times as default_save_times
from ._progress import progress_meter
from ._separation import separation_verdict
from ._solvers import kink_stats, solver_name


# ----------------------------------------------------------------------- simulate
def simulate(
    flow: AbstractFlow,
    model,
    data,
    t1: float,
    *,
    loss=None,
    t0: float = 0.0,
    n_save: int = 200,
    ts=None,
    solver=None,
    rtol: float = 1e-8,
    atol: float = 1e-12,
    max_steps: int = 100_000,
    progress=False,
    throw: bool = True,
    batch: bool = False,
    dtype=jnp.float64,
    shard: bool | None = None,
    checkpoint=None,
    workers: int | None = None,
    kink_tol: float | None = None,
    _resume: list | None = None,
) -> Trajectory:
    """Integrate `flow` on `model` and `data` from t0 to t1 and save a Trajectory.

    dw/dt = -h(t) * grad L(w), dm/dt = phi(m, grad L(w)), w(t0) = the model's parameters,
    m(t0) = 0, with L(w) = sum_i exp(-f(q_i(w))) (docs/math.md sections 1-2). The integral
    I(t) = int_{t0}^t sum_i (-1/2 d log h_i/ds)_+ ds of Lemma 3 is integrated alongside.

    Args:
        flow: GradientFlow(), AdaGradFlow(eps), RMSPropFlow(eps, b) or AdamFlow(eps, b).
        model: a marginflow model; its parameters are the initial point w(t0). With
            batch=True every parameter array has a leading axis B of initialisations
            (build them with eqx.filter_vmap(lambda k: ToyLeaky(key=k))(keys)).
        data: a Dataset. loss: "exponential" (default, binary), "logistic" or
            "cross_entropy" (default, multi-class).
        t1, t0: end and start time, 0 <= t0 < t1 <= 1e300. A run from w0 (and m = 0) at
            a large t0 repeats the early phase of a run from 0, whose steps log t in
            float64 stops resolving from about t0 = 3e5 (AdaGrad on the toy), 1e6
            (RMSProp), 3e6 (GD) (docs/errors.md, "Failed runs keep what they computed").
        n_save: number of save times, t0 then log-spaced up to t1; or ts: explicit times.
        solver: a diffrax solver, used throughout; None picks `default_solver(flow, p)`
            (DecayIMEX for the flows whose moments decay, Dopri8 for GD and AdaGrad).
        rtol, atol: the step-size controller's tolerances, on the integrated state (v, m)
            with v = w ||w||^(L-1) (relative errors of v and w agree within a factor L).
        max_steps: the most solver steps per segment (a decade of t up to 1e10, ten decades
            after; `stats["segment_ends"]` lists them); a segment holding more save times
            than one call's slots (64; fewer for models of more than 16384 parameters,
            `save_slots`) is integrated in several calls, each with this limit.
        progress: True for a tqdm meter over the segments (decades of t, ten decades after
            1e10), or a progress meter object (`TqdmProgressMeter`, `NoProgressMeter`, or
            a subclass of `AbstractProgressMeter` of your own).
        throw: raise SimulationError (holding the partial Trajectory) if the solver stops
            early, or if a Linear / DeepLinear model cannot separate the data (result
            "not_separable", checked by an LP only when the run failed or ended with
            L >= ell(0)); with throw=False the Trajectory is returned and its `result` /
            `message` say why.
        dtype: jnp.float64 (default; every theory check) or jnp.float32 (speed runs;
            needs rtol >= 1e-6 and t1 <= 1e30; its field is traced at JAX's matmul
            precision "highest" unless you set one, since GPUs round float32 products to
            TF32 by default: docs/performance.md, "The CNN on a GPU").
        shard: with batch=True, split the batch over all local devices (jax.sharding; the
            default None does so whenever there are several); False keeps one device.
        checkpoint: a folder (or a `marginflow.CheckpointFolder`); the run is written
            there segment by segment (one file per segment, each written atomically) and
            `resume(folder)` continues it after a crash or kill, losing at most the segment
            in progress.
        workers: with batch=True on one CPU device, the batch is cut into this many equal
            chunks integrated concurrently from as many threads (one vmapped call keeps one
            core busy). Default: the cores this process may use; 1 = one vmapped call.
            Members do not interact, but batched kernels of another width may round
            differently and the step-size control turns that into differences at the
            tolerance level (measured on the toy to 1e5: bitwise equal with 2 chunks of 50,
            2.2e-5 absolute on w with 3 chunks of 34, as between sharded and unsharded runs).
        kink_tol: the kink tolerance tau for models whose gradient jumps (ReLU, leaky ReLU,
            max-pool: `model.piecewise_linear`). Where the solver is stuck among kinks
            (sliding along a switching surface, or crossing many), it accepts steps whose
            increment is within tau ||v|| (`CarriedPID`): each errs by at most about that,
            the cost is about 1 / tau steps per unit of relative change, and the run
            converges to the Filippov solution as tau falls (first order, measured;
            docs/solvers.md, "Non-smooth models: kink steps"). None (default): 1e-3 for
            piecewise-linear models, off for smooth ones (their solvers are unchanged); 0:
            off (every kink resolved at rtol, which can stall a ReLU network).
            `stats["num_kink_steps"]` and `stats["kink_log_time"]` say how many steps and
            how much log t went to it.

    How (docs/math.md section 2): [t0, 1] is integrated in t, the rest in u = log t, where the
    late fields are O(1) and steps are O(1) in u, i.e. a constant number per decade; the
    m-equation's decay (rate (1 - b) t in u) is the only stiff part and `default_solver`
    treats it implicitly, exactly and in O(p) (GD and AdaGrad have none: the explicit
    Dopri8); a momentum flow's first moment is integrated as its lag behind g from t = 1 on
    (on a piecewise-linear model, whose g jumps at kinks, from where (1 - b1) t reaches
    1e4, at most 1e6; docs/math.md section 9). Lemma 3's I(t) is accumulated from each step's end
    states (`PenaltyIntegral`), not integrated. t * grad L is formed as
    exp(log L + log t) * grad log L, so nothing underflows up to t = 1e300.

    Example:
        >>> import jax
        >>> from marginflow.flows import RMSPropFlow, simulate
        >>> from marginflow.models import ToyLeaky, toy_dataset
        >>> traj = simulate(RMSPropFlow(1e-5, 0.9), ToyLeaky(key=jax.random.key(0)),
        ...                 toy_dataset(0), t1=1e6)
    """
    run = setup(flow, model, data, t1, loss=loss, t0=t0, n_save=n_save, ts=ts, solver=solver,
                rtol=rtol, atol=atol, max_steps=max_steps, batch=batch, dtype=dtype,
                shard=shard, workers=workers, kink_tol=kink_tol, checkpoint=checkpoint)
    plan = SegmentPlan.of(run)
    meter = progress_meter(progress)  # checked before anything is written
    # One writer per checkpoint folder, for the whole run (marginflow/_checkpoint.py).
    folder = ckpt.checkpoint_folder(checkpoint)
    with folder.locked() if folder is not None else contextlib.nullcontext():
        if folder is not None and _resume is None:
            folder.write_run(run.checkpoint_header(), **run.checkpoint_arrays())
        engine = Engine(run, plan, meter=meter, checkpoint=folder)
        with matmul_precision(run.dtype):  # float32: no TF32 on GPUs (_precision.py)
            out = engine.integrate(_resume)
    return raise_if_failed(_trajectory(run, plan, out), "simulate", throw)


def _trajectory(run: Setup, plan: SegmentPlan, out: Outcome) -> Trajectory:
    """The Trajectory of a finished (or stopped) loop: the saves joined, the padding of a
    sharded batch dropped, the separation verdict and the kink note added to the message."""
    batch, n_batch = run.batch, run.n_batch
    axis = 1 if batch else 0
    kinks = kink_stats(out.state[0])  # counted across all segments (and resumed ones)
    cat = {k: np.concatenate(v, axis=0 if k == "ts" else axis) for k, v in out.chunks.items()}
    steps, accepted, rejected = out.steps, out.accepted, out.rejected
    if batch:  # drop the members that only padded the batch to the device count
        cat = {k: v if k == "ts" else v[:n_batch] for k, v in cat.items()}
        steps, accepted, rejected = (np.asarray(x)[:n_batch] for x in (steps, accepted, rejected))
    # A run that failed or ended without separating: does this model separate the data at
    # all? (An exact LP for linear models; a note on a stalled loss otherwise.)
    result, message = separation_verdict(
        run.objective, cat["ts"], cat["log_loss"], out.result, out.message, run.rtol, run.t1
    )
    rise = None
    if kinks is not None and np.any(np.asarray(kinks[0]) > 0):
        most = int(np.max(np.asarray(kinks[0])))
        message = (
            f"{message} {most} kink steps{' (the most of a member)' if batch else ''}: "
            f"where the solver was stuck among kinks it accepted steps within kink_tol = "
            f"{run.kink_tol:g}, so the accuracy there is kink_tol, not rtol (stats "
            "'num_kink_steps', 'kink_log_time'; kink_tol=0 resolves every kink at rtol)."
        ).strip()
        rise = _loss_rise(run.flow, cat["log_loss"])
        if rise is not None and np.max(rise) > run.kink_tol:
            message = (
                f"{message} The loss rose between saves (by {float(np.max(rise)):.3g} in "
                f"log L, relative to max(1, |log L|)), which the flow's never does: the "
                f"kink steps' error exceeds kink_tol here. Compare with a tighter kink_tol "
                "(stats 'kink_loss_rise')."
            )
    meta = _meta(run.flow, run.objective, run.t0, run.t1, run.rtol, run.atol, run.max_steps,
                 run.solver, run.dtype, batch)
    meta["kink_tol"] = run.kink_tol  # None: every kink resolved at rtol
    meta["wall_time_s"] = out.wall_time  # includes compilation on a first call
    # Of it: tracing, lowering and compiling (or loading from the persistent cache) the
    # programs; wall_time - compile_time_s is the integration itself.
    meta["compile_time_s"] = min(out.compile_time, out.wall_time)
    meta["devices"] = len(run.devices)
    per_segment = out.per_segment_steps
    return Trajectory(
        ts=cat["ts"], w=cat["w"], m=cat["m"], conditioner=cat["h"],
        log_loss=cat["log_loss"], I=cat["I"],
        stats={
            "num_steps": _plain(steps),
            "num_accepted_steps": _plain(accepted),
            "num_rejected_steps": _plain(rejected),
            "num_segments": len(out.chunks["ts"]),
            # steps of segment k, which ends at t = segment_ends[k] (decades up to 1e10, ten
            # decades after); per member for a batch: (segments, B)
            "num_steps_per_segment": _plain_nested(per_segment, n_batch if batch else 0),
            "segment_ends": tuple(float(b) for b in plan.bounds[1 : len(per_segment) + 1]),
            **_kink_counts(kinks, n_batch if batch else 0),
            **({} if rise is None else {"kink_loss_rise": _plain_float(rise)}),
        },
        result=result,
        message=message,
        meta=meta,
    )


def _kink_counts(kinks, n_batch: int) -> dict:
    """`stats` entries of a run with kink steps: how many, and their span in log t."""
    if kinks is None:
        return {}
    n, span = (np.asarray(x) for x in kinks)
    if n_batch:
        n, span = n[:n_batch], span[:n_batch]
    return {"num_kink_steps": _plain(n), "kink_log_time": _plain_float(span)}


def _loss_rise(flow, log_loss):
    """The largest rise of log L from one save to the next, relative to max(1, |log L|),
    per member (0 when it only falls); None for a flow whose loss may rise (momentum).

    Without momentum the flow's loss never rises: dL/dt = -g^T h g <= 0 for the diagonal
    conditioner h > 0 of GD, AdaGrad, RMSProp and Adam. A kink step errs by up to about
    kink_tol relative in v, which moves log L by about kink_tol max(1, |log L|) (late in
    training log L ~ -margin ||w||^L scales with v); a larger rise is the kink steps' error
    beyond kink_tol (measured on the narrowed CNN at kink_tol 1e-2: log L -0.43 at
    t = 0.046, 0.62 at t = 0.1; docs/solvers.md, "Dense kinks")."""
    if flow.n_moments != 1:
        return None
    log_loss = np.asarray(log_loss, dtype=np.float64)
    if log_loss.shape[-1] < 2:
        return np.zeros(log_loss.shape[:-1])
    scale = np.maximum(1.0, np.abs(log_loss[..., :-1]))
    rise = np.where(np.isfinite(log_loss[..., 1:]) & np.isfinite(log_loss[..., :-1]),
                    np.diff(log_loss, axis=-1) / scale, 0.0)
    return np.maximum(np.max(rise, axis=-1), 0.0)


def _plain_float(x):
    """A Python float (one run) or a tuple of floats (a batch)."""
    x = np.asarray(x)
    return float(x) if x.ndim == 0 else tuple(float(v) for v in x)


def _plain(x):
    """A Python int (one run) or a tuple of ints (a batch): hashable, as static fields want."""
    x = np.asarray(x)
    return int(x) if x.ndim == 0 else tuple(int(v) for v in x)


def _plain_nested(rows, n_batch: int):
    if not n_batch:
        return tuple(int(r) for r in rows)
    return tuple(tuple(int(v) for v in np.asarray(r)[:n_batch]) for r in rows)


def _meta(flow, objective, t0, t1, rtol, atol, max_steps, solver, dtype, batch) -> dict[str, Any]:
    return {
        "kind": "flow",
        "flow": flow.name,
        "hyper": flow.hyperparameters(),
        "eps_placement": flow.eps_placement,
        **objective.describe(),
        "t0": t0,
        "t1": t1,
        "rtol": rtol,
        "atol": atol,
        "max_steps_per_segment": max_steps,
        "solver": solver_name(solver),
        "dtype": jnp.dtype(dtype).name,
        "batch": bool(batch),
    }


def resume(checkpoint: str | os.PathLike, *, progress: bool = False,
           throw: bool = True) -> Trajectory:
    """Continue a run started with `simulate(..., checkpoint=DIR)` and return its Trajectory.

    Reads the inputs and the complete segments from DIR (a killed run leaves complete files
    only; a half-written temporary file is removed), restores the state, the step size and
    the solver state at the end of the last complete segment, and integrates the remaining
    segments, still writing checkpoints. A finished run is returned as it is. The result
    equals the uninterrupted run's (same compiled steps from the same state).

    The folder's lock is held while it runs (another process that tries to write to it gets
    a clear error), its segments must form the run's hash chain, and a damaged newest
    segment is moved aside with a warning and recomputed (marginflow/_checkpoint.py).
    """
    folder = ckpt.checkpoint_folder(checkpoint)
    with folder.locked(create=False):  # held through the simulate call
        return _resume(folder, progress, throw)


def _resume(folder, progress, throw: bool) -> Trajectory:
    from ..models import Dataset, from_spec, unflatten
    from ._flow import flow_from_meta

    header, arrays, segments = folder.read(repair=folder.writable())
    if header.get("kind") == "discrete":
        raise ValueError(
            f"resume: {folder.directory!r} holds a discrete run; continue it with "
            "marginflow.discrete.resume_run."
        )
    # ("conditioner": the key's name in folders written before eps_placement)
    flow = flow_from_meta(header["flow"], header["hyper"],
                          header.get("eps_placement", header.get("conditioner")))
    data = Dataset(arrays["X"], arrays["y"])
    skeleton = from_spec(header["model"])
    if header["batch"]:
        model = eqx.filter_vmap(lambda w: unflatten(skeleton, w))(jnp.asarray(arrays["w0"]))
    else:
        model = unflatten(skeleton, jnp.asarray(arrays["w0"]))
    dtype = jnp.float64 if header["dtype"] == "float64" else jnp.float32
    with at_precision(header.get("matmul_precision")):  # float32: the run's own precision
        return simulate(
            flow, model, data, header["t1"], loss=header["loss"], t0=header["t0"],
            ts=arrays["save_ts"], rtol=header["rtol"], atol=header["atol"],
            max_steps=header["max_steps"], progress=progress, throw=throw,
            batch=header["batch"], dtype=dtype, shard=header["shard"], checkpoint=folder,
            workers=header.get("workers"), kink_tol=header.get("kink_tol", 0.0),
            _resume=segments,
        )
