"""An optax transformation optax lacks: AdaGrad with eps outside the root (PyTorch's)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class _RssState(NamedTuple):
    sum_of_squares: optax.Updates


def _scale_by_rss_eps_outside(eps) -> optax.GradientTransformation:
    """g_k / (sqrt(S_k) + eps), S_k = sum_{s<=k} g_s^2 (torch.optim.Adagrad's root)."""

    def init_fn(params):
        return _RssState(sum_of_squares=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        s = jax.tree.map(lambda g, t: t + g * g, updates, state.sum_of_squares)
        out = jax.tree.map(lambda g, t: g / (jnp.sqrt(t) + eps), updates, s)
        return out, _RssState(sum_of_squares=s)

    return optax.GradientTransformation(init_fn, update_fn)
