"""Shared plumbing of the analysis functions: input checks, the objective of a trajectory,
per-constraint margins and loss weights, the separation time.

Nothing here calls a solver: every function is a pure function of (model, data, w) or of
a saved Trajectory. Where a function takes parameters `w`, a Trajectory may be passed
instead and stands for its LAST saved state, traj.w[..., -1, :] (one state per member of a
batched run): the state a run ends in, which the theorems are about. For every saved
state pass the array traj.w instead (see `states`).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from .._stored import StoredProgram
from .._trajectory import Trajectory
from ..models import Objective


class NotSeparatedError(ValueError):
    """An analysis that needs separation (g(log 1/L) > 0, all q_i > 0) met a state without it."""


def make_objective(model, data, loss, where: str) -> Objective:
    # Objective checks the types and the model / data / loss fit, naming `where`.
    return Objective(model, data, loss, where=where)


def check_trajectory(traj, where: str):
    if not isinstance(traj, Trajectory):
        raise TypeError(
            f"{where}: `traj` must be a marginflow.Trajectory (from simulate or "
            f"discrete.run), got {type(traj).__name__}."
        )
    if len(traj) == 0:
        raise ValueError(
            f"{where}: the trajectory has no saved states (result {traj.result!r}: "
            f"{traj.message}); rerun the simulation so that it saves at least one time."
        )


def trajectory_objective(traj, model, data, where: str) -> Objective:
    """The Objective a trajectory was computed on, after checking model and data match it."""
    check_trajectory(traj, where)
    objective = make_objective(model, data, traj.meta.get("loss"), where)
    meta = traj.meta
    fp = meta.get("data", {}).get("fingerprint")
    if fp is not None and fp != data.fingerprint():
        raise ValueError(
            f"{where}: `data` is not the data set the trajectory was computed on (fingerprint "
            f"{data.fingerprint()} != {fp} in traj.meta['data']); pass the same Dataset."
        )
    spec = _plain(objective.model.spec())
    if "model" in meta and _plain(meta["model"]) != spec:
        # Same p and degree is not the same function (a DeepLinear and a ReLU MLP can share
        # both): the margins of another model are silently wrong numbers.
        raise ValueError(
            f"{where}: `model` is not the model the trajectory was computed on: its spec "
            f"{spec} differs from traj.meta['model'] = {_plain(meta['model'])}; pass the "
            "model the run was built from."
        )
    if "degree" in meta and int(meta["degree"]) != objective.degree:
        raise ValueError(
            f"{where}: `model` has degree L = {objective.degree} but the trajectory was "
            f"computed with L = {meta['degree']}; pass the model the run was built from."
        )
    p = int(objective.w0().shape[0])
    if traj.w.shape[-1] != p:
        raise ValueError(
            f"{where}: the trajectory has {traj.w.shape[-1]} parameters per state but the model "
            f"has p = {p}; pass the model the run was built from."
        )
    return objective


def _plain(spec):
    # A spec as JSON reads it back (tuples become lists), so a saved and a live spec compare.
    return json.loads(json.dumps(spec))


def is_trajectory(x) -> bool:
    return isinstance(x, Trajectory)


def states(model, data, w, loss, where: str):
    """(Objective, flat states) of `w`: parameters (p,) / (..., p), or a Trajectory.

    A Trajectory stands for its last saved state traj.w[..., -1, :] (shape (p,), or (B, p)
    for a batched run). Its model and data are checked against traj.meta, and the loss is
    the run's own (traj.meta["loss"]); a different explicit `loss` is an error.
    """
    if not is_trajectory(w):
        objective = make_objective(model, data, loss, where)
        return objective, check_flat(objective, w, where)
    traj = w
    objective = trajectory_objective(traj, model, data, where)
    if loss is not None:
        from ..models import get_loss

        name = get_loss(loss).name
        if name != objective.loss.name:
            raise ValueError(
                f"{where}: `loss` is {name!r} but the trajectory was computed with "
                f"{objective.loss.name!r}; drop `loss` (a Trajectory brings its own) or pass "
                "an array of parameters instead."
            )
    return objective, check_flat(objective, traj.w[..., -1, :], where, name="traj.w[-1]")


def check_flat(objective: Objective, w, where: str, name: str = "w"):
    w = jnp.asarray(w, dtype=jnp.float64)
    p = int(objective.w0().shape[0])
    if w.ndim == 0 or w.shape[-1] != p:
        raise ValueError(
            f"{where}: `{name}` must be a flat parameter vector with last axis p = {p} (the "
            f"model's parameter count), got shape {w.shape}; use marginflow.models.flatten."
        )
    if not np.all(np.isfinite(np.asarray(w))):  # on the host: no program to compile
        raise ValueError(f"{where}: `{name}` must be finite, found NaN/inf entries.")
    return w


def check_weights(weights, shape: tuple, where: str):
    """weights = h_inf^{-1/2} for AdaGrad's problem (PA): positive and finite, of shape (p,)
    (one for every state), the states' own shape (..., p) (one per state: a batched run's
    conditioner_limit(traj).h_inf ** -0.5 is (B, p)), or (B, p) for states (B, n, p) (one
    per member, for every save of traj.w). Returned broadcast to `shape`."""
    if weights is None:
        return None
    weights = np.asarray(weights, dtype=np.float64)
    p = shape[-1]
    shape = tuple(shape)
    per_member = len(shape) >= 3 and weights.shape == shape[:-2] + (p,)
    if weights.shape not in ((p,), shape) and not per_member:
        raise ValueError(
            f"{where}: `weights` must have shape ({p},), the states' shape {shape}, or "
            f"one per member (h_inf^{{-1/2}} of AdaGrad's problem (PA)), got "
            f"shape {weights.shape}; pass conditioner_limit(traj).h_inf ** -0.5."
        )
    if not np.all(np.isfinite(weights)) or not np.all(weights > 0):
        raise ValueError(
            f"{where}: `weights` must be finite and > 0 (they are h_inf^{{-1/2}}), got min "
            f"{np.min(weights):.3g} and max {np.max(weights):.3g}; a zero or infinite "
            "weight means an h_inf of inf or 0: check the run's conditioner_limit."
        )
    if per_member:
        weights = weights[..., None, :]  # one per member (B, p), for every save of traj.w
    return jnp.asarray(np.broadcast_to(weights, shape))


def check_n_classes(n_classes, c: int, binary: bool, where: str) -> int:
    """The number of classes C of a multi-class linear problem: `n_classes` (the model's
    out_dim, where some class has no sample) checked to be an integer >= max(y) + 1 = c,
    or c itself when it is None; binary labels take none."""
    if n_classes is None:
        return c
    if binary:
        raise ValueError(
            f"{where}: `n_classes` is for multi-class (integer) labels; the labels are "
            "binary +-1 (one output), drop `n_classes`."
        )
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) \
            or n_classes < c:
        raise ValueError(
            f"{where}: `n_classes` must be an integer >= max(y) + 1 = {c} (the model's "
            f"out_dim), got {n_classes!r}."
        )
    return int(n_classes)


# ---------------------------------------------------------------- constraint margins
def other_classes(y, out_dim: int):
    """(N, C - 1) indices j != y_i in increasing order (traceable: j_k = k + [k >= y_i]).

    Multi-class (App. E): q_ij = Phi_{y_i}(x_i) - Phi_j(x_i) >= 1 for every j != y_i, so
    q_i = min_j q_ij is the sample margin and the constraint set has N (C - 1) entries,
    flattened row-major (sample i, then class j).
    """
    k = jnp.arange(out_dim - 1)[None, :]
    return k + (k >= y[:, None]).astype(k.dtype)


def constraint_margins(objective: Objective, w):
    """The per-constraint margins q_c(w) (flat, shape (n_c,))."""
    out = objective.outputs(w)
    y = objective.data.y
    if objective.data.binary:
        return y * out
    cols = other_classes(y, objective.model.out_dim)
    own = jnp.take_along_axis(out, y[:, None], axis=1)
    others = jnp.take_along_axis(out, cols, axis=1)
    return (own - others).reshape(-1)


def constraint_weights_over_loss(objective: Objective, w):
    """w_c / L with w_c = -dL/dq_c, so that -grad L = sum_c w_c grad q_c (exact, log space).

    Binary: w_i = e^{-f(q_i)} f'(q_i). Cross-entropy: w_ij = e^{-q_ij} / (1 + sum_k e^{-q_ik}).
    Both are read off the gradient of log L with respect to the outputs: Phi_j(x_i), j != y_i,
    enters only q_ij (with coefficient -1), and binary Phi(x_i) enters q_i = y_i Phi(x_i).
    """
    out = objective.outputs(w)
    grad_out = jax.grad(lambda o: objective.loss.log_loss(o, objective.data.y))(out)
    if objective.data.binary:
        return -objective.data.y * grad_out
    cols = other_classes(objective.data.y, objective.model.out_dim)
    return jnp.take_along_axis(grad_out, cols, axis=1).reshape(-1)


def _margins_stack_traced(objective: Objective, W):
    return jax.lax.map(objective.margins, W, batch_size=64)


_margins_stack = StoredProgram("margins_stack", _margins_stack_traced)


def margins_stack(objective: Objective, W) -> np.ndarray:
    """q_i(w) for a stack of flat parameters W (k, p): shape (k, N)."""
    return np.asarray(_margins_stack(objective, jnp.asarray(W)))


# ---------------------------------------------------------------- separation
def separation_index(g_value: np.ndarray, q_min: np.ndarray | None = None) -> int | None:
    """The first save from which on g(log 1/L) > 0 (and all q_i > 0) holds; None if never.

    g(log 1/L) <= q_min (Lemma 18), so g(log 1/L) > 0 implies all q_i > 0; the loss is
    non-increasing along every flow (dL/dt = -sum h g^2), so once separated a continuous run
    stays separated. The suffix test makes the answer robust for discrete runs too.
    """
    ok = np.asarray(g_value) > 0
    if q_min is not None:
        ok &= np.asarray(q_min) > 0
    bad = np.nonzero(~ok)[0]
    first = 0 if bad.size == 0 else int(bad[-1]) + 1
    return first if first < ok.shape[0] else None


def not_separated_message(where: str, traj=None) -> str:
    reached = "" if traj is None else f" (the run reached t = {float(traj.ts[-1]):.3g})"
    if traj is not None and traj.result == "not_separable":
        # simulate's exact LP check already decided it: no t1 helps.
        advice = "This model does not separate the data at all (traj.message says why)."
    else:
        advice = "Run longer (larger t1) or check that the data is separable by this model."
    return (
        f"{where}: the run never separates the data: g(log 1/L) > 0 (equivalently all "
        f"q_i > 0, docs/math.md section 1) fails at its last save{reached}. {advice}"
    )


def over_norm_power(q, norm, degree: int) -> np.ndarray:
    """q / norm^L, elementwise (the normalised margins' ratio). Computed directly, and in
    logs, sign(q) exp(log|q| - L log norm), only where norm^L over- or underflows float64
    (a high degree L, or a tiny margin against a large norm), where the direct ratio would
    read 0 or inf for a finite answer. The log form loses about L |log norm| ulps, which
    is why it is not used throughout."""
    q, norm = np.asarray(q, np.float64), np.asarray(norm, np.float64)
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        power = norm**degree
        out = np.asarray(q / power, np.float64)
        lost = ~np.isfinite(power) | (power < np.finfo(np.float64).tiny)  # subnormal too
        if np.any(lost):
            logs = np.log(np.abs(q)) - degree * np.log(norm)
            out = np.where(lost, np.sign(q) * np.exp(logs), out)
    return out
