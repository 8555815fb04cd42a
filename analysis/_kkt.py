"""Approximate KKT residuals of (P) and (PA) (docs/math.md section 4; the paper's Def. 2,
Lemmas 5/21 and, for multi-class, Lemma 41)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jaxtyping import ArrayLike, Float

from .._records import record_repr
from ._common import (
    NotSeparatedError,
    check_weights,
    constraint_margins,
    constraint_weights_over_loss,
    over_norm_power,
    states,
)

if TYPE_CHECKING:
    from .._trajectory import Trajectory


class KKTResidual(eqx.Module):
    """(eps, delta) of the approximate KKT conditions at w~ = w / q_min^{1/L} (see
    `kkt_residual`). Arrays of shape w.shape[:-1]; multipliers with a trailing axis n_c."""

    eps_paper: np.ndarray
    delta_paper: np.ndarray
    eps_best: np.ndarray
    delta_best: np.ndarray
    eps_paper_rel: np.ndarray
    eps_best_rel: np.ndarray
    residual_paper: np.ndarray
    residual_best: np.ndarray
    gamma: np.ndarray
    cos_theta: np.ndarray
    lambda_paper: np.ndarray
    lambda_best: np.ndarray

    __repr__ = record_repr


@eqx.filter_jit
def _pieces(objective, w):
    q = constraint_margins(objective, w)
    lam_hat = constraint_weights_over_loss(objective, w)  # w_c / L(w)
    glog = jax.grad(objective.log_loss)(w)  # grad L / L: the direction of grad L, no underflow
    jac = jax.jacrev(lambda x: constraint_margins(objective, x))(w)
    return q, lam_hat, glog, jac


def _one(objective, w, s):
    L = objective.degree
    q, lam_hat, glog, jac = (np.asarray(a, np.float64) for a in _pieces(objective, w))
    q_min = float(np.min(q))
    if not q_min > 0:
        raise NotSeparatedError(
            f"kkt_residual: the KKT conditions of (P)/(PA) are taken at the feasible rescaling "
            f"w / q_min^(1/L), which needs q_min > 0 (a separating w), got q_min = {q_min:.3g}. "
            "Pass a state after separation (e.g. traj.w[-1] of a longer run)."
        )
    w = np.asarray(w, np.float64)
    v = s * w  # the paper's coordinates v = h_inf^{-1/2} w (s = 1 for (P))
    gv = glog / s  # grad_v = h_inf^{1/2} grad_w
    nv, ng = np.linalg.norm(v), np.linalg.norm(gv)
    gamma = float(over_norm_power(q_min, nv, L))
    # sqrt(2 (1 - cos theta)) = ||v/|v| + grad/|grad|||: the norm form keeps relative accuracy
    # when theta is tiny, where 1 - cos theta cancels to rounding error (~1e-16).
    u = v / nv + gv / ng
    eps_rel = float(np.linalg.norm(u))
    cos_theta = float(-np.dot(v, gv) / (nv * ng))
    scale = q_min ** (-1.0 / L)
    v_tilde = scale * v
    # Lemma 21's multipliers: lambda_c = q_min^{1-2/L} ||v|| w_c / ||grad_v L||, with
    # w_c = -dL/dq_c (w_c / ||grad L|| = (w_c / L) / ||grad log L||).
    lam_paper = q_min ** (1.0 - 2.0 / L) * nv * lam_hat / ng
    slack = q / q_min - 1.0  # q_c(w~) - 1 >= 0
    # grad_v q_c(v~) = q_min^{-(L-1)/L} grad_v q_c(v): the gradient is (L-1)-homogeneous.
    G = (jac / s).T * q_min ** (-(L - 1.0) / L)  # (p, n_c)
    # Stationarity alone is no test once there are more constraints than dimensions: any
    # v~ in the cone of the gradients has an exact lambda >= 0. The complementarity sum
    # sum_c lambda_c (q_c(v~) - 1) (slack >= 0, so it is a linear non-negative form) is
    # appended as one more row of the same least-squares problem: the nnls minimiser
    # gives the smallest sqrt(eps^2 + delta^2) over all lambda >= 0.
    aug = np.vstack([G, slack[None, :]])
    rhs = np.concatenate([v_tilde, [0.0]])
    lam_best, _ = scipy.optimize.nnls(aug, rhs, maxiter=50 * G.shape[1] + 100)
    eps_best = float(np.linalg.norm(v_tilde - G @ lam_best))
    delta_best = float(np.dot(lam_best, slack))
    eps_paper = scale * nv * eps_rel
    delta_paper = float(np.dot(lam_paper, slack))
    nvt = float(np.linalg.norm(v_tilde))
    return {
        "eps_paper": eps_paper,
        "delta_paper": delta_paper,
        "eps_best": eps_best,
        "delta_best": delta_best,
        "eps_paper_rel": eps_rel,
        "eps_best_rel": eps_best / nvt,
        "residual_paper": float(np.hypot(eps_paper, delta_paper)) / nvt,
        "residual_best": float(np.hypot(eps_best, delta_best)) / nvt,
        "gamma": gamma,
        "cos_theta": cos_theta,
        "lambda_paper": lam_paper,
        "lambda_best": lam_best,
    }


def kkt_residual(
    model,
    data,
    w: Float[ArrayLike, "... p"] | Trajectory,
    *,
    weights: Float[ArrayLike, " p"] | None = None,
    loss=None,
) -> KKTResidual:
    """How far w / q_min(w)^{1/L} is from a KKT point of (P), or of (PA) with `weights`.

    (P)  min 1/2 ||v||^2 s.t. q_c(v) >= 1  (GD, RMSProp, Adam w/m: Theorem 6);
    (PA) min 1/2 ||h_inf^{-1/2} w||^2 s.t. q_c(w) >= 1 (AdaGrad: Theorem 7), i.e. (P) in
    v = h_inf^{-1/2} * w with q~_c(v) = q_c(h_inf^{1/2} v), grad_v = h_inf^{1/2} * grad_w.
    Constraints c: one per sample (binary), one per pair (i, j != y_i) (multi-class, App. E).

    Def. 2: v~ is an (eps, delta)-KKT point if some lambda >= 0 has
        || v~ - sum_c lambda_c grad q_c(v~) || <= eps  and  sum_c lambda_c (q_c(v~) - 1) <= delta,
    at the feasible rescaling v~ = v / q_min^{1/L} (q_min(v~) = 1).

    Two choices of lambda are reported:
    - the paper's (Lemma 21; Lemma 41 for multi-class): lambda_c = q_min^{1-2/L} ||v|| w_c /
      ||grad_v L||, w_c = -dL/dq_c (binary: e^{-f(q_c)} f'(q_c)); with -grad L =
      sum_c w_c grad q_c and Euler's identity they give exactly
          eps_paper = gamma^{-1/L} ||v/||v|| + grad L/||grad L|| ||
                    = gamma^{-1/L} sqrt(2 (1 - cos theta)),
          cos theta = <v, -grad_v L> / (||v|| ||grad_v L||), gamma = q_min / ||v||^L,
          delta_paper = sum_c lambda_c (q_c / q_min - 1);
    - the best (non-negative least squares, scipy.optimize.nnls): lambda >= 0 minimising
      eps^2 + delta^2, the stationarity residual with the complementarity sum appended as
      one more row (stationarity alone is 0 for every v~ in the cone of the gradients once
      there are more constraints than parameters). This is the honest measure of "is this
      a KKT point": residual_best = sqrt(eps_best^2 + delta_best^2) / ||v~|| -> 0 exactly
      at KKT points.
    `*_rel` and `residual_*` are divided by ||v~|| = gamma^{-1/L} (scale-free;
    eps_paper_rel = sqrt(2 (1 - cos theta))).

    Args:
        model, data: model structure and Dataset; w: flat parameters (p,), a stack (k, p)
            (one nnls per w: a pure function, no ODE solver), or a Trajectory, which stands
            for its last saved state traj.w[..., -1, :] (checked against the run's model
            and data; the KKT conditions concern the end of a run, and early saves are not
            separated). For chosen saves pass e.g. traj.w[-5:].
        weights: None for (P); h_inf^{-1/2} (positive, (p,), or one per state of the
            shape of w) for (PA), e.g. conditioner_limit(traj).h_inf ** -0.5.
        loss: default from the labels (the multipliers w_c depend on it); a
            Trajectory's own loss otherwise.

    Returns:
        KKTResidual with fields of shape w.shape[:-1] (scalars for one w or an unbatched
        Trajectory), the multipliers with a trailing axis n_c.

    Raises:
        NotSeparatedError (a ValueError) if q_min(w) <= 0.

    Example:
        >>> r = kkt_residual(model, data, traj)      # the run's last state
        >>> r.eps_best_rel, r.eps_paper_rel
    """
    objective, w = states(model, data, w, loss, "kkt_residual")
    p = w.shape[-1]
    s = check_weights(weights, w.shape, "kkt_residual")
    s = np.ones(w.shape) if s is None else np.asarray(s)
    flat = w.reshape(-1, p)
    rows = [_one(objective, jnp.asarray(x), si) for x, si in zip(flat, s.reshape(-1, p),
                                                                 strict=True)]
    lead = w.shape[:-1]
    out = {}
    for key in rows[0]:
        arr = np.stack([np.asarray(r[key], np.float64) for r in rows])
        out[key] = arr.reshape(lead + arr.shape[1:])
    return KKTResidual(**out)
