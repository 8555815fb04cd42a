"""Entry checks of simulate / run (issue 13): the homogeneity check samples the whole data set
at two parameter points and refuses non-finite outputs; bools and strings are refused where
numbers are expected. Everything here raises before a solver or a run is compiled."""

import equinox as eqx
import jax
import jax.numpy as jnp
import marginflow  # noqa: F401
import numpy as np
import pytest
from marginflow.analysis import rate_fit
from marginflow.discrete import GD, AdaGrad, Adam, RMSProp, SGDMomentum, run
from marginflow.flows import AdaGradFlow, AdamFlow, GradientFlow, RMSPropFlow, simulate
from marginflow.models import (
    MLP,
    AbstractModel,
    Dataset,
    DeepLinear,
    Linear,
    Objective,
    ToyLeaky,
    separable_gaussians,
    soudry_dataset,
    toy_dataset,
    unflatten,
)
from marginflow.models._homogeneity import check_homogeneous, sample_rows

KEY = jax.random.PRNGKey(0)
NOT_HOMOGENEOUS = "not homogeneous of the degree it claims"


def _head_zero_data(n: int = 40, zeros: int = 8) -> Dataset:
    """Binary data in R^2 whose first `zeros` rows are x = 0 (every model outputs 0 there)."""
    rng = np.random.default_rng(0)
    y = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    X = y[:, None] * (np.array([1.0, 1.0]) + 0.3 * rng.standard_normal((n, 2)))
    X[:zeros] = 0.0
    return Dataset(X, y)


class _InputBias(AbstractModel):
    """<w, x> + 0.5 sum(x): zero at x = 0, not homogeneous in w elsewhere."""

    weight: jax.Array
    out_dim: int = eqx.field(static=True, default=1)
    degree: int = eqx.field(static=True, default=1)

    def __init__(self, weight):
        self.weight = jnp.asarray(weight, jnp.float64)

    @property
    def in_shape(self):
        return (2,)

    def spec(self):
        return {"class": "_InputBias", "kwargs": {}}

    def __call__(self, x):
        return jnp.dot(self.weight, x) + 0.5 * jnp.sum(x)


class _SquaredSecond(_InputBias):
    """<w, x> + w_2^2 sum(x): homogeneous along w0 = (a, 0) (the extra term vanishes at w0
    and 2 w0), not at any point with w_2 != 0."""

    def __call__(self, x):
        return jnp.dot(self.weight, x) + self.weight[1] ** 2 * jnp.sum(x)


class _WrongDegree(Linear):
    """A Linear model that claims degree 2."""

    def __init__(self, in_dim, *, key):
        super().__init__(in_dim, key=key)
        self.degree = 2


def _linear_at(w) -> Linear:
    return unflatten(Linear(2, key=KEY), jnp.asarray(w, jnp.float64))


# ----------------------------------------------------------------- homogeneity
def test_rows_sampled_over_the_data_set():
    data = _head_zero_data(n=200)
    rows = sample_rows(data.X)
    norms = np.linalg.norm(np.asarray(data.X), axis=1)
    assert rows.size == 16 and np.unique(rows).size == 16
    assert set(np.argsort(-norms)[:8]) <= set(rows.tolist())  # the largest-norm rows
    assert rows.max() > 150 and np.sum(rows >= 8) >= 12  # spread, not the head
    np.testing.assert_array_equal(sample_rows(toy_dataset(0).X[:10]), np.arange(10))


@pytest.mark.parametrize("model", [_InputBias(jnp.array([0.3, -0.2])),
                                   _WrongDegree(2, key=KEY)], ids=["input_bias", "wrong_degree"])
def test_not_homogeneous_beyond_the_first_rows_is_refused(model):
    data = _head_zero_data()
    o = Objective(model, data)
    # The first 8 outputs are 0 at w0 and 2 w0: the old check (8 head rows) passed these.
    assert np.all(np.asarray(o.outputs(o.w0()))[:8] == 0)
    assert np.all(np.asarray(o.outputs(2.0 * o.w0()))[:8] == 0)
    with pytest.raises(ValueError, match=NOT_HOMOGENEOUS + r".*at the initial parameters"):
        simulate(GradientFlow(), model, data, 1e3)
    with pytest.raises(ValueError, match=NOT_HOMOGENEOUS + r".*at the initial parameters"):
        run(GD(0.1), model, data, 10)


def test_degenerate_at_w0_is_refused_at_the_second_point():
    model = _SquaredSecond(jnp.array([0.7, 0.0]))
    data = soudry_dataset()
    with pytest.raises(ValueError, match=NOT_HOMOGENEOUS + r".*at a second check point"):
        simulate(GradientFlow(), model, data, 1e3)
    with pytest.raises(ValueError, match=NOT_HOMOGENEOUS + r".*at a second check point"):
        run(GD(0.1), model, data, 10)


def test_batched_models_are_checked():
    data = _head_zero_data()
    W = jnp.array([[0.3, -0.2], [0.1, 0.4]])
    models = eqx.filter_vmap(lambda w: _InputBias(w))(W)
    with pytest.raises(ValueError, match=NOT_HOMOGENEOUS):
        simulate(GradientFlow(), models, data, 1e3, batch=True)
    wrong = eqx.filter_vmap(lambda k: _WrongDegree(2, key=k))(jax.random.split(KEY, 2))
    with pytest.raises(ValueError, match=NOT_HOMOGENEOUS):
        run(GD(0.1), wrong, data, 10, batch=True)


@pytest.mark.parametrize("w, what", [
    ([1e300, 1e300], "not finite"),  # Phi(w0) = inf on data of norm ~1e10
    ([1e300, -1e300], "not finite"),  # inf - inf = NaN
    ([1e308, 0.0], "overflow at 2 w0"),  # Phi(w0) finite, Phi(2 w0) = inf
], ids=["inf", "nan", "overflow_at_2w0"])
def test_nonfinite_outputs_are_refused(w, what):
    if what == "overflow at 2 w0":
        data = Dataset(np.array([[1.0, 0.0], [-1.0, 0.0]]), np.array([1.0, -1.0]))
    else:
        data = Dataset(1e10 * np.array([[1.0, 2.0], [-2.0, -1.0]]), np.array([1.0, -1.0]))
    model = _linear_at(w)
    o = Objective(model, data)
    assert not np.all(np.isfinite(np.asarray(o.outputs(2.0 * o.w0()))))
    for call in (lambda: simulate(RMSPropFlow(), model, data, 1e3),
                 lambda: run(GD(0.1), model, data, 10)):
        with pytest.raises(ValueError, match=what) as info:
            call()
        assert "rescale the data" in str(info.value)


class _DefinedOnAxis(_InputBias):
    """<w, x>, but NaN unless w_2 = 0 (an operation not defined everywhere): finite at
    w0 = (a, 0) and 2 w0, NaN at the second check point."""

    def __call__(self, x):
        return jnp.dot(self.weight, x) + jnp.where(self.weight[1] == 0, 0.0, jnp.nan)


def test_nonfinite_at_the_second_point_is_refused():
    model, data = _DefinedOnAxis(jnp.array([0.7, 0.0])), soudry_dataset()
    for call in (lambda: simulate(GradientFlow(), model, data, 1e3),
                 lambda: run(GD(0.1), model, data, 10)):
        with pytest.raises(ValueError, match=r"not finite at a second check point.*NaN/inf"):
            call()


@pytest.mark.parametrize("build, data", [
    (lambda: Linear(2, key=KEY), soudry_dataset),
    (lambda: ToyLeaky(key=KEY), toy_dataset),
    (lambda: MLP(5, 8, 3, key=KEY), lambda: separable_gaussians(60, 5)),
    (lambda: MLP(5, 8, 3, activation=2, key=KEY), lambda: separable_gaussians(60, 5)),
    (lambda: DeepLinear((2, 4, 3, 1), key=KEY), soudry_dataset),
    (lambda: Linear(2, key=KEY), _head_zero_data),
], ids=["linear", "toy", "mlp_relu", "mlp_square", "deep_linear", "linear_zero_rows"])
def test_homogeneous_models_pass(build, data):
    model, data = build(), data()
    o = Objective(model, data)
    check_homogeneous(o, o.w0(), "t")  # no error


def test_batched_and_float32_parameters_pass():
    o = Objective(MLP(5, 8, 3, key=KEY), separable_gaussians(60, 5))
    check_homogeneous(o, jnp.stack([o.w0(), -o.w0()]), "t")  # batched: member 0
    check_homogeneous(o, o.w0().astype(jnp.float32), "t")  # checked in float64


def test_zero_function_is_accepted():
    # All-zero outputs at both points cannot tell a degree apart: the zero function is
    # homogeneous of every degree, so the check accepts it.
    data = _head_zero_data(n=8, zeros=8)
    check_homogeneous(Objective(_WrongDegree(2, key=KEY), data), jnp.ones(2), "t")


# -------------------------------------------------------------- bools and strings
_BAD = [True, False, np.True_, "1e6", "0.5", np.array("1e-5")]


@pytest.mark.parametrize("bad", _BAD, ids=repr)
@pytest.mark.parametrize("name", ["t0", "t1", "rtol", "atol"])
def test_simulate_refuses_bools_and_strings(name, bad):
    args = {"t1": 1e3}
    args[name] = bad
    t1 = args.pop("t1")
    with pytest.raises(TypeError, match=rf"simulate: `{name}` must be a real number.*"
                                        rf"pass a float such as {name}="):
        simulate(GradientFlow(), Linear(2, key=KEY), soudry_dataset(), t1, **args)


@pytest.mark.parametrize("bad", _BAD, ids=repr)
@pytest.mark.parametrize("build, name", [
    (lambda v: AdaGradFlow(eps=v), "eps"),
    (lambda v: RMSPropFlow(eps=v), "eps"),
    (lambda v: RMSPropFlow(b=v), "b"),
    (lambda v: AdamFlow(eps=v), "eps"),
    (lambda v: AdamFlow(b=v), "b"),
    (lambda v: GD(v), "lr"),
    (lambda v: AdaGrad(v), "lr"),
    (lambda v: AdaGrad(0.1, eps=v), "eps"),
    (lambda v: RMSProp(0.1, b=v), "b"),
    (lambda v: RMSProp(0.1, eps=v), "eps"),
    (lambda v: Adam(0.1, b2=v), "b2"),
    (lambda v: Adam(0.1, eps=v), "eps"),
    (lambda v: Adam(0.1, b1=v), "b1"),
    (lambda v: SGDMomentum(0.1, momentum=v), "momentum"),
])
def test_hyperparameters_refuse_bools_and_strings(build, name, bad):
    with pytest.raises(TypeError, match=rf"`{name}` must be a real number, got .*\((a bool|a "
                                        rf"string)\); pass a float such as {name}="):
        build(bad)


def test_numbers_are_still_accepted():
    # Numbers in the forms numpy and JAX give them (scalars, 0-d arrays, ints).
    RMSPropFlow(np.float32(1e-5), jnp.asarray(0.9))
    RMSProp(np.float64(0.1), b=0.9, eps=1)
    AdaGradFlow(1)


@pytest.mark.parametrize("bad", [True, "1e3"], ids=repr)
@pytest.mark.parametrize("name", ["t_min", "t_max"])
def test_rate_fit_refuses_bools_and_strings(name, bad):
    with pytest.raises(TypeError, match=rf"rate_fit: `{name}` must be a real number"):
        rate_fit(None, **{name: bad})


def test_run_integer_arguments_refuse_bools_and_strings():
    data, model = toy_dataset(0), ToyLeaky(key=KEY)
    for kwargs in ({"steps": True}, {"steps": "10"}, {"steps": 10, "save_every": True},
                   {"steps": 10, "save_every": "2"}):
        steps = kwargs.pop("steps")
        with pytest.raises(ValueError, match="must be an integer"):
            run(GD(0.1), model, data, steps, **kwargs)


@pytest.mark.parametrize("solver, error, needle", [
    ("class", TypeError, "pass DecayHeun()"),
    ("DecayHeun", TypeError, "must be a diffrax solver"),
    ("euler", ValueError, "must be adaptive"),
    ("implicit_euler", ValueError, "root finder's own tolerances"),
])
def test_simulate_checks_the_solver_before_compiling(solver, error, needle):
    """Each once failed inside diffrax with a message that named neither `solver` nor a
    fix (a missing positional argument, a missing attribute, 'Type of `other` not
    understood')."""
    import diffrax as dfx
    from marginflow.flows import DecayHeun

    solver = {"class": DecayHeun, "euler": dfx.Euler(),
              "implicit_euler": dfx.ImplicitEuler()}.get(solver, solver)
    with pytest.raises(error, match=needle) as info:
        simulate(GradientFlow(), ToyLeaky(key=KEY), toy_dataset(0), 10.0, solver=solver)
    assert "`solver`" in str(info.value) and "pass" in str(info.value)


@pytest.mark.parametrize("kwargs, fix", [
    ({"rtol": 2.0}, "pass e.g. rtol=1e-8"),
    ({"atol": -1.0}, "pass e.g. atol=1e-12"),
    ({"kink_tol": -1}, "pass e.g. kink_tol=1e-3"),
    ({"n_save": 1}, "pass e.g. n_save=100"),
    ({"max_steps": 0}, "pass e.g. max_steps="),
    ({"t1": 1e301}, "pass e.g. t1=1e300"),
])
def test_out_of_range_numbers_name_a_fix(kwargs, fix):
    args = {"t1": 10.0, **kwargs}
    with pytest.raises(ValueError, match="got .*; " + fix):
        simulate(GradientFlow(), ToyLeaky(key=KEY), toy_dataset(0), **args)


@pytest.mark.parametrize("make", [toy_dataset, soudry_dataset,
                                  lambda seed: separable_gaussians(10, 2, seed=seed)])
@pytest.mark.parametrize("seed", [-1, True, 1.5])
def test_data_sets_check_their_seed(make, seed):
    with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0, got .*pass e\.g\."):
        make(seed)


def test_stacked_models_need_batch_true():
    """Three stacked Linear(2) once ran as one model (outputs of shape (1,) per input) and
    reported success; the analysis functions said the model had the wrong p."""
    from marginflow.analysis import normalized_margin

    data = toy_dataset(0)
    models = eqx.filter_vmap(lambda k: Linear(2, key=k))(jax.random.split(KEY, 3))
    for call in (lambda: simulate(GradientFlow(), models, data, 10.0),
                 lambda: run(GD(0.1), models, data, 10),
                 lambda: normalized_margin(models, data, np.zeros((3, 2)))):
        with pytest.raises(ValueError, match=r"shape \(\).*got \(1,\).*needs batch=True"):
            call()


def test_deep_linear_dims_from_numpy_and_a_bare_int():
    """NumPy dims once left out_dim a NumPy int: a JAX static that warned, and kept the
    traced segment out of the disk cache (its key takes Python ints only)."""
    m = DeepLinear(np.array([5, 8, 1]), key=KEY)
    assert type(m.out_dim) is int and all(type(d) is int for d in m.dims)
    with pytest.raises(TypeError, match=r"`dims` must be a sequence.*pass e\.g\."):
        DeepLinear(5, key=KEY)


def test_an_implicit_solver_with_its_own_tolerances_of_any_float_type_is_accepted():
    """The check for a root finder that borrows the controller's tolerances looks for
    diffrax's marker, not for a float type (NumPy float32 tolerances were refused)."""
    import diffrax as dfx
    import optimistix as optx
    from marginflow.flows._plan import _check_solver

    _check_solver(dfx.Kvaerno5(root_finder=optx.Newton(rtol=np.float32(1e-6),
                                                       atol=np.float32(1e-9))))
    with pytest.raises(ValueError, match="root finder's own tolerances"):
        _check_solver(dfx.Kvaerno5())


def test_a_degree_beyond_float64_is_refused_by_name():
    """MLP(2, 4, 11, activation=2) has degree 2^11 - 1 = 2047: 2.0**L raised a bare
    OverflowError inside the homogeneity check."""
    model = MLP(2, 4, 11, activation=2, key=KEY)
    assert model.degree == 2**11 - 1
    with pytest.raises(ValueError, match=r"at most 1023 .*got L = 2047; use fewer layers"):
        simulate(GradientFlow(), model, toy_dataset(0), 1.0)


@pytest.mark.parametrize("gap, error", [(None, TypeError), ("a", TypeError), (True, TypeError),
                                        (-1.0, ValueError), (float("nan"), ValueError)])
def test_separable_gaussians_checks_its_gap(gap, error):
    with pytest.raises(error, match="`gap` must be a"):
        separable_gaussians(4, 2, gap=gap)


def test_cnn_widths_from_numpy_and_a_spec_without_kwargs():
    from marginflow.models import CNN, from_spec

    m = CNN(widths=np.array([1, 2, 3]), out_dim=2, key=KEY)
    assert m.widths == (1, 2, 3) and all(type(v) is int for v in m.widths)
    with pytest.raises(ValueError, match=r"under 'kwargs'.*model\.spec\(\)"):
        from_spec({"class": "Linear"})


@pytest.mark.parametrize("make, name", [
    (lambda v: GD(v), "lr"), (lambda v: RMSProp(0.1, b=v), "b"),
    (lambda v: Adam(0.1, eps=v), "eps"), (lambda v: SGDMomentum(0.1, momentum=v), "momentum"),
])
def test_discrete_hyperparameters_are_scalars(make, name):
    """An array of values was accepted and failed later, inside optax or the scan, with
    messages that did not name the argument."""
    with pytest.raises(ValueError, match=rf"`{name}` must be a scalar, got shape \(2,\); "
                       r"to sweep values call `run` once per value"):
        make(jnp.array([0.5, 0.25]))
