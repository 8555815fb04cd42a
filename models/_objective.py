"""A model, a data set and a loss bound together as functions of the flat parameters w."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._base import AbstractModel
from ._data import Dataset
from ._losses import AbstractLoss, get_loss


def flatten(model: eqx.Module) -> Float[Array, " p"]:
    """The flat parameter vector w of a model (its inexact arrays, in pytree order)."""
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return jnp.concatenate([jnp.ravel(x) for x in leaves])


def unflatten(model: eqx.Module, w: Float[Array, " p"]) -> eqx.Module:
    """The model with its parameters replaced by the flat vector w (shapes from `model`)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    sizes = [int(np.prod(x.shape)) for x in leaves]
    splits = np.cumsum(sizes)[:-1]
    parts = jnp.split(w, splits)
    new = [p.reshape(x.shape) for p, x in zip(parts, leaves, strict=True)]
    return eqx.combine(jax.tree.unflatten(treedef, new), static)


def initial_point(model, batch: bool):
    """(template, w0): the unbatched model skeleton and the flat initial parameters.

    batch=True: every inexact array of `model` has a leading axis B of initialisations;
    the template is member 0 and w0 has shape (B, p). A non-model gives (model, None) and
    is reported by `Objective`.
    """
    from ._base import AbstractModel

    if batch:
        template = jax.tree.map(lambda x: x[0] if eqx.is_inexact_array(x) else x, model)
        return template, eqx.filter_vmap(flatten)(model)
    return model, flatten(model) if isinstance(model, AbstractModel) else None


def default_loss(data: Dataset) -> str:
    return "exponential" if data.binary else "cross_entropy"


def check_compatible(model, data: Dataset, loss: AbstractLoss, where: str) -> None:
    """Raise a ValueError naming the rule if model, data and loss do not fit together."""
    if not isinstance(model, AbstractModel):
        raise TypeError(
            f"{where}: `model` must be a marginflow.models model (Linear, DeepLinear, "
            f"ToyLeaky, MLP, CNN), got {type(model).__name__}."
        )
    if not isinstance(data, Dataset):
        raise TypeError(
            f"{where}: `data` must be a marginflow.models.Dataset, got {type(data).__name__}; "
            "wrap arrays with Dataset(X, y)."
        )
    in_size = int(np.prod(model.in_shape))
    x_size = int(np.prod(data.X.shape[1:]))
    if x_size != in_size:
        raise ValueError(
            f"{where}: the input dimension of the data, {tuple(data.X.shape[1:])}, does not fit "
            f"the model, which takes inputs of shape {model.in_shape}; build the model with "
            "the data's input dimension."
        )
    out = eqx.filter_eval_shape(model, jax.ShapeDtypeStruct(tuple(model.in_shape), data.X.dtype))
    expected = () if model.out_dim == 1 else (model.out_dim,)
    if getattr(out, "shape", None) != expected:
        raise ValueError(
            f"{where}: the model's output for one input must have shape {expected} (out_dim = "
            f"{model.out_dim}), got {getattr(out, 'shape', out)}; a model whose parameters "
            "carry a leading batch axis (stacked with eqx.filter_vmap) needs batch=True, and "
            "the analysis functions take one member's model."
        )
    if data.binary:
        if model.out_dim != 1:
            raise ValueError(
                f"{where}: binary labels in {{-1, +1}} need a model with out_dim = 1, got "
                f"out_dim = {model.out_dim}; pass integer labels 0..C-1 for multi-class."
            )
        if loss.multiclass:
            raise ValueError(
                f"{where}: loss {loss.name!r} is multi-class but the labels are binary "
                "{-1, +1}; use loss='exponential' or 'logistic'."
            )
    else:
        c = data.n_classes
        if model.out_dim == 1:
            raise ValueError(
                f"{where}: integer labels 0..{c - 1} mean a multi-class problem but the model "
                "has out_dim = 1 (binary); for a binary problem pass float labels in {-1, +1} "
                "(e.g. y = 2.0 * y01 - 1), or build the model with out_dim = C."
            )
        if c > model.out_dim:
            raise ValueError(
                f"{where}: labels go up to {c - 1} but the model has out_dim = "
                f"{model.out_dim}; build it with out_dim >= {c}."
            )
        if not loss.multiclass:
            raise ValueError(
                f"{where}: loss {loss.name!r} is binary but the labels are multi-class; "
                "use loss='cross_entropy'."
            )


class Objective(eqx.Module):
    """L(w) = sum_i exp(-f(q_i(w))) for a model, a data set and a loss, w flat.

    `log_loss(w)` is log L (log space, docs/math.md section 1); `grad(w)` is grad L computed as
    L * grad log L: log L and grad log L are exact in relative terms at any L (e^{-1e5}
    included), and grad L inherits exp's amplification of the rounding of log L (relative
    errors 5e-14 to 1.4e-12 measured at L = e^{-300}); below e^{-708} grad L itself is
    subnormal, and 0 below e^{-745}. The flows' fields in log time form t grad L as
    exp(log L + log t) grad log L (flows/_fields.py), which stays of order 1.
    """

    model: AbstractModel
    data: Dataset
    loss: AbstractLoss

    def __init__(self, model, data, loss=None, *, where: str = "Objective"):
        loss = get_loss(default_loss(data) if loss is None else loss)
        check_compatible(model, data, loss, where)
        self.model = model
        self.data = data
        self.loss = loss

    @property
    def degree(self) -> int:
        return int(self.model.degree)

    def w0(self) -> Float[Array, " p"]:
        return flatten(self.model)

    def unravel(self, w):
        return unflatten(self.model, w)

    def outputs(self, w):
        model = self.unravel(w)
        X = self.data.X.reshape((self.data.X.shape[0],) + tuple(model.in_shape))
        return jax.vmap(model)(X.astype(w.dtype))

    def margins(self, w) -> Float[Array, " n"]:
        return self.loss.margins(self.outputs(w), self.data.y)

    def log_terms(self, w) -> Float[Array, " n"]:
        return self.loss.log_terms(self.outputs(w), self.data.y)

    def log_loss(self, w) -> Float[Array, ""]:
        return self.loss.log_loss(self.outputs(w), self.data.y)

    def log_loss_and_grad(self, w):
        """(log L, grad L): grad L = L * grad log L."""
        log_l, glog = jax.value_and_grad(self.log_loss)(w)
        return log_l, jnp.exp(log_l) * glog

    def grad(self, w):
        return self.log_loss_and_grad(w)[1]

    def in_dtype(self, dtype) -> Objective:
        """This objective with its data in `dtype` (a float32 run's data, so that no step
        promotes back to float64); integer class labels stay integers (they index)."""
        y = self.data.y
        return eqx.tree_at(lambda o: (o.data.X, o.data.y), self,
                           (self.data.X.astype(dtype),
                            y.astype(dtype) if jnp.issubdtype(y.dtype, jnp.floating) else y))

    def describe(self) -> dict:
        """The loss / model / data keys every Trajectory's meta carries (JSON values)."""
        return {
            "loss": self.loss.name,
            "model": self.model.spec(),
            "degree": self.degree,
            "data": {
                "fingerprint": self.data.fingerprint(),
                "n": len(self.data),
                "binary": self.data.binary,
            },
        }
