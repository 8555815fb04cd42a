"""The segment loop of `simulate`: each segment (a decade of t; ten after 1e10) is one or
more calls of the compiled `_segment`, carrying the solver's and the controller's state
across boundaries; the saves, step counts and the stop reason are collected on the host,
written to the checkpoint folder segment by segment, and restored from it on resume.

A stop is reported by result name (diffrax's, or "nonfinite_state"), a message that says
where, and a hint that says what to change (`Stop`)."""

from __future__ import annotations

import dataclasses
import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import _checkpoint as ckpt
from .._cache import CompileClock
from .._threads import map_chunks
from ._clock import LOG_T, SQRT_T, clock_of, lag_from, starts_in_sqrt_t, t_of_u, u_of_t
from ._fields import _to_lag, _w_of_v
from ._kernels import _band_to_log_time, _initial_y, _restart, _start, segment_program
from ._plan import SegmentPlan, Setup
from ._progress import AbstractProgressMeter
from ._stops import STOPS, Stop

# What `_save_fn` saves at each save time, in the Trajectory's and the checkpoints' order.
_SAVED = ("w", "m", "I", "log_loss", "h")

@dataclasses.dataclass
class Outcome:
    """What the loop collected: the saves per segment (`chunks[key]`, a list of arrays),
    the step counts (per member for a batch), why it stopped, and the clocks."""

    chunks: dict
    steps: object
    accepted: object
    rejected: object
    per_segment_steps: list
    result: str
    message: str
    wall_time: float
    compile_time: float
    state: object  # the controller's and solver's state at the end (kink counts inside)
    t_stopped: float | None = None  # where a failed segment stopped (None: none failed)


class Engine:
    """Runs a `Setup` along a `SegmentPlan`, writing each segment to `checkpoint` (a
    folder, whose lock the caller holds, or None)."""

    def __init__(self, run: Setup, plan: SegmentPlan, *, meter: AbstractProgressMeter,
                 checkpoint):
        self.run, self.plan, self.checkpoint, self.meter = run, plan, checkpoint, meter
        # The part of the wall time spent making programs; the meter hears when one is made.
        self.clock = CompileClock(on_compiled=self.meter.compiled)
        self.calls = 0  # segment calls made (see `_phase`)
        self.sqrt_start = False  # [t0, 1] in s = sqrt t? (set with the initial state)
        self.seg, self.start_fn, self.restart_fn = self._programs()

    def _programs(self):
        """The compiled functions, vmapped over a batch and cut into thread chunks."""
        run = self.run
        segment = segment_program(run.objective, run.w0, run.devices[0].platform)
        if not run.batch:
            return segment, _start, _restart
        restart_fn = eqx.filter_vmap(_restart,
                                     in_axes=(None, None, 0, None, None, None, 0, None))
        seg = eqx.filter_vmap(
            segment.jitted, in_axes=(None, None, 0, None, None, None, None, None, None, None, 0))
        start_fn = eqx.filter_vmap(_start, in_axes=(None, None, 0, None, None, None, None, None))
        if run.threads > 1:
            vmapped, threads = seg, run.threads

            def seg(flow, objective, y, lo, hi, clock, save_us, solver, controller,
                    max_steps, state):
                def call(y_part, state_part):
                    return vmapped(flow, objective, y_part, lo, hi, clock, save_us,
                                   solver, controller, max_steps, state_part)

                return map_chunks(call, (y, state), threads)

        return seg, start_fn, restart_fn

    def _u(self, t, clock):
        return jnp.asarray(u_of_t(t, clock), self.run.dtype)

    def _clock(self, lo):
        return clock_of(lo, self.sqrt_start, self.log_from)

    @property
    def log_from(self) -> float:
        """Where u becomes log t: 1, but later for a momentum flow on a piecewise-linear
        model (`_clock.lag_from`; of the slowest decay where a batch of flows has many)."""
        run = self.run
        if run.flow.n_moments == 1 or not run.objective.model.piecewise_linear:
            return 1.0
        return lag_from(float(np.min(1.0 - np.asarray(run.flow.b1))))

    def _phase(self):
        # Before the first segment call the meter says "compiling": in a fresh process it
        # traces and compiles (or loads) the program; later calls do not.
        self.meter.calling(first=self.calls == 0)
        self.calls += 1

    def _initial_state(self):
        """y = (v, m, I) at t0 (v: the margin-scale variable of `_w_of_v`, m = 0, I = 0),
        split over the devices for a sharded batch."""
        run = self.run
        y, g_max = _initial_y(run.flow, run.objective, run.padded_w0,
                              self._clock(run.t0) == LOG_T, run.dtype)
        self.sqrt_start = g_max is not None and starts_in_sqrt_t(run.flow, float(g_max))
        if len(run.devices) > 1:
            mesh = jax.sharding.Mesh(np.asarray(run.devices), ("batch",))
            y = jax.device_put(
                y, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
        return y

    def integrate(self, resume_segments) -> Outcome:
        """Run the segments not in `resume_segments` (a checkpoint's, or None)."""
        bounds = self.plan.bounds
        out = Outcome({k: [] for k in ("ts", *_SAVED)}, 0, 0, 0, [], "successful", "", 0.0,
                      0.0, None)
        self.meter.start(len(bounds) - 1)
        try:
            return self._integrate(resume_segments, out)
        finally:
            self.meter.close()

    def _integrate(self, resume_segments, out: Outcome) -> Outcome:
        run, bounds = self.run, self.plan.bounds
        y = self._initial_state()
        begin = time.perf_counter()
        first = self._clock(bounds[0])
        with self.clock:
            state = self.start_fn(run.flow, run.objective, y, self._u(bounds[0], first),
                                  self._u(bounds[1], first), jnp.asarray(first, jnp.int32),
                                  run.solver, run.controller)
        out.wall_time += time.perf_counter() - begin
        done = 0
        if resume_segments:
            y, state = self._restore(resume_segments, out, state)
            done = len(resume_segments)
            self.meter.done(bounds[done], int(np.sum(out.steps)), self.clock.seconds, done)
        for k, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if k < done or out.result != "successful":
                continue
            y, state = self._segment_k(k, lo, hi, y, state, out)
            # A failed segment reports where it stopped, not the end it aimed at.
            t = hi if out.t_stopped is None else out.t_stopped
            self.meter.done(t, int(np.sum(out.steps)), self.clock.seconds)
            if out.result != "successful":
                break
        out.state = state
        out.compile_time = self.clock.seconds
        return out

    def _restore(self, resume_segments, out: Outcome, state):
        """Continue after the last complete segment of a checkpoint: its saves, its end
        state and the solver / controller states (same tree structure as the fresh
        `state`)."""
        run, bounds = self.run, self.plan.bounds
        for k, (header, arrays) in enumerate(resume_segments):
            if (header["lo"], header["hi"]) != (bounds[k], bounds[k + 1]):
                raise ValueError(
                    f"resume: segment {k} of the checkpoint spans [{header['lo']:.3g}, "
                    f"{header['hi']:.3g}] but this run's segment {k} is [{bounds[k]:.3g}, "
                    f"{bounds[k + 1]:.3g}]; the checkpoint was written with another segment "
                    "layout. Rerun it with simulate(..., checkpoint=a new folder)."
                )
            out.chunks["ts"].append(arrays["ts"])
            for key in _SAVED:
                out.chunks[key].append(arrays[key])
            out.steps = out.steps + np.asarray(header["steps"])
            out.accepted = out.accepted + np.asarray(header["accepted"])
            out.rejected = out.rejected + np.asarray(header["rejected"])
            out.per_segment_steps.append(np.asarray(header["steps"]))
            out.result, out.message = header["result"], header["message"]
        arrays = resume_segments[-1][1]
        y = tuple(jnp.asarray(arrays[k], run.dtype) for k in ("y_v", "y_m", "y_I"))
        state = ckpt.load_tree(
            arrays, "state", state, "the checkpoint was written with another batch padding "
            "(device count); resume it on a machine with the same number of devices.")
        return y, state

    def _switch(self, before: int, at: float, y, state):
        """y and the solver / controller state at t = `at` (1, or `_clock.lag_from` for a
        momentum flow on a piecewise-linear model), where u becomes log t (from the clock
        `before`: t or sqrt t)."""
        run = self.run
        if run.flow.n_moments == 1 and before != SQRT_T:
            # From t, the solver state carries over (at t = 1, dy/du = t dy/dt = dy/dt),
            # but the band of Lemma 3's I holds sample times, which move to u.
            return y, _band_to_log_time(state)
        if run.flow.n_moments == 2:
            # A momentum flow's first moment becomes its lag r = m1 - g from here on
            # (see `_fields`): a new state, so the solver's own state is made anew at u =
            # log(at), where the reused first stage must be evaluated.
            objective = run.objective
            y = (y[0], _to_lag(objective, _w_of_v(y[0], objective.degree), y[1]), y[2])
        # From sqrt t the solver's state holds dy/ds (FSAL), and du = dt / t = 2 ds / s: a
        # step of ds proposed in s is one of 2 ds in log t at s = 1; from t, one of dt / t.
        scale = 2.0 / math.sqrt(at) if before == SQRT_T else 1.0 / at
        state = self.restart_fn(run.flow, run.objective, y, jnp.asarray(math.log(at), run.dtype),
                                jnp.asarray(LOG_T, jnp.int32), run.solver, state,
                                jnp.asarray(scale, run.dtype))
        return y, state

    def _segment_k(self, k, lo, hi, y, state, out: Outcome):
        """Integrate segment k = [lo, hi] (saves, counts and the stop reason into `out`),
        write it to the checkpoint folder, and return the state at its end."""
        run, bounds, slots = self.run, self.plan.bounds, self.plan.slots
        if self.checkpoint is not None:
            self.checkpoint.check_writable(f"segment {k} ([{lo:.3g}, {hi:.3g}])")
        batch = run.batch
        axis = 1 if batch else 0  # the saves' time axis
        # t or sqrt t on [t0, 1] (t up to `log_from` where that is later), log t after
        # (see `_clock`).
        clock = self._clock(lo)
        before = self._clock(bounds[k - 1]) if k else clock
        if clock == LOG_T and before != LOG_T:  # the switch to u = log t
            y, state = self._switch(before, lo, y, state)
        # At most `slots` saves per call (the slots are part of the compiled program's
        # shape): a segment with more is integrated in pieces, each ending at its last save.
        wanted = self.plan.saves[k]
        pieces = [wanted[i : i + slots] for i in range(0, len(wanted), slots)]
        pieces = pieces or [wanted]  # a segment without saves is one call
        n = na = nr = 0
        piece_lo, kept = lo, []
        for j, piece in enumerate(pieces):
            piece_hi = hi if j == len(pieces) - 1 else float(piece[-1])
            pad = np.full(slots, piece_hi)
            pad[: len(piece)] = piece
            self._phase()
            begin = time.perf_counter()
            with self.clock:
                result = self.seg(run.flow, run.objective, y, self._u(piece_lo, clock),
                                  self._u(piece_hi, clock), jnp.asarray(clock, jnp.int32),
                                  self._u(pad, clock), run.solver, run.controller,
                                  run.max_steps, state)
                result = jax.block_until_ready(result)
            out.wall_time += time.perf_counter() - begin
            n_saved, saved, y, (end_u, end_saved), state, code, dn, dna, dnr = result
            n, na, nr = n + np.asarray(dn), na + np.asarray(dna), nr + np.asarray(dnr)
            codes = np.atleast_1d(np.asarray(code))
            ok = codes == STOPS.index(Stop.successful)
            n_keep = len(piece)
            if not ok.all():
                # Keep every save the solver reached (of the first failed member in a batch).
                n_keep = min(int(np.atleast_1d(np.asarray(n_saved))[np.argmin(ok)]), n_keep)
            kept.append((pad[:n_keep], {key: np.asarray(saved[key])[:, :n_keep] if batch
                                        else np.asarray(saved[key])[:n_keep]
                                        for key in _SAVED}))
            piece_lo = piece_hi
            if not ok.all():
                break
        out.steps = out.steps + n
        out.per_segment_steps.append(np.asarray(n))
        out.accepted = out.accepted + na
        out.rejected = out.rejected + nr
        chunks = out.chunks
        kept_ts = np.concatenate([ts_ for ts_, _ in kept])
        chunks["ts"].append(np.asarray(kept_ts, np.float64))
        for key in _SAVED:
            chunks[key].append(np.concatenate([arrs[key] for _, arrs in kept], axis=axis))
        if not ok.all() and not batch:
            # Also keep the state where the solver stopped (one run: a batch's members stop
            # at different times and share one time axis).
            end_t = t_of_u(end_u, clock)
            if (
                np.isfinite(end_t)
                and (len(kept_ts) == 0 or end_t > kept_ts[-1])
                and all(np.all(np.isfinite(np.asarray(v))) for v in end_saved.values())
            ):
                kept_ts = np.append(kept_ts, end_t)
                chunks["ts"][-1] = np.asarray(kept_ts, np.float64)
                for key in _SAVED:
                    chunks[key][-1] = np.concatenate(
                        [chunks[key][-1], np.asarray(end_saved[key])[None]], axis=0
                    )
        if not ok.all():
            bad = STOPS[int(codes[~ok][0])]
            out.result = bad.name
            failed = int(np.sum(~ok))
            where = f"{failed} of {codes.size} runs" if batch else "the run"
            reached_t = (
                float(np.nanmax(np.where(np.isfinite(kept_ts), kept_ts, np.nan)))
                if len(kept_ts)
                else lo
            )
            out.t_stopped = reached_t
            out.message = (
                f"{where} stopped in the segment [{lo:.3g}, {hi:.3g}] at t = {reached_t:.6g}: "
                f"{bad.text} Fix: {bad.hint}."
            )
            # One run that stopped where it started, from t0 > 0 (a batch's members stop at
            # different times; its saves do not say where).
            if (not batch and 0 < run.t0 == lo and bad in _STALLS
                    and float(end_t) <= run.t0 * (1 + 1e-3)):
                out.message += _late_start_note(run, clock)
        if self.checkpoint is not None:
            self.checkpoint.write_segment(
                k,
                {"lo": lo, "hi": hi, "result": out.result, "message": out.message,
                 "steps": np.asarray(n).tolist(), "accepted": np.asarray(na).tolist(),
                 "rejected": np.asarray(nr).tolist()},
                ts=chunks["ts"][-1], **{key: chunks[key][-1] for key in _SAVED},
                y_v=np.asarray(y[0]), y_m=np.asarray(y[1]), y_I=np.asarray(y[2]),
                **ckpt.save_tree("state", state),
            )
        return y, state


# The stops a stalled start shows (not the implicit solver's failures).
_STALLS = (Stop.max_steps_reached, Stop.nonfinite_state, Stop.dt_min_reached)


def _late_start_note(run, clock) -> str:
    """A likely cause of a run from t0 > 0 that stopped within 0.1% of t0, which the stop's
    own hint (more steps, the data's scale) does not name; "" where none applies."""
    t0, flow = run.t0, run.flow
    # A last place of the time variable, in t, where it is coarser than t's own (u = log t
    # from about t = e on: log t has fewer digits to spare than t).
    u = float(u_of_t(t0, clock))
    coarse = clock == LOG_T and abs(u) >= 1
    res = t0 * float(np.spacing(np.asarray(u, run.dtype))) if coarse else None
    if not flow.has_conditioner and not coarse:
        return ""  # GD and the momentum flow: nothing stiff repeats at t0
    where = (f"in log t, whose last place is about {res:.2g} in t there (docs/errors.md, "
             "'Failed runs keep what they computed')") if coarse else ""
    text = f" A likely cause: the run started at t0 = {t0:.6g} from w0"
    if flow.has_conditioner:
        text += (", m = 0, and stopped within 0.1% of it. Its early phase (m growing from 0, "
                 "where h is up to 1/eps, or 1/sqrt(eps) with eps inside the root) then "
                 "happens at t0")
        if clock != SQRT_T:
            text += ", without the s = sqrt(t) clock a start at 0 gets"
        if coarse:
            text += ", " + where
    else:
        text += f" and stopped within 0.1% of it: its first steps are short, and it steps {where}"
    return text + ". Start at t0 = 0 and save from where you need (`ts=`), or at a smaller t0."
