"""Fuzzing the entry points with malformed input: only documented exceptions (issue 7).

Documented: ValueError and TypeError for bad input (messages name rule, value and fix),
SimulationError for an integration that stops early. Never a raw JAX or diffrax error.
"""

import math

import jax
import marginflow  # noqa: F401
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from marginflow.experiments._cli import main
from marginflow.flows import AdaGradFlow, AdamFlow, RMSPropFlow, SimulationError, simulate
from marginflow.models import Dataset, Linear, ToyLeaky

DOCUMENTED = (ValueError, TypeError, SimulationError)
COUNT = {"inputs": 0}

weird_floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -1.0, 1.0, 1e-300, 1e300, 2.0, 0.999999]),
)
weird_values = st.one_of(weird_floats, st.none(), st.text(max_size=3), st.integers(-5, 5),
                         st.lists(st.floats(-1, 1), max_size=3))


def _call(fn, *args, **kwargs):
    COUNT["inputs"] += 1
    try:
        fn(*args, **kwargs)
    except DOCUMENTED as err:
        assert str(err), "an error without a message"
        return err
    return None


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(eps=weird_values, b=weird_values, which=st.sampled_from(["rmsprop", "adam", "adagrad"]))
def test_flow_constructors(eps, b, which):
    build = {
        "rmsprop": lambda: RMSPropFlow(eps, b),
        "adam": lambda: AdamFlow(eps, b),
        "adagrad": lambda: AdaGradFlow(eps),
    }[which]
    _call(build)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    X=st.one_of(
        st.lists(st.lists(weird_floats, min_size=1, max_size=3), min_size=0, max_size=4),
        weird_values,
    ),
    y=st.one_of(st.lists(weird_values, max_size=4), weird_values,
                st.lists(st.integers(-3, 3), max_size=4)),
)
def test_dataset_constructor(X, y):
    def build():
        try:
            Xa, ya = np.asarray(X), np.asarray(y)
        except ValueError:  # ragged lists: numpy's own input error, before marginflow
            raise ValueError("ragged") from None
        Dataset(Xa, ya)

    _call(build)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    t1=weird_floats,
    t0=weird_floats,
    rtol=weird_floats,
    n_save=st.one_of(st.integers(-3, 4), st.floats(-1, 3)),
    ts=st.one_of(st.none(), st.lists(weird_floats, max_size=4)),
)
def test_simulate_arguments(t1, t0, rtol, n_save, ts):
    data = Dataset(np.array([[1.0, 0.5], [-1.0, -0.2]]), np.array([1.0, -1.0]))
    model = Linear(2, key=jax.random.PRNGKey(0))
    valid = (
        math.isfinite(t1) and math.isfinite(t0) and 0 <= t0 < t1 <= 10
        and 0 < rtol < 1 and rtol >= 1e-10
    )
    if valid and ts is None and isinstance(n_save, int) and n_save >= 2:
        return  # a valid call: not this test's subject (and it would integrate)
    _call(simulate, RMSPropFlow(), model, data, t1, t0=t0, rtol=rtol, n_save=n_save, ts=ts,
          max_steps=200)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    scale=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.sampled_from(["data", "params"]),
)
def test_simulate_non_finite_inputs(scale, where):
    import equinox as eqx

    X = np.array([[1.0, 0.5], [-1.0, -0.2]])
    model = ToyLeaky(key=jax.random.PRNGKey(0))
    if where == "data":
        X = X.copy()
        X[0, 1] = scale
        err = _call(lambda: simulate(RMSPropFlow(), model, Dataset(X, np.array([1.0, -1.0])),
                                     1.0))
    else:
        bad = eqx.tree_at(lambda m: m.v, model, np.asarray(scale))
        data = Dataset(X, np.array([1.0, -1.0]))
        err = _call(lambda: simulate(RMSPropFlow(), bad, data, 1.0))
    assert isinstance(err, ValueError) and "finite" in str(err)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    argv=st.lists(
        st.sampled_from(["--flow", "--model", "--data", "--t1", "--eps", "--b", "--seed",
                         "--rtol", "--n-save", "nonsense", "1e400", "-1", "nan", "sgd", "0",
                         "2", "toy", "mlp"]),
        min_size=1, max_size=6,
    )
)
def test_cli_never_tracebacks(tmp_path_factory, argv, capsys):
    # Only malformed command lines: a valid one would run a simulation.
    # the trailing --t1 nan wins over any --t1 in argv (argparse keeps the last one).
    argv = ["simulate", "--out", str(tmp_path_factory.mktemp("cli")), "--no-progress",
            *argv, "--t1", "nan"]
    COUNT["inputs"] += 1
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse's usage errors exit with code 2
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    lr=weird_values,
    b=weird_values,
    eps=weird_values,
    which=st.sampled_from(["gd", "adagrad", "rmsprop", "adam", "momentum"]),
    steps=st.one_of(st.integers(-3, 0), weird_floats, st.none()),
    save_every=st.one_of(st.integers(-2, 0), st.text(max_size=2)),
    batch_size=st.one_of(st.none(), st.integers(-2, 100)),
)
def test_discrete_run_arguments(lr, b, eps, which, steps, save_every, batch_size):
    from marginflow.discrete import GD, AdaGrad, Adam, RMSProp, SGDMomentum, run

    data = Dataset(np.array([[1.0, 0.5], [-1.0, -0.2]]), np.array([1.0, -1.0]))
    model = Linear(2, key=jax.random.PRNGKey(0))

    def call():
        opt = {
            "gd": lambda: GD(lr),
            "adagrad": lambda: AdaGrad(lr, eps=eps),
            "rmsprop": lambda: RMSProp(lr, b=b, eps=eps),
            "adam": lambda: Adam(lr, b2=b, eps=eps),
            "momentum": lambda: SGDMomentum(lr, momentum=b),
        }[which]()
        # steps and save_every are always malformed here: run must refuse them cleanly.
        run(opt, model, data, steps, save_every=save_every, batch_size=batch_size)

    err = _call(call)
    assert err is not None
