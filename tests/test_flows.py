"""Flows: the vector fields of docs/math.md section 2, Adam at t = 0, input validation (issue 2)."""

import math

import jax.numpy as jnp
import marginflow  # noqa: F401
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marginflow.flows import AdaGradFlow, AdamFlow, GradientFlow, RMSPropFlow

P = 5
vectors = st.lists(st.floats(-3.0, 3.0), min_size=P, max_size=P).map(np.array)
moments = st.lists(st.floats(0.0, 5.0), min_size=P, max_size=P).map(np.array)


def reference_field(name, t, m, g, eps, b, correction="paper", conditioner="eps_inside"):
    """docs/math.md section 2 table written out in numpy, independently of the package."""
    if name == "gd":
        return -g, np.zeros_like(m)
    if name == "adagrad":
        dm, psi = g**2, m
    elif name == "rmsprop":
        dm, psi = (1 - b) * (g**2 - m), m
    else:
        dm = (1 - b) * (g**2 - m)
        c = 1 - b**t if correction == "paper" else 1 - math.exp(-(1 - b) * t)
        psi = m / c
    h = 1 / np.sqrt(eps + psi) if conditioner == "eps_inside" else 1 / (np.sqrt(psi) + eps)
    return -h * g, dm


def make(name, eps, b, correction="paper", conditioner="eps_inside"):
    placement = conditioner.removeprefix("eps_")
    return {
        "gd": lambda: GradientFlow(eps_placement=placement),
        "adagrad": lambda: AdaGradFlow(eps, eps_placement=placement),
        "rmsprop": lambda: RMSPropFlow(eps, b, eps_placement=placement),
        "adam": lambda: AdamFlow(eps, b, bias_correction=correction, eps_placement=placement),
    }[name]()


@pytest.mark.parametrize("name", ["gd", "adagrad", "rmsprop", "adam"])
@pytest.mark.parametrize("conditioner", ["eps_inside", "eps_outside"])
@settings(max_examples=20, deadline=None)
@given(
    w=vectors,
    m=moments,
    g=vectors,
    t=st.floats(0.01, 50.0),
    eps=st.floats(1e-8, 1.0),
    # No subnormal b: XLA on CPU flushes it to 0, so b^t of b = 2e-309 is 0 there and
    # 2e-10 in numpy (found by hypothesis; a decay rate of 1 - 2e-309 is not a use case).
    b=st.floats(0.0, 0.999, allow_subnormal=False),
    correction=st.sampled_from(["paper", "ema"]),
)
def test_vector_field_matches_table(name, conditioner, w, m, g, t, eps, b, correction):
    if name == "adam" and correction == "paper" and b == 0.0:
        b = 0.5  # 1 - 0^t = 1 is fine, but keep the generic branch exercised
    flow = make(name, eps, b, correction, conditioner)
    dw, dm, h, _ = flow.vector_field(jnp.asarray(t), jnp.asarray(w), jnp.asarray(m),
                                     jnp.asarray(g))
    ref_dw, ref_dm = reference_field(name, t, m, g, eps, b, correction, conditioner)
    # float64 arithmetic on O(1) numbers; the only amplification is 1/sqrt(eps) <= 1e4.
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dm, ref_dm, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(-dw, np.asarray(h) * g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("correction", ["paper", "ema"])
@pytest.mark.parametrize("b", [0.5, 0.9, 0.999])
def test_adam_field_at_t0_is_finite_and_the_limit(correction, b):
    eps = 1e-5
    g = jnp.array([0.3, -2.0, 1e-3, 0.0])
    flow = AdamFlow(eps, b, bias_correction=correction)
    zero = jnp.zeros_like(g)
    dw0, dm0, h0, dlogh0 = flow.vector_field(jnp.asarray(0.0), zero, zero, g)
    assert np.all(np.isfinite(dw0)) and np.all(np.isfinite(h0)) and np.all(np.isfinite(dlogh0))
    # m(t)/(1 - b^t) -> (1 - b) g^2 / (-log b) (paper), m/(1 - e^{-(1-b)t}) -> g^2 (ema).
    limit = (1 - b) / -math.log(b) if correction == "paper" else 1.0
    expected_h = 1 / np.sqrt(eps + limit * np.asarray(g) ** 2)
    np.testing.assert_allclose(h0, expected_h, rtol=1e-12)
    # Continuity: at a tiny t with m(t) = (1 - b) g^2 t (the exact solution to first order)
    # the field is within O(t) of its value at 0.
    t = 1e-7
    m_t = (1 - b) * g**2 * t
    dw_t, *_ = flow.vector_field(jnp.asarray(t), zero, m_t, g)
    np.testing.assert_allclose(dw_t, dw0, rtol=1e-5, atol=1e-12)


def test_adam_b_zero_paper_correction():
    # b = 0: 1 - 0^t = 1 for t > 0, psi = m; at t = 0 psi -> 0 (the limit (1-b)/(-log b) = 0).
    flow = AdamFlow(1e-5, 0.0)
    g = jnp.array([1.0, 2.0])
    dw0, *_ = flow.vector_field(jnp.asarray(0.0), jnp.zeros(2), jnp.zeros(2), g)
    np.testing.assert_allclose(dw0, -g / np.sqrt(1e-5))
    dw, *_ = flow.vector_field(jnp.asarray(1.0), jnp.zeros(2), g**2, g)
    np.testing.assert_allclose(dw, -g / np.sqrt(1e-5 + g**2), rtol=1e-13)


@pytest.mark.parametrize("name", ["adagrad", "rmsprop", "adam"])
def test_dlogh_matches_finite_difference(name):
    # d log h/dt from the vector field (used for I(t)) against a centred difference of
    # log h along the exact m-direction: agreement to O(dt^2) ~ 1e-10 relative.
    flow = make(name, 1e-3, 0.8)
    t, m, g = 2.0, jnp.array([0.3, 0.01, 2.0]), jnp.array([0.5, -0.1, 1.5])
    _, dm, _, dlogh = flow.vector_field(jnp.asarray(t), jnp.zeros(3), m, g)
    dt = 1e-5

    def logh(s):
        return np.log(np.asarray(flow.h(jnp.asarray(t + s), m + s * dm, g)))

    fd = (logh(dt) - logh(-dt)) / (2 * dt)
    np.testing.assert_allclose(dlogh, fd, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: RMSPropFlow(eps=0.0), r"`eps` must be a finite number > 0, got 0.0"),
        (lambda: AdaGradFlow(eps=-1e-3), r"`eps` must be a finite number > 0, got -0.001"),
        (lambda: AdamFlow(eps=float("nan")), r"`eps` must be a finite number > 0"),
        (lambda: RMSPropFlow(b=1.2), r"`b` must be a finite number < 1 .*, got 1.2"),
        (lambda: RMSPropFlow(b=1.0), r"`b` must be a finite number < 1 .*, got 1.0"),
        (lambda: RMSPropFlow(b=float("-inf")), r"`b` must be a finite number < 1"),
        (lambda: AdamFlow(b=-0.1), r"bias_correction='paper' .* needs `b` in \[0, 1\), "
                                   r"got -0.1; pass bias_correction='ema'"),
        (lambda: AdamFlow(bias_correction="torch"), "bias_correction"),
        (lambda: RMSPropFlow(eps_placement="eps_outside"), "eps_placement"),
    ],
)
def test_flow_validation(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_eps_placement_is_one_name_and_the_old_ones_still_work():
    """Flows and optimisers name where eps sits `eps_placement` ("inside" / "outside");
    the old keywords (flows: conditioner="eps_inside"/"eps_outside", optimisers:
    convention="paper"/"pytorch") map to it with a DeprecationWarning, disagreeing values
    are refused, and a Trajectory saved with the old meta key still rebuilds its flow."""
    from marginflow.discrete import RMSProp
    from marginflow.flows._flow import flow_from_meta

    with pytest.warns(DeprecationWarning, match="eps_placement='outside'"):
        old = RMSPropFlow(1e-4, 0.5, conditioner="eps_outside")
    assert old == RMSPropFlow(1e-4, 0.5, eps_placement="outside")
    with pytest.warns(DeprecationWarning, match="eps_placement='outside'"):
        opt = RMSProp(0.1, convention="pytorch")
    # PyTorch's rule comes with torch.optim's defaults (b = 0.99, eps = 1e-8)
    assert opt == RMSProp(0.1, eps_placement="outside")
    assert (float(opt.b), float(opt.eps)) == (0.99, 1e-8)
    with pytest.raises(ValueError, match="disagree"):
        RMSPropFlow(eps_placement="inside", conditioner="eps_outside")
    with pytest.warns(DeprecationWarning, match="flow.conditioner is deprecated"):
        assert old.conditioner == "eps_outside"
    assert flow_from_meta("rmsprop", {"eps": 1e-4, "b": 0.5}, "eps_outside") == old
