"""Normalised margins (docs/math.md section 4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float

from ._common import check_weights, margins_stack, states

if TYPE_CHECKING:
    from .._trajectory import Trajectory


def normalized_margin(
    model,
    data,
    w: Float[ArrayLike, "... p"] | Trajectory,
    *,
    weights: Float[ArrayLike, " p"] | None = None,
    loss=None,
) -> np.ndarray:
    """gamma(w) = q_min(w) / ||w||^L, or gamma_A(w) = q_min(w) / ||weights * w||^L.

    q_i = y_i Phi(w; x_i) (binary) or Phi_{y_i} - max_{j != y_i} Phi_j (multi-class,
    App. E); q_min = min_i q_i; L = model.degree. Homogeneity makes gamma scale-free:
    gamma(a w) = gamma(w) for a > 0. `weights` = h_inf^{-1/2} gives the normalised margin of
    AdaGrad's problem (PA) (Theorem 7), the margin in the paper's coordinates
    v = h_inf^{-1/2} * w.

    Args:
        model: a marginflow model (only its structure is used; the parameters are `w`).
        data: the Dataset. loss: only selects binary/multi-class margins (default from y;
            a Trajectory's own loss otherwise).
        w: a flat parameter vector (p,), a stack (..., p), or a Trajectory, which stands
            for its last saved state traj.w[..., -1, :] (checked against the run's model
            and data). For the margin at every save pass traj.w.
        weights: None, or positive h_inf^{-1/2}: (p,), or one per state (the shape of w).

    Returns:
        numpy array of shape w.shape[:-1] (a 0-d array for one w or an unbatched
        Trajectory, (B,) for a batched one). Negative when the data is misclassified; 0/0
        (w = 0) raises.

    Example:
        >>> gamma = normalized_margin(model, data, traj)          # at the end of the run
        >>> curve = normalized_margin(model, data, traj.w)        # at every save
    """
    objective, w = states(model, data, w, loss, "normalized_margin")
    p = w.shape[-1]
    weights = check_weights(weights, w.shape, "normalized_margin")
    flat = np.asarray(w.reshape(-1, p))
    weights = None if weights is None else np.asarray(weights).reshape(-1, p)  # w's shape
    if np.any(np.all(flat == 0, axis=-1)):
        raise ValueError(
            "normalized_margin: `w` must be non-zero (gamma = q_min / ||w||^L is 0/0 at w = 0)."
        )
    q_min = margins_stack(objective, flat).min(axis=-1)
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        scaled = flat if weights is None else flat * weights
        power = np.linalg.norm(scaled, axis=-1) ** objective.degree
        gamma = np.asarray(q_min / power, np.float64)  # replaced below where out of range
    # Where ||w||^L or q leaves float64's normal range (the sum of squares overflows from
    # |w_i| ~ 1e154; q or ||w||^L beyond 1e308 or below 1e-308, where digits are lost), or
    # q is 0 (exactly, or underflowed), homogeneity gives gamma directly:
    # gamma(w) = q_min(c w) for c = 1 / ||weights * w|| (q(c w) = c^L q(w)), with c w
    # formed from w / max|w_i| so that nothing overflows or underflows on the way.
    tiny = np.finfo(np.float64).tiny
    lost = ~np.isfinite(q_min) | (np.abs(q_min) < tiny) | ~np.isfinite(power) | (power < tiny)
    if np.any(lost):
        x = flat[lost] / np.max(np.abs(flat[lost]), axis=-1, keepdims=True)
        xs = x if weights is None else x * weights[lost]
        unit = x / np.linalg.norm(xs, axis=-1, keepdims=True)
        gamma[lost] = margins_stack(objective, unit).min(axis=-1)
    return gamma.reshape(w.shape[:-1])


def q_min(model, data, w, *, loss=None):
    """min_i q_i(w) for a flat w (p,), a stack (..., p), or a Trajectory (its last saved
    state, as in `normalized_margin`); shape w.shape[:-1]."""
    objective, w = states(model, data, w, loss, "q_min")
    p = w.shape[-1]
    return margins_stack(objective, jnp.reshape(w, (-1, p))).min(axis=-1).reshape(w.shape[:-1])
