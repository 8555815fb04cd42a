"""The surrogate margin, the monotone quantity of Lemma 3 and its pointwise decomposition
(docs/math.md section 4; the paper's Def. 9, Lemmas 2, 3, 18, 19).

Coordinates: the paper works in v = h_inf^{-1/2} * w with beta = h / h_inf. Every quantity
here is written in the code's w and h, where h_inf cancels:
    beta^{-1/2} * v = h^{-1/2} * w,       rho = ||h^{-1/2} * w||,
    d log beta_i^{-1/2} / dt = -1/2 d log h_i / dt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float

from .._records import record_repr
from ._common import (
    NotSeparatedError,
    check_flat,
    constraint_margins,
    constraint_weights_over_loss,
    is_trajectory,
    not_separated_message,
    over_norm_power,
    separation_index,
    states,
    trajectory_objective,
)

if TYPE_CHECKING:
    from .._trajectory import Trajectory


class SurrogateMargin(eqx.Module):
    """rho(t), gamma_tilde(t) at the save times of a trajectory (see `surrogate_margin`)."""

    ts: np.ndarray
    rho: np.ndarray
    gamma_tilde: np.ndarray
    g_value: np.ndarray
    separated: np.ndarray
    i0: int | None = eqx.field(static=True)
    t0: float | None = eqx.field(static=True)

    __repr__ = record_repr


def _g_of_log_inv_loss(loss, log_loss):
    """g(log 1/L) from log L (exact in log space, no underflow of L)."""
    return np.asarray(loss.g(-jnp.asarray(log_loss)))


def surrogate_margin(traj, model, data) -> SurrogateMargin:
    """rho(t) = ||h(t)^{-1/2} * w(t)|| and gamma_tilde(t) = g(log 1/L(w(t))) / rho(t)^L.

    Def. 9 in the paper's coordinates is rho = ||beta^{-1/2} * v||; with v = h_inf^{-1/2} * w
    and beta = h / h_inf this is ||h^{-1/2} * w||: no estimate of h_inf is needed.
    Lemma 1/18: g(log 1/L) <= q_min, so gamma_tilde <= q_min / rho^L, and
    gamma / gamma_tilde -> 1 as L -> 0 (in v coordinates).

    Before separation g(log 1/L) <= 0 and gamma_tilde is <= 0: it is returned as computed
    (never NaN) and `separated` marks the saves with g(log 1/L) > 0; `i0`, `t0` are the
    first save from which on the run is separated (None if never).

    Args:
        traj: a Trajectory (batched runs give arrays with a leading batch axis; `i0`/`t0`
            are then those of the latest-separating member).
        model, data: the model (structure) and Dataset the run was computed on (checked
            against traj.meta).

    Returns:
        SurrogateMargin(ts, rho, gamma_tilde, g_value = g(log 1/L), separated, i0, t0).
    """
    objective = trajectory_objective(traj, model, data, "surrogate_margin")
    w = np.asarray(traj.w, np.float64)
    h = np.asarray(traj.h(), np.float64)
    rho = np.sqrt(np.sum(w * w / h, axis=-1))
    g_value = _g_of_log_inv_loss(objective.loss, traj.log_loss)
    separated = g_value > 0
    firsts = [separation_index(r) for r in g_value.reshape(-1, g_value.shape[-1])]
    i0 = None if any(f is None for f in firsts) else max(firsts)
    t0 = None if i0 is None else float(traj.ts[i0])
    return SurrogateMargin(
        ts=np.asarray(traj.ts),
        rho=rho,
        gamma_tilde=over_norm_power(g_value, rho, objective.degree),
        g_value=g_value,
        separated=separated,
        i0=i0,
        t0=t0,
    )


class MonotoneQuantity(eqx.Module):
    """Q(t) = log gamma_tilde(t) + L * (I(t) - I(t0)) for t >= t0 (see `monotone_quantity`)."""

    ts: np.ndarray
    Q: np.ndarray
    log_gamma_tilde: np.ndarray
    penalty: np.ndarray
    i0: int = eqx.field(static=True)
    t0: float = eqx.field(static=True)
    max_drop: float = eqx.field(static=True)

    __repr__ = record_repr


def monotone_quantity(traj, model, data) -> MonotoneQuantity:
    """Lemma 3's monotone quantity Q(t) = log gamma_tilde(t) + L * int_{t0}^t P(s) ds.

    P(s) = sum_i (d log beta_i^{-1/2}/ds)_+ = sum_i (-1/2 d log h_i/ds)_+ (eq. 12), the
    penalty rate. `simulate` accumulates I(t) = int_0^t P(s) ds step by step, as the
    positive variation of each -1/2 log h_i along every solver step (traj.I; docs/math.md
    section 4); here int_{t0}^t P = I(t) - I(t0). Lemma 3 (its proof via eq. 12): Q is
    non-decreasing for t >= t0 once the data is separated; for gradient flow P = 0 and
    gamma_tilde itself is monotone. Lemma 2 follows:
    gamma_tilde(t) >= e^{-L (I(inf) - I(t1))} gamma_tilde(t1).

    t0 is the first save from which on g(log 1/L) > 0 (which implies all q_i > 0, Lemma
    18); the arrays start there.

    Returns:
        MonotoneQuantity(ts, Q, log_gamma_tilde, penalty = L (I - I(t0)), i0, t0,
        max_drop = max_{s <= t} Q(s) - Q(t) >= 0, the largest decrease seen: 0 for an exact
        solution, of the order of the solver's tolerance for a numerical one).

    Raises:
        NotSeparatedError (a ValueError) if the run never separates; ValueError for a
        batched trajectory (pass traj.member(b)) or a run without I(t) (discrete runs).
    """
    where = "monotone_quantity"
    objective = trajectory_objective(traj, model, data, where)
    if traj.batched:
        raise ValueError(
            f"{where}: needs one run, got a batched trajectory of {traj.w.shape[0]} members; "
            "pass traj.member(b)."
        )
    I = np.asarray(traj.I, np.float64)
    sm = surrogate_margin(traj, model, data)
    if sm.i0 is None:
        raise NotSeparatedError(not_separated_message(where, traj))
    i0 = sm.i0
    if not np.all(np.isfinite(I[i0:])):
        raise ValueError(
            f"{where}: the trajectory carries no integral I(t) (NaN; discrete runs do not "
            "integrate it); Q(t) needs a continuous run from simulate."
        )
    L = objective.degree
    log_gt = np.log(sm.g_value[i0:]) - L * np.log(sm.rho[i0:])
    penalty = L * (I[i0:] - I[i0])
    Q = log_gt + penalty
    drop = float(np.max(np.maximum.accumulate(Q) - Q))
    return MonotoneQuantity(
        ts=np.asarray(traj.ts[i0:]),
        Q=Q,
        log_gamma_tilde=log_gt,
        penalty=penalty,
        i0=i0,
        t0=float(traj.ts[i0]),
        max_drop=drop,
    )


# --------------------------------------------------------------- pointwise, Lemma 2/3
class Lemma3Terms(eqx.Module):
    """The terms of the proof of Lemmas 2/3 and of Lemma 19 at states (see `lemma3_terms`).

    All arrays have the shape of the leading axes of the states. Quantities marked
    "/ L(w)" are divided by the loss value, which they are proportional to, so they stay
    O(1) when L(w) = e^{-500}.
    """

    dlog_gamma_tilde: np.ndarray  # d/dt log gamma_tilde, autodiff along the vector field
    A: np.ndarray  # the Cauchy-Schwarz part (>= 0 after separation)
    B: np.ndarray  # the conditioner part (>= -L * penalty_rate)
    penalty_rate: np.ndarray  # P = sum_i (-1/2 d log h_i/dt)_+
    A_over_loss: np.ndarray  # A / L(w)
    cauchy_schwarz_gap: np.ndarray  # 1 - cos^2(h^{-1/2} w, h^{1/2} g) in [0, 1]
    nu_over_loss: np.ndarray  # nu / L(w), nu = sum_c w_c q_c
    euler_lhs_over_loss: np.ndarray  # <w, grad L> / L(w) (Lemma 19: = -L nu / L(w))
    g_over_gprime: np.ndarray  # g(log 1/L) / g'(log 1/L) (Lemma 19: nu / L(w) > this)
    g_value: np.ndarray  # g(log 1/L)
    separated: np.ndarray  # g(log 1/L) > 0: where the lemmas apply (elsewhere the log is NaN)
    q_min: np.ndarray
    rho: np.ndarray
    log_loss: np.ndarray

    __repr__ = record_repr


def _terms_one(flow, objective, t, w, m):
    L = objective.degree
    loss = objective.loss
    log_l, glog = jax.value_and_grad(objective.log_loss)(w)
    lval = jnp.exp(log_l)
    g = lval * glog
    dw, dm, h, dlogh = flow.vector_field(t, w, m, g)
    x = -log_l
    gx = loss.g(x)
    gpx = loss.g_prime(x)

    def log_gamma_tilde(t_, w_, m_):
        log_l_, glog_ = jax.value_and_grad(objective.log_loss)(w_)
        h_ = flow.h(t_, m_, jnp.exp(log_l_) * glog_)
        rho2 = jnp.sum(w_ * w_ / h_)
        return jnp.log(loss.g(-log_l_)) - 0.5 * L * jnp.log(rho2)

    _, dlog_gt = jax.jvp(log_gamma_tilde, (t, w, m), (jnp.ones_like(t), dw, dm))

    rho2 = jnp.sum(w * w / h)
    # The Lemma-2 split, written in w coordinates (x = log 1/L, r_i = -1/2 d log h_i/dt):
    #   d/dt log gamma_tilde = (g'(x)/g(x)) (-dL/dt)/L - L^2 nu/rho^2 - L sum_i pi_i r_i
    #                        =                     A                 +         B,
    # pi_i = (w_i^2/h_i)/rho^2 (weights summing to 1), because
    #   d rho^2/dt = sum_i 2 w_i (dw_i/dt)/h_i - (w_i^2/h_i) d log h_i/dt
    #              = -2 <w, g> + 2 sum_i (w_i^2/h_i) r_i = 2 L nu + 2 rho^2 sum_i pi_i r_i
    # (Euler, Lemma 19: -<w, g> = L nu). B >= -L max_i (r_i)_+ >= -L sum_i (r_i)_+.
    # A >= 0 (the paper's proof of Lemma 2, moved to w coordinates):
    #   (i)  Lemma 19: nu >= (g/g')(x) L  =>  (g'/g)(x)/L >= 1/nu, so
    #        A >= (1/nu) ((-dL/dt) - L^2 nu^2/rho^2);
    #   (ii) -dL/dt = <g, h g> = ||h^{1/2} g||^2 and L nu = -<w, g> = <h^{-1/2} w, -h^{1/2} g>,
    #        so by Cauchy-Schwarz (L nu)^2 <= ||h^{-1/2} w||^2 ||h^{1/2} g||^2 = rho^2 (-dL/dt).
    # Both factors are homogeneous of degree 1 in the loss value; they are computed divided
    # by L(w) (with grad log L) so they stay O(1) when L(w) underflows.
    weights_c = constraint_weights_over_loss(objective, w)
    q_c = constraint_margins(objective, w)
    nu_hat = jnp.sum(weights_c * q_c)  # nu / L(w)
    hg2_hat = jnp.sum(h * glog * glog)  # (-dL/dt) / L(w)^2
    A_hat = (gpx / gx) * hg2_hat - L * L * nu_hat / rho2  # A / L(w)
    wg = jnp.dot(w, glog)
    cs_gap = 1.0 - wg * wg / (rho2 * hg2_hat)
    r = -0.5 * dlogh
    B = -L * jnp.sum((w * w / h) * r) / rho2
    return {
        "dlog_gamma_tilde": dlog_gt,
        "A": lval * A_hat,
        "B": B,
        "penalty_rate": jnp.sum(jnp.maximum(r, 0.0)),
        "A_over_loss": A_hat,
        "cauchy_schwarz_gap": cs_gap,
        "nu_over_loss": nu_hat,
        "euler_lhs_over_loss": wg,
        "g_over_gprime": gx / gpx,
        "g_value": gx,
        "separated": gx > 0,
        "q_min": jnp.min(objective.margins(w)),
        "rho": jnp.sqrt(rho2),
        "log_loss": log_l,
    }


@eqx.filter_jit
def _terms_stack(flow, objective, ts, W, M):
    return jax.lax.map(lambda a: _terms_one(flow, objective, *a), (ts, W, M), batch_size=32)


def lemma3_terms(
    flow,
    model,
    data,
    t: Float[ArrayLike, "..."] | Trajectory,
    w: Float[ArrayLike, "... p"] | None = None,
    m: Float[ArrayLike, "... p"] | None = None,
    *,
    loss=None,
) -> Lemma3Terms:
    """The pointwise terms of Lemmas 2, 3 and 19 at states (t, w, m), from the vector field.

    With x = log 1/L(w), g = grad L(w), (dw/dt, dm/dt, h, d log h/dt) = flow.vector_field,
    r_i = -1/2 d log h_i/dt and rho^2 = sum_i w_i^2 / h_i:

        d/dt log gamma_tilde = A + B,                        (proof of Lemma 2)
        A = (g'(x)/g(x)) (-dL/dt)/L - L^2 nu / rho^2 >= 0    (Lemma 19 + Cauchy-Schwarz)
        B = -L sum_i (w_i^2/h_i) r_i / rho^2 >= -L sum_i (r_i)_+,
        hence d/dt log gamma_tilde >= -L * penalty_rate        (eq. 12, Lemma 3);
        Lemma 19: <w, grad L> = -L nu, nu = sum_c w_c q_c > (g(x)/g'(x)) L(w) if all q > 0.

    `dlog_gamma_tilde` is computed independently of the split: forward-mode autodiff of
    log gamma_tilde(t, w, m) along the tangent (1, dw/dt, dm/dt), with h from flow.h.
    The A >= 0 and the inequalities hold after separation (g(x) > 0, the field
    `separated`); before it log gamma_tilde is not defined and dlog_gamma_tilde is NaN
    there, flagged by `separated` = False.

    Args:
        flow: the flow (traj.flow()); model, data: as for simulate; loss: default from y
            (a Trajectory's own loss otherwise).
        t: times (k,) or scalar; w, m: states (k, p) or (p,) (traj.w, traj.m). Or a
            Trajectory in place of t, with w and m left out: its last saved state
            (traj.ts[-1], traj.w[..., -1, :], traj.m[..., -1, :]), as everywhere in
            marginflow.analysis; for every save pass traj.ts, traj.w, traj.m. A discrete
            run's Trajectory is read on the flow's scale (its t = k eta; AdaGrad's m =
            lr^2 S_k, docs/math.md section 5); for its arrays pass lr**2 * traj.m for
            AdaGrad. So rho here is the flow's; `surrogate_margin` of the same run uses the
            run's own h_k, lr times the flow's h, and its rho is 1/sqrt(lr) times this one
            (a constant factor: the monotone quantity and the limit directions are the
            same).

    Example:
        >>> lemma3_terms(traj.flow(), model, data, traj).dlog_gamma_tilde   # at the end
    """
    where = "lemma3_terms"
    if getattr(flow, "n_moments", 1) > 1:
        raise ValueError(
            f"{where}: Lemma 3's split assumes dw/dt = -h g, and {type(flow).__name__} moves "
            "along its first moment m1 instead: the lemma is not proven for momentum flows. "
            "What can be measured is Q(t) = log gamma~(t) + L I(t) along the run: "
            "monotone_quantity(traj, model, data) (docs/math.md section 9)."
        )
    if is_trajectory(t):
        traj = t
        if w is not None or m is not None:
            raise TypeError(
                f"{where}: pass either a Trajectory (its last saved state is used) or the "
                "arrays t, w, m, not both; e.g. lemma3_terms(flow, model, data, traj) or "
                "lemma3_terms(flow, model, data, traj.ts, traj.w, traj.m)."
            )
        objective, w = states(model, data, traj, loss, where)
        m = check_flat(objective, traj.m[..., -1, :], where, name="traj.m[-1]")
        if traj.meta.get("kind") == "discrete":
            # A discrete run saves its optimiser's n_k; the field needs the flow's m (AdaGrad:
            # lr^2 S_k, with the S_k of the run its h would be lr times too large).
            from ..discrete._optimizers import optimizer_from_meta

            m = optimizer_from_meta(traj.meta).flow_moment(m)
        t = float(traj.ts[-1])
    else:
        if w is None or m is None:
            raise TypeError(
                f"{where}: `w` and `m` are required with times `t` (e.g. traj.ts, traj.w, "
                "traj.m), or pass a Trajectory alone in place of t."
            )
        objective, w = states(model, data, w, loss, where)
        m = check_flat(objective, m, where, name="m")
    single = w.ndim == 1
    W = w.reshape(-1, w.shape[-1])
    # The second moment at 0 where the solver's saves undershoot it (-1e-17 to -9e-13 seen
    # late in a run): the flows' own field clips it (`nonnegative`), and with eps outside the
    # root, sqrt(m) of a negative m made every term NaN.
    M = flow.nonnegative(jnp.asarray(m).reshape(-1, m.shape[-1]))
    ts = jnp.broadcast_to(jnp.asarray(t, jnp.float64), (W.shape[0],))
    if M.shape != W.shape:
        raise ValueError(
            f"lemma3_terms: `w` and `m` must have the same shape, got {w.shape} and {m.shape}."
        )
    # Pad the stack to a power of two (repeating the last state) so that runs with
    # different numbers of states share one compiled function.
    k = W.shape[0]
    size = 1 << max(0, (k - 1).bit_length())
    pad = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], size - k, axis=0)])  # noqa: E731
    out = _terms_stack(flow, objective, pad(ts), pad(W), pad(M))
    out = {key: np.asarray(v)[:k] for key, v in out.items()}
    if single:
        out = {key: v[0] for key, v in out.items()}
    return Lemma3Terms(**out)
