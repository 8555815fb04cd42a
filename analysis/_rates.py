"""Fitted convergence rates of the loss and the parameter norm (the paper's Theorem 10)."""

from __future__ import annotations

import equinox as eqx
import numpy as np

from .._checks import check_real_type
from .._records import record_repr
from ._common import NotSeparatedError, check_trajectory, not_separated_message, separation_index


class RateFit(eqx.Module):
    """Fitted exponents of Theorem 10's rates (see `rate_fit`); 1 is the theory's value."""

    loss_exponent: float = eqx.field(static=True)
    norm_exponent: float = eqx.field(static=True)
    loss_t_exponent: float = eqx.field(static=True)
    t_min: float = eqx.field(static=True)
    t_max: float = eqx.field(static=True)
    n_points: int = eqx.field(static=True)

    __repr__ = record_repr


def rate_fit(traj, *, t_min: float | None = None, t_max: float | None = None) -> RateFit:
    """Least-squares exponents of L(t) and ||w(t)|| against Theorem 10's rates.

    Theorem 10: L(w(t)) = Theta(1 / (t (log t)^{2 - 2/L})) and ||w(t)|| = Theta((log t)^{1/L}).
    Fitted on log-log axes over the window [t_min, t_max]:
        log L(t)    = a * log(1 / (t (log t)^{2-2/L})) + c   ->  loss_exponent = a,
        log ||w(t)|| = b * log((log t)^{1/L}) + c'          ->  norm_exponent = b,
    both 1 in the limit; loss_t_exponent is the plain slope of log L against log t (-> -1).
    The norm converges slowly (||w|| = (log t)^{1/L} + O(1) for linear GD, so b ~
    log t / (log t + c) at finite t): read b with that in mind.

    Args:
        traj: an unbatched Trajectory (batched: pass traj.member(b)).
        t_min, t_max: the window; default: t_max = the last save, t_min = the geometric middle
            of [max(t_sep, 10), t_max] (the later half of the decades after separation,
            t_sep = the first separated save), so the transient does not enter.

    Raises:
        NotSeparatedError if the run never separates; ValueError if the window has fewer
        than 3 saves or does not lie in t > e (log t > 1).
    """
    where = "rate_fit"
    for name, value, example in (("t_min", t_min, "1e3"), ("t_max", t_max, "1e6")):
        if value is not None:
            check_real_type(value, name, where, example)
    check_trajectory(traj, where)
    if traj.batched:
        raise ValueError(f"{where}: needs one run, got a batched trajectory; pass traj.member(b).")
    ts = np.asarray(traj.ts, np.float64)
    log_l = np.asarray(traj.log_loss, np.float64)
    # g(log 1/L) > 0 <=> log L < log(1/g^{-1}(0)): for every loss here g(x) > 0 iff x > f(0),
    # i.e. L < e^{-f(0)}; reading it through the exponential loss's g(x) = x would be wrong
    # for the logistic loss, so the meta's loss decides.
    from ..models import get_loss

    loss = get_loss(traj.meta.get("loss", "exponential"))
    g_value = np.asarray(loss.g(-log_l))
    i0 = separation_index(g_value)
    if i0 is None:
        raise NotSeparatedError(not_separated_message(where, traj))
    L = traj.degree
    hi = float(ts[-1]) if t_max is None else float(t_max)
    if t_min is None:
        start = max(float(ts[i0]), 10.0)
        lo = float(np.sqrt(start * hi))
    else:
        lo = float(t_min)
    if not lo > np.e:
        raise ValueError(f"{where}: the window must lie in t > e (log t > 1), got t_min = {lo}.")
    sel = (ts >= lo) & (ts <= hi) & (np.arange(ts.size) >= i0)
    if np.sum(sel) < 3:
        raise ValueError(
            f"{where}: the window [{lo:.3g}, {hi:.3g}] holds {int(np.sum(sel))} saves; at least 3 "
            "are needed: run longer, save more often (n_save) or widen the window."
        )
    t = ts[sel]
    lt = np.log(t)
    llt = np.log(lt)
    x_loss = -lt - (2.0 - 2.0 / L) * llt
    x_norm = llt / L
    norm = np.linalg.norm(np.asarray(traj.w, np.float64)[sel], axis=-1)
    a = np.polyfit(x_loss, log_l[sel], 1)[0]
    b = np.polyfit(x_norm, np.log(norm), 1)[0]
    a_t = np.polyfit(lt, log_l[sel], 1)[0]
    return RateFit(
        loss_exponent=float(a),
        norm_exponent=float(b),
        loss_t_exponent=float(a_t),
        t_min=float(t[0]),
        t_max=float(t[-1]),
        n_points=int(t.size),
    )
