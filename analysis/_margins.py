"""Normalised margins (MATH.md section 4)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..models import Objective


def normalized_margin(model, data, w, *, weights=None, loss=None):
    """gamma(w) = q_min(w) / ||w||^L, or gamma_A = q_min(w) / ||weights * w||^L.

    q_i = y_i Phi(w; x_i) (binary) or Phi_{y_i} - max_{j != y_i} Phi_j (multi-class);
    L = model.degree. `weights` = h_inf^{-1/2} gives AdaGrad's problem (PA) (Theorem 7).
    `w` is a flat parameter vector (p,) or a stack (..., p); the result has shape (...).
    """
    objective = Objective(model, data, loss, where="normalized_margin")
    w = jnp.asarray(w)
    p = objective.w0().shape[0]
    if w.shape[-1] != p:
        raise ValueError(
            f"normalized_margin: `w` must have last axis p = {p} (the model's parameter "
            f"count), got shape {w.shape}."
        )
    if weights is not None:
        weights = jnp.asarray(weights)
        if weights.shape[-1] != p or not bool(jnp.all(weights > 0)):
            raise ValueError(
                f"normalized_margin: `weights` must be positive with last axis p = {p}, got "
                f"shape {weights.shape}; pass h_inf ** -0.5 from conditioner_limit."
            )
    flat = w.reshape(-1, p)
    q_min = np.stack([np.min(np.asarray(objective.margins(x))) for x in flat])
    scaled = flat if weights is None else flat * jnp.broadcast_to(weights, w.shape).reshape(-1, p)
    norms = np.linalg.norm(np.asarray(scaled), axis=-1)
    return (q_min / norms**objective.degree).reshape(w.shape[:-1])
