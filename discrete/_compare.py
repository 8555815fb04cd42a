"""`compare`: two trajectories (discrete or continuous) on a shared flow-time axis."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._records import record_repr
from .._trajectory import Trajectory


class Comparison(eqx.Module):
    """Differences of two trajectories a, b at matched times ts (a leading batch axis B when
    either trajectory is batched):

    - distance = ||w_a(t) - w_b(t)||;
    - angle = the angle between w_a(t) and w_b(t) in radians, computed as
      2 atan2(||u_a - u_b||, ||u_a + u_b||) with u = w / ||w|| (accurate for small angles);
    - margin_a, margin_b, margin_difference = gamma(w_a) - gamma(w_b), the normalised margins
      gamma = q_min / ||w||^L (NaN when `compare` got no data);
    - log_loss_difference = log L(w_a) - log L(w_b);
    - interpolated: whether b was interpolated onto a's save times.
    """

    ts: np.ndarray
    distance: np.ndarray
    angle: np.ndarray
    margin_a: np.ndarray
    margin_b: np.ndarray
    margin_difference: np.ndarray
    log_loss_difference: np.ndarray
    interpolated: bool = eqx.field(static=True)

    __repr__ = record_repr

    def max_distance(self) -> np.ndarray:
        """max_t ||w_a(t) - w_b(t)|| (per member when batched)."""
        return np.max(self.distance, axis=-1)


def _interp_weights(ts_b: np.ndarray, t: np.ndarray):
    """Indices j and weights theta with f(t) ~ (1 - theta) f_j + theta f_{j+1}: linear in
    log t (save times are log-spaced for flows), linear in t on an interval starting at 0."""
    j = np.clip(np.searchsorted(ts_b, t, side="right") - 1, 0, len(ts_b) - 2)
    lo, hi = ts_b[j], ts_b[j + 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        in_log = (lo > 0) & (t > 0)
        theta = np.where(
            in_log,
            np.log(np.where(in_log, t, 1.0) / np.where(in_log, lo, 1.0))
            / np.log(np.where(in_log, hi / np.where(lo > 0, lo, 1.0), 2.0)),
            (t - lo) / (hi - lo),
        )
    return j, np.clip(theta, 0.0, 1.0)


def _take(arr: np.ndarray, j, theta, time_axis: int):
    a0 = np.take(arr, j, axis=time_axis)
    a1 = np.take(arr, j + 1, axis=time_axis)
    shape = [1] * arr.ndim
    shape[time_axis] = len(theta)
    th = theta.reshape(shape)
    return (1.0 - th) * a0 + th * a1


def _unit(w):
    n = np.linalg.norm(w, axis=-1, keepdims=True)
    return w / np.where(n > 0, n, 1.0)


def compare(a: Trajectory, b: Trajectory, data=None, *, loss=None) -> Comparison:
    """Compare trajectories a and b (e.g. a discrete run and its matching flow).

    Matched times: a's save times inside the time range both cover. Where b's save times
    differ, b's w and log L are interpolated there, linearly in log t (linearly in t on a
    first interval starting at t = 0); this is second-order accurate in the spacing of b's
    saves, so save b densely (e.g. `simulate(..., ts=a.ts)` for exact matching).

    Args:
        a, b: Trajectories of the same model (same `meta["model"]`); either may be batched
            (same B if both are).
        data: the Dataset both ran on, for the normalised margins (checked against the
            fingerprint in meta); None: margins are NaN.
        loss: the loss for the margins (default: a's meta["loss"]).
    Returns: a Comparison.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Trajectory):
            raise TypeError(f"compare: `{name}` must be a Trajectory, got {type(t).__name__}.")
        if len(t) < 1:
            raise ValueError(f"compare: trajectory `{name}` is empty (no save times).")
    if a.meta.get("model") != b.meta.get("model"):
        raise ValueError(
            f"compare: the trajectories come from different models ({a.meta.get('model')} vs "
            f"{b.meta.get('model')}); compare runs of the same model."
        )
    if a.batched and b.batched and a.w.shape[0] != b.w.shape[0]:
        raise ValueError(
            f"compare: batched trajectories need the same number of members, got "
            f"{a.w.shape[0]} and {b.w.shape[0]}; compare a.member(i) with b.member(i)."
        )
    if a.w.shape[-1] != b.w.shape[-1]:
        raise ValueError(f"compare: parameter counts differ, {a.w.shape[-1]} vs "
                         f"{b.w.shape[-1]}.")
    lo = max(a.ts[0], b.ts[0])
    hi = min(a.ts[-1], b.ts[-1])
    slack = 1e-12 * max(abs(hi), 1.0)  # k * eta and a solver's t1 differ by rounding
    inside = (a.ts >= lo - slack) & (a.ts <= hi + slack)
    if not np.any(inside):
        raise ValueError(
            f"compare: the time ranges do not overlap: a covers [{a.ts[0]:.6g}, "
            f"{a.ts[-1]:.6g}], b covers [{b.ts[0]:.6g}, {b.ts[-1]:.6g}]."
        )
    ts = a.ts[inside]
    w_a = a.w[..., inside, :]
    ll_a = a.log_loss[..., inside]
    same = len(b.ts) == len(ts) and np.allclose(b.ts, ts, rtol=1e-12, atol=slack)
    if same:
        w_b, ll_b = b.w, b.log_loss
    elif len(b.ts) == 1:
        raise ValueError("compare: `b` has a single save time and cannot be interpolated.")
    else:
        j, theta = _interp_weights(np.asarray(b.ts), np.clip(ts, b.ts[0], b.ts[-1]))
        w_b = _take(np.asarray(b.w), j, theta, b.w.ndim - 2)
        ll_b = _take(np.asarray(b.log_loss), j, theta, b.log_loss.ndim - 1)

    distance = np.linalg.norm(w_a - w_b, axis=-1)
    u_a, u_b = _unit(w_a), _unit(w_b)
    angle = 2.0 * np.arctan2(np.linalg.norm(u_a - u_b, axis=-1),
                             np.linalg.norm(u_a + u_b, axis=-1))
    if data is None:
        gamma_a = np.full(distance.shape, np.nan)
        gamma_b = np.full(distance.shape, np.nan)
    else:
        gamma_a, gamma_b = _margins(a, b, data, loss, w_a, w_b)
    gamma_a, gamma_b = np.broadcast_arrays(gamma_a, gamma_b)
    return Comparison(
        ts=ts,
        distance=distance,
        angle=angle,
        margin_a=gamma_a,
        margin_b=gamma_b,
        margin_difference=gamma_a - gamma_b,
        log_loss_difference=ll_a - ll_b,
        interpolated=not same,
    )


@eqx.filter_jit
def _gamma(objective, w):
    """gamma = q_min / ||w||^L for a stack of flat w (one compiled call; the same formula
    as marginflow.analysis.normalized_margin, which loops over rows in Python)."""
    flat = w.reshape(-1, w.shape[-1])
    q_min = jnp.min(jax.vmap(objective.margins)(flat), axis=-1)
    out = q_min / jnp.linalg.norm(flat, axis=-1) ** objective.degree
    return out.reshape(w.shape[:-1])


def _margins(a, b, data, loss, w_a, w_b):
    from ..models import Dataset, Objective, from_spec

    if not isinstance(data, Dataset):
        raise TypeError(f"compare: `data` must be a Dataset, got {type(data).__name__}.")
    fp = data.fingerprint()
    for name, t in (("a", a), ("b", b)):
        seen = t.meta.get("data", {}).get("fingerprint")
        if seen is not None and seen != fp:
            raise ValueError(
                f"compare: `data` (fingerprint {fp}) is not the data set trajectory `{name}` "
                f"ran on (fingerprint {seen}); pass the Dataset used for the runs."
            )
    loss = a.meta.get("loss") if loss is None else loss
    objective = Objective(from_spec(a.meta["model"]), data, loss, where="compare")
    return (np.asarray(_gamma(objective, jnp.asarray(w_a))),
            np.asarray(_gamma(objective, jnp.asarray(w_b))))
