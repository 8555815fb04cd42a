"""The discrete rules of the paper (eq. 3, 6, 7; docs/math.md section 5), as optax transformations.

k = 0, 1, ..., g_k = grad L(w_k), all operations elementwise, eps_placement="inside"
(the paper's rule, and its authors' code):

    w_{k+1} = w_k - lr * h_k * g_k
    GD        h_k = 1
    AdaGrad   S_k = S_{k-1} + g_k^2 (S_{-1} = 0),              h_k = 1 / sqrt(eps + S_k)
    RMSProp   n_k = b n_{k-1} + (1 - b) g_k^2 (n_{-1} = 0),    h_k = 1 / sqrt(eps + n_k)
    Adam      n_k as RMSProp with b = b2,    h_k = 1 / sqrt(eps + n_k / (1 - b2^{k+1}))
              (b1 > 0 replaces g_k by the bias-corrected first moment, Fig. 4)
    SGDMomentum  v_k = mu v_{k-1} + g_k (v_{-1} = 0),  w_{k+1} = w_k - lr v_k

eps_placement="outside": PyTorch's rule, h_k = 1 / (sqrt(.) + eps), as torch.optim does, with
torch.optim's defaults for the hyper-parameters not given. (The keyword was `convention`,
"paper" / "pytorch"; it is still accepted, with a DeprecationWarning.)

Only `lr` may be passed by position: every other hyper-parameter is keyword-only, e.g.
`Adam(1e-3, b2=0.999, eps=1e-8)`. optax orders them differently (`optax.adam(lr, b1, b2,
eps)`), so an optax-style positional call such as `Adam(1e-3, 0.9, 0.999)` would silently
mean other values; it raises a TypeError naming the keywords instead.

Each class is built on the optax transformation that equals its rule exactly; the tests
check this step by step in float64 against the rules above written out in numpy.
"""

from __future__ import annotations

import abc
import functools
import inspect
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import optax
import optax.tree_utils as otu
from jaxtyping import Array, Float

from .._checks import check_eps_placement, check_positive, check_unit, is_concrete
from .._records import record_repr
from .._registry import lookup, register
from ._transforms import _scale_by_rss_eps_outside

# Defaults where a hyper-parameter has one: "inside" = the paper and its authors' code
# (b = 0.9, eps = 1e-5, App. F); "outside" = torch.optim's own defaults (PyTorch's rule).
# The learning rate has no default: it sets the flow time t = k * eta, so it should always
# be explicit.
_DEFAULTS = {
    "inside": {"adagrad_eps": 1e-5, "rmsprop_b": 0.9, "rmsprop_eps": 1e-5, "adam_b2": 0.9,
              "adam_eps": 1e-5},
    "outside": {"adagrad_eps": 1e-10, "rmsprop_b": 0.99, "rmsprop_eps": 1e-8, "adam_b2": 0.999,
                "adam_eps": 1e-8},
}


_EXAMPLES = {"lr": "0.1", "eps": "1e-5", "b": "0.9", "b2": "0.9", "b1": "0.9",
             "momentum": "0.9"}


# One optimiser per value: an array of values would fail later, inside optax or the scan.
_SWEEP = "to sweep values call `run` once per value (e.g. [run(GD(lr), ...) for lr in lrs])"


def _check_lr(lr, where: str):
    return check_positive(lr, "lr", where, "the paper's toy runs use lr = 0.1", "0.1",
                          scalar=True, sweep=_SWEEP)


def _check_eps(eps, where: str):
    return check_positive(eps, "eps", where,
                          "the paper uses eps = 1e-5 (PyTorch: 1e-8, AdaGrad 1e-10)", "1e-5",
                          scalar=True, sweep=_SWEEP)


def _check_unit(b, name: str, where: str, hint: str):
    return check_unit(b, name, where, hint, _EXAMPLES[name], scalar=True, sweep=_SWEEP)


def _keyword_only(init):
    """Let only `lr` be positional: a clear TypeError for `Adam(1e-3, 0.9, 0.999)`.

    The decorated __init__ has the signature (self, lr, *, ...); Python would reject extra
    positional arguments too, but with a message that names neither the keywords nor the
    optax order that leads to the mistake.
    """
    keywords = [p.name for p in inspect.signature(init).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY
                and p.name not in ("eps_placement", "convention")]

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        if len(args) > 1:
            cls = type(self).__name__
            if not keywords:
                raise TypeError(
                    f"{cls}: takes one hyper-parameter, lr, got {len(args)} positional "
                    f"arguments {args!r}; write {cls}({args[0]!r})."
                )
            named = ", ".join(f"{k}=..." for k in keywords)
            raise TypeError(
                f"{cls}: only `lr` may be passed by position, got {len(args)} positional "
                f"arguments {args!r}; the hyper-parameters after lr are keyword-only "
                f"({', '.join(keywords)}): optax's constructors order them differently (e.g. "
                f"optax.adam(lr, b1, b2, eps)). Pass them by name: {cls}({args[0]!r}, {named})."
            )
        return init(self, *args, **kwargs)

    return wrapper


def _float(x):
    return float(x) if is_concrete(x) else x


class AbstractOptimizer(eqx.Module):
    """A discrete rule w_{k+1} = w_k - lr * h_k * g_k (module docstring for the table).

    Subclasses give `transformation()`, the optax GradientTransformation of the rule, and
    read the second moment n_k and the conditioner h_k back from its state (after the
    update of step k, i.e. including g_k). `eta` is the flow time of one step
    (docs/math.md section 5): lr, except AdaGrad's lr^2 and SGDMomentum's lr / (1 - mu).
    """

    __repr__ = record_repr  # values, not shapes: RMSProp(lr=0.1, b=0.9, eps=1e-05, ...)

    name: ClassVar[str]
    lr: eqx.AbstractVar[Float[Array, ""]]
    eps_placement: eqx.AbstractVar[str]  # "inside" (the paper's) or "outside" (PyTorch's)

    @property
    def convention(self) -> str:
        """Deprecated: the eps placement under its old name, "paper" / "pytorch" (use
        `eps_placement`)."""
        import warnings

        from .._checks import _caller_level

        warnings.warn("optimizer.convention is deprecated: use optimizer.eps_placement "
                      "('inside' or 'outside').", DeprecationWarning, stacklevel=_caller_level())
        return {"inside": "paper", "outside": "pytorch"}[self.eps_placement]

    @abc.abstractmethod
    def transformation(self) -> optax.GradientTransformation:
        """The optax transformation of the rule (updates are the full step -lr h_k g_k)."""

    @property
    def eta(self):
        """Flow time of one step: t = k * eta."""
        return self.lr

    def second_moment(self, state, w) -> Float[Array, " p"]:
        """n_k (AdaGrad: S_k) from the optax state after step k; zeros where none."""
        return jnp.zeros_like(w)

    def conditioner(self, state, w) -> Float[Array, " p"]:
        """h_k from the optax state after step k; ones where the rule has none."""
        return jnp.ones_like(w)

    def flow_moment(self, n):
        """The matching flow's second moment m at the saved n_k (docs/math.md section 5):
        n_k itself, except AdaGrad's m = lr^2 S_k."""
        return n

    def hyperparameters(self) -> dict:
        return {"lr": _float(self.lr)}

    def _root(self, n, eps):
        if self.eps_placement == "inside":
            return 1.0 / jnp.sqrt(eps + n)
        return 1.0 / (jnp.sqrt(n) + eps)


@register("optimizer")
class GD(AbstractOptimizer):
    """Gradient descent, w_{k+1} = w_k - lr * g_k (h_k = 1). Follows gradient flow, eta = lr.

    Built on `optax.sgd(lr)`. Both eps placements are the same rule (there is no eps).

    Example: `run(GD(0.1), Linear(2, key=k), soudry_dataset(), 1000)`.
    """

    name: ClassVar[str] = "gd"
    lr: Float[Array, ""]
    eps_placement: str = eqx.field(static=True, default="inside")

    @_keyword_only
    def __init__(self, lr, *, eps_placement=None, convention=None):
        self.lr = _check_lr(lr, "GD")
        self.eps_placement = check_eps_placement(eps_placement, "GD", convention,
                                                 "convention")

    def transformation(self):
        return optax.sgd(self.lr)


@register("optimizer")
class AdaGrad(AbstractOptimizer):
    """AdaGrad (paper eq. 6): S_k = sum_{s<=k} g_s^2, w_{k+1} = w_k - lr g_k / sqrt(eps + S_k).

    "outside": w_{k+1} = w_k - lr g_k / (sqrt(S_k) + eps) (torch.optim.Adagrad with
    initial_accumulator_value = 0, lr_decay = 0).
    Built on `optax.adagrad(lr, initial_accumulator_value=0, eps=eps)` ("inside"; optax's
    default accumulator 0.1 is NOT the paper's rule). optax has no eps-outside AdaGrad, so
    "outside" is the same accumulator with the root written as PyTorch does.

    Matching flow (docs/math.md section 5): the AdaGrad flow with eta = lr^2 and eps_flow =
    lr^2 eps ("inside") or lr eps ("outside"), since lr S_k^{-1/2} = lr^2 (lr^2 S_k)^{-1/2}
    and m(t) ~ lr^2 S_k.

    Args (all but lr keyword-only): lr > 0; eps > 0 (default 1e-5 "inside", 1e-10
    "outside"). Example: `AdaGrad(0.1, eps=1e-5)`.
    """

    name: ClassVar[str] = "adagrad"
    lr: Float[Array, ""]
    eps: Float[Array, ""]
    eps_placement: str = eqx.field(static=True, default="inside")

    @_keyword_only
    def __init__(self, lr, *, eps=None, eps_placement=None, convention=None):
        self.eps_placement = check_eps_placement(eps_placement, "AdaGrad", convention,
                                                 "convention")
        if eps is None:
            eps = _DEFAULTS[self.eps_placement]["adagrad_eps"]
        self.lr = _check_lr(lr, "AdaGrad")
        self.eps = _check_eps(eps, "AdaGrad")

    @property
    def eta(self):
        return self.lr * self.lr

    def transformation(self):
        if self.eps_placement == "inside":
            return optax.adagrad(self.lr, initial_accumulator_value=0.0, eps=self.eps)
        return optax.chain(_scale_by_rss_eps_outside(self.eps),
                           optax.scale_by_learning_rate(self.lr))

    def second_moment(self, state, w):
        return otu.tree_get(state, "sum_of_squares")

    def conditioner(self, state, w):
        return self._root(self.second_moment(state, w), self.eps)

    def flow_moment(self, n):
        # lr S_k^{-1/2} = lr^2 (lr^2 S_k)^{-1/2}: the flow's m is lr^2 S_k, its h is h_k / lr.
        return self.eta * n

    def hyperparameters(self):
        return {"lr": _float(self.lr), "eps": _float(self.eps)}


@register("optimizer")
class RMSProp(AbstractOptimizer):
    """RMSProp (paper eq. 7): n_k = b n_{k-1} + (1 - b) g_k^2, n_{-1} = 0,
    w_{k+1} = w_k - lr g_k / sqrt(eps + n_k)   ("outside": / (sqrt(n_k) + eps)).

    Built on `optax.rmsprop(lr, decay=b, eps=eps, initial_scale=0, eps_in_sqrt=True)`
    ("inside") or eps_in_sqrt=False ("outside", = torch.optim.RMSprop with alpha = b).
    Matching flow: RMSProp flow with eta = lr, 1 - b = eta (1 - b_flow), same eps.

    Args (all but lr keyword-only): lr > 0; b in [0, 1) (default 0.9 "inside", 0.99
    "outside"); eps > 0 (default 1e-5 "inside", 1e-8 "outside"). Example:
    `RMSProp(0.1, b=0.9, eps=1e-5)`.
    """

    name: ClassVar[str] = "rmsprop"
    lr: Float[Array, ""]
    b: Float[Array, ""]
    eps: Float[Array, ""]
    eps_placement: str = eqx.field(static=True, default="inside")

    @_keyword_only
    def __init__(self, lr, *, b=None, eps=None, eps_placement=None, convention=None):
        self.eps_placement = check_eps_placement(eps_placement, "RMSProp", convention,
                                                 "convention")
        d = _DEFAULTS[self.eps_placement]
        b = d["rmsprop_b"] if b is None else b
        eps = d["rmsprop_eps"] if eps is None else eps
        self.lr = _check_lr(lr, "RMSProp")
        self.b = _check_unit(b, "b", "RMSProp", "the paper uses b = 0.9, PyTorch alpha = 0.99")
        self.eps = _check_eps(eps, "RMSProp")

    def transformation(self):
        return optax.rmsprop(self.lr, decay=self.b, eps=self.eps, initial_scale=0.0,
                             eps_in_sqrt=self.eps_placement == "inside")

    def second_moment(self, state, w):
        return otu.tree_get(state, "nu")

    def conditioner(self, state, w):
        return self._root(self.second_moment(state, w), self.eps)

    def hyperparameters(self):
        return {"lr": _float(self.lr), "b": _float(self.b), "eps": _float(self.eps)}


@register("optimizer")
class Adam(AbstractOptimizer):
    """Adam; b1 = 0 is the paper's "Adam (w/m)": n_k = b2 n_{k-1} + (1 - b2) g_k^2,
    w_{k+1} = w_k - lr g_k / sqrt(eps + n_k / (1 - b2^{k+1}))   ("outside": / (sqrt(.) + eps)).

    With b1 > 0 (the momentum Adam of the paper's Fig. 4) g_k is replaced by
    u_k / (1 - b1^{k+1}), u_k = b1 u_{k-1} + (1 - b1) g_k.
    Built on `optax.adam(lr, b1, b2, eps=0, eps_root=eps)` ("inside") or
    `optax.adam(lr, b1, b2, eps=eps, eps_root=0)` ("outside", = torch.optim.Adam).
    Matching flow: Adam flow with eta = lr, 1 - b2 = eta (1 - b_flow), same eps, and the
    bias correction 1 - e^{-(1 - b_flow) t} ("ema"), the limit of 1 - b2^{k+1}; with b1 > 0
    also 1 - b1 = eta (1 - b1_flow) (AdamFlow(..., b1=b1_flow)).

    Args (all but lr keyword-only, unlike optax.adam(lr, b1, b2, eps)): lr > 0; b2 in
    [0, 1) (default 0.9 "inside", 0.999 "outside"); eps > 0 (default 1e-5 "inside", 1e-8
    "outside"); b1 in [0, 1), default 0. Example: `Adam(1e-3, b2=0.999, eps=1e-8)`.
    """

    name: ClassVar[str] = "adam"
    lr: Float[Array, ""]
    b2: Float[Array, ""]
    eps: Float[Array, ""]
    b1: Float[Array, ""]
    eps_placement: str = eqx.field(static=True, default="inside")

    @_keyword_only
    def __init__(self, lr, *, b2=None, eps=None, b1=0.0, eps_placement=None, convention=None):
        self.eps_placement = check_eps_placement(eps_placement, "Adam", convention,
                                                 "convention")
        d = _DEFAULTS[self.eps_placement]
        b2 = d["adam_b2"] if b2 is None else b2
        eps = d["adam_eps"] if eps is None else eps
        self.lr = _check_lr(lr, "Adam")
        self.b2 = _check_unit(b2, "b2", "Adam", "the paper uses b2 = 0.9, PyTorch 0.999")
        self.eps = _check_eps(eps, "Adam")
        self.b1 = _check_unit(b1, "b1", "Adam",
                              "b1 = 0 is the paper's Adam (w/m), 0.9 its momentum Adam")

    def transformation(self):
        if self.eps_placement == "inside":
            return optax.adam(self.lr, b1=self.b1, b2=self.b2, eps=0.0, eps_root=self.eps)
        return optax.adam(self.lr, b1=self.b1, b2=self.b2, eps=self.eps, eps_root=0.0)

    def second_moment(self, state, w):
        return otu.tree_get(state, "nu")

    def conditioner(self, state, w):
        count = otu.tree_get(state, "count")
        n_hat = self.second_moment(state, w) / (1.0 - self.b2**count)
        return self._root(n_hat, self.eps)

    def hyperparameters(self):
        return {"lr": _float(self.lr), "b2": _float(self.b2), "eps": _float(self.eps),
                "b1": _float(self.b1)}


@register("optimizer")
class SGDMomentum(AbstractOptimizer):
    """Heavy-ball SGD (paper Fig. 4): v_k = mu v_{k-1} + g_k, v_{-1} = 0, w_{k+1} = w_k - lr v_k.

    Built on `optax.sgd(lr, momentum=mu)` (= torch.optim.SGD with dampening 0; both
    placements are the same rule). Matching flow: MomentumFlow(b1) with eta = lr / (1 - mu)
    and 1 - mu = eta (1 - b1) (m1_k = (1 - mu) v_k is the flow's first moment). Its
    Trajectory uses t = k * eta, h = 1 and m = 0.

    Args (all but lr keyword-only): lr > 0; momentum mu in [0, 1) (default 0.9, the
    paper's Fig. 4). Example: `SGDMomentum(0.1, momentum=0.9)`.
    """

    name: ClassVar[str] = "sgd_momentum"
    lr: Float[Array, ""]
    momentum: Float[Array, ""]
    eps_placement: str = eqx.field(static=True, default="inside")

    @_keyword_only
    def __init__(self, lr, *, momentum=0.9, eps_placement=None, convention=None):
        self.eps_placement = check_eps_placement(eps_placement, "SGDMomentum", convention,
                                                 "convention")
        self.lr = _check_lr(lr, "SGDMomentum")
        self.momentum = _check_unit(momentum, "momentum", "SGDMomentum",
                                    "the paper's Fig. 4 uses momentum = 0.9")

    @property
    def eta(self):
        """Flow time of one step, lr / (1 - mu): heavy ball's v_k sums 1 / (1 - mu) gradients."""
        return self.lr / (1.0 - self.momentum)

    def transformation(self):
        return optax.sgd(self.lr, momentum=self.momentum)

    def hyperparameters(self):
        return {"lr": _float(self.lr), "momentum": _float(self.momentum)}


def optimizer_from_meta(meta: dict) -> AbstractOptimizer:
    """Rebuild the optimiser of a discrete Trajectory from its metadata."""
    cls = lookup("optimizer", meta.get("optimizer"), "optimiser")
    placement = meta.get("eps_placement")
    if placement is None:  # a Trajectory saved before eps_placement: "paper" / "pytorch"
        placement = {"paper": "inside", "pytorch": "outside"}[meta["convention"]]
    return cls(**dict(meta["optimizer_hyper"]), eps_placement=placement)
