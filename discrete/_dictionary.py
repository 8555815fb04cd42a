"""The flow <-> discrete dictionary (docs/math.md section 5).

With flow time t = k * eta a discrete rule follows its flow to first order (error O(eta)
on a fixed interval [0, T]) when its decay rates scale with the step:

| discrete optimiser              | eta  | flow                                                 |
|---------------------------------|------|------------------------------------------------------|
| GD(lr)                          | lr   | GradientFlow()                                       |
| AdaGrad(lr, eps=eps) "inside"   | lr^2 | AdaGradFlow(eps = lr^2 eps)                          |
| AdaGrad(lr, eps=eps) "outside"  | lr^2 | AdaGradFlow(eps = lr eps, eps_placement="outside")   |
| RMSProp(lr, b=b, eps=eps)       | lr   | RMSPropFlow(eps, b_flow), 1 - b = eta (1 - b_flow)   |
| Adam(lr, b2=b2, eps=eps), b1 = 0| lr   | AdamFlow(eps, b_flow, bias_correction="ema"), same b |
| Adam(lr, b2, eps, b1=b1), b1 > 0| lr   | AdamFlow(eps, b_flow, b1=b1_flow, "ema"),            |
|                                 |      |   1 - b1 = eta (1 - b1_flow)                         |
| SGDMomentum(lr, momentum=mu)    | lr / (1 - mu) | MomentumFlow(b1_flow),                      |
|                                 |      |   1 - mu = eta (1 - b1_flow)                         |

An optimiser's eps_placement is its flow's ("inside" or "outside").
Why these: one step changes n by (1 - b)(g^2 - n) = eta (1 - b_flow)(g^2 - n), an Euler
step of dm/dt = (1 - b_flow)(g^2 - m); AdaGrad's lr S_k^{-1/2} = lr^2 (lr^2 S_k)^{-1/2}
with m = lr^2 S_k an Euler sum of dm/dt = g^2; Adam's 1 - b2^{k+1} =
1 - e^{-(1 - b_flow) t} + O(eta).
Heavy ball v_k = mu v_{k-1} + g_k, w_{k+1} = w_k - lr v_k is, with m1_k = (1 - mu) v_k,
m1_k = m1_{k-1} + (1 - mu)(g_k - m1_{k-1}) and w_{k+1} = w_k - eta m1_k, eta = lr / (1 - mu):
an Euler step of dm1/dt = (1 - b1_flow)(g - m1), dw/dt = -m1 once 1 - mu = eta (1 - b1_flow),
i.e. lr = eta^2 (1 - b1_flow). With mu held fixed while lr -> 0, 1 - b1_flow = (1 - mu)^2 /
lr grows without bound: m1 is slaved to g and heavy ball follows gradient flow on the same
time axis t = k lr / (1 - mu).

Fast forgetting. When 1 - b_d > eta (the paper's MNIST settings: b = 0.9 at lr 1e-3 or
1e-4; heavy ball at momentum 0.9), b_flow < 0: the flow's decay rate (1 - b_d) / eta
exceeds 1, and the accumulator forgets within less than one unit of flow time. The run is
still the Euler method on that flow, with eta times the rate equal to 1 - b_d < 1, and the
flow keeps the run's lag of m behind g^2, about b_d / (1 - b_d) steps, to within one step.
As eta -> 0 with b_d held fixed these flows tend to the slaved flow, dw/dt =
-g / sqrt(eps + g^2) (for heavy ball: gradient flow), and the run follows them at first
order (measured in docs/discrete.md). The solvers' exact treatment of the decay
(`flows.DecayHeun`) keeps the fast rate from costing steps.
"""

from __future__ import annotations

import math

from ..flows import AbstractFlow, AdaGradFlow, AdamFlow, GradientFlow, MomentumFlow, RMSPropFlow
from ._optimizers import GD, AbstractOptimizer, AdaGrad, Adam, RMSProp, SGDMomentum


def _concrete(x, name: str, where: str) -> float:
    try:
        return float(x)
    except Exception:
        raise TypeError(
            f"{where}: `{name}` must be a concrete number (not traced under jit/vmap), "
            f"got {x!r}; call it outside jit."
        ) from None


def _b_flow(b_d: float, eta: float) -> float:
    """b_flow with 1 - b_d = eta (1 - b_flow); below 0 when 1 - b_d > eta (module docstring,
    "Fast forgetting")."""
    b_flow = 1.0 - (1.0 - b_d) / eta
    if abs(b_flow) < 1e-12:  # 1 - b = lr up to rounding (the paper's b = 0.9, lr = 0.1)
        b_flow = 0.0
    return b_flow


def matching_flow(optimizer: AbstractOptimizer) -> AbstractFlow:
    """The flow `optimizer` follows as its step goes to 0 (module docstring for the table).

    Time: t = k * optimizer.eta (lr; AdaGrad lr^2; SGDMomentum lr / (1 - mu)).

    Example: `matching_flow(RMSProp(0.01, b=0.995, eps=1.0))` is `RMSPropFlow(eps=1.0, b=0.5)`.
    """
    if not isinstance(optimizer, AbstractOptimizer):
        raise TypeError(
            "matching_flow: `optimizer` must be a marginflow.discrete optimiser, got "
            f"{type(optimizer).__name__}."
        )
    placement = optimizer.eps_placement
    lr = _concrete(optimizer.lr, "lr", "matching_flow")
    if isinstance(optimizer, GD):
        return GradientFlow(eps_placement=placement)
    if isinstance(optimizer, AdaGrad):
        eps = _concrete(optimizer.eps, "eps", "matching_flow")
        # lr g / sqrt(eps + S) = lr^2 g / sqrt(lr^2 eps + lr^2 S); lr g / (sqrt(S) + eps)
        # = lr^2 g / (sqrt(lr^2 S) + lr eps).
        eps_flow = lr * lr * eps if placement == "inside" else lr * eps
        return AdaGradFlow(eps_flow, eps_placement=placement)
    if isinstance(optimizer, RMSProp):
        b = _b_flow(_concrete(optimizer.b, "b", "matching_flow"), lr)
        return RMSPropFlow(_concrete(optimizer.eps, "eps", "matching_flow"), b,
                           eps_placement=placement)
    if isinstance(optimizer, Adam):
        b = _b_flow(_concrete(optimizer.b2, "b2", "matching_flow"), lr)
        b1_d = _concrete(optimizer.b1, "b1", "matching_flow")
        b1 = None if b1_d == 0.0 else _b_flow(b1_d, lr)
        return AdamFlow(_concrete(optimizer.eps, "eps", "matching_flow"), b, b1=b1,
                        bias_correction="ema", eps_placement=placement)
    if isinstance(optimizer, SGDMomentum):
        mu = _concrete(optimizer.momentum, "momentum", "matching_flow")
        if mu == 0.0:  # plain GD: t = k lr
            return GradientFlow(eps_placement=placement)
        b1 = _b_flow(mu, lr / (1.0 - mu))
        return MomentumFlow(b1, eps_placement=placement)
    raise NotImplementedError(f"matching_flow: no entry for {type(optimizer).__name__}.")


def matching_optimizer(flow: AbstractFlow, eta: float) -> AbstractOptimizer:
    """The discrete optimiser whose step eta follows `flow` to first order (the reverse map).

    GradientFlow -> GD(eta); AdaGradFlow(eps) -> AdaGrad(sqrt(eta), eps=eps / eta)
    (eps inside) or AdaGrad(sqrt(eta), eps=eps / sqrt(eta), eps_placement="outside")
    (eps outside); RMSPropFlow(eps, b) -> RMSProp(eta, b=1 - eta (1 - b), eps=eps);
    AdamFlow(eps, b, "ema") -> Adam(eta, b2=1 - eta (1 - b), eps=eps). The paper's Adam
    correction 1 - b^t is the limit of no discrete Adam: ValueError. Needs eta (1 - b) <= 1.
    AdamFlow(eps, b, b1=b1, "ema") -> Adam(eta, b2=1 - eta (1 - b), eps=eps,
    b1=1 - eta (1 - b1)); MomentumFlow(b1) -> SGDMomentum(eta^2 (1 - b1),
    momentum=1 - eta (1 - b1)) (eta = lr / (1 - momentum)). Needs eta (1 - b1) < 1.

    Example: `matching_optimizer(RMSPropFlow(1.0, 0.5), 0.01)` is
    `RMSProp(lr=0.01, b=0.995, eps=1.0)`.
    """
    if not isinstance(flow, AbstractFlow):
        raise TypeError(
            "matching_optimizer: `flow` must be a marginflow flow (GradientFlow, AdaGradFlow, "
            f"RMSPropFlow, AdamFlow, MomentumFlow), got {type(flow).__name__}."
        )
    eta = _concrete(eta, "eta", "matching_optimizer")
    if not (math.isfinite(eta) and eta > 0):
        raise ValueError(
            f"matching_optimizer: `eta` (flow time per step) must be a finite number > 0, got "
            f"{eta!r}; first-order agreement needs it small, e.g. 0.01."
        )
    placement = flow.eps_placement
    b1_d = None
    if getattr(flow, "b1", None) is not None:
        b1_flow = _concrete(flow.b1, "b1", "matching_optimizer")
        decay1 = eta * (1.0 - b1_flow)
        if decay1 >= 1.0:
            raise ValueError(
                f"matching_optimizer: 1 - b1_d = eta (1 - b1) must be < 1 (a momentum in "
                f"[0, 1)), got eta = {eta!r}, b1 = {b1_flow!r} (1 - b1_d = {decay1:.6g}); "
                f"take eta < {1.0 / (1.0 - b1_flow):.6g}."
            )
        b1_d = 1.0 - decay1
    if isinstance(flow, MomentumFlow):
        return SGDMomentum(eta * (1.0 - b1_d), momentum=b1_d, eps_placement=placement)
    if isinstance(flow, GradientFlow):
        return GD(eta, eps_placement=placement)
    if isinstance(flow, AdaGradFlow):
        lr = math.sqrt(eta)
        eps_f = _concrete(flow.eps, "eps", "matching_optimizer")
        eps_d = eps_f / eta if placement == "inside" else eps_f / lr
        return AdaGrad(lr, eps=eps_d, eps_placement=placement)
    if isinstance(flow, (RMSPropFlow, AdamFlow)):
        b_flow = _concrete(flow.b, "b", "matching_optimizer")
        decay = eta * (1.0 - b_flow)
        if decay > 1.0:
            raise ValueError(
                f"matching_optimizer: 1 - b_d = eta (1 - b_flow) must be <= 1, got eta = "
                f"{eta!r}, b_flow = {b_flow!r} (1 - b_d = {decay:.6g}); take "
                f"eta <= {1.0 / (1.0 - b_flow):.6g}."
            )
        eps = _concrete(flow.eps, "eps", "matching_optimizer")
        b_d = 1.0 - decay
        if isinstance(flow, RMSPropFlow):
            return RMSProp(eta, b=b_d, eps=eps, eps_placement=placement)
        if flow.bias_correction != "ema":
            raise ValueError(
                "matching_optimizer: AdamFlow with bias_correction='paper' (1 - b^t, eq. 9) is "
                "the limit of no discrete Adam: 1 - b2^{k+1} tends to 1 - e^{-(1 - b_flow) t}. "
                "Use AdamFlow(eps, b, bias_correction='ema') for the flow discrete Adam follows."
            )
        return Adam(eta, b2=b_d, eps=eps, b1=0.0 if b1_d is None else b1_d,
                    eps_placement=placement)
    raise NotImplementedError(
        f"matching_optimizer: no discrete optimiser for {type(flow).__name__}."
    )
