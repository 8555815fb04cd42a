"""simulate and Trajectory: accuracy, the theory on the toy data, persistence, batches (issue 2)."""

import os
import subprocess
import sys

import equinox as eqx
import jax
import marginflow  # noqa: F401
import numpy as np
import pytest
from marginflow.flows import (
    AdaGradFlow,
    AdamFlow,
    GradientFlow,
    RMSPropFlow,
    Trajectory,
    simulate,
)
from marginflow.models import Linear, Objective, ToyLeaky, flatten, toy_dataset

EPS, B = 1e-5, 0.9
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy():
    return toy_dataset(0)


@pytest.fixture(scope="module")
def toy_model():
    return ToyLeaky(key=jax.random.PRNGKey(1))


@pytest.fixture(scope="module")
def runs(toy, toy_model):
    """The four flows on the paper's toy data to t = 1e6 (one compile per flow type)."""
    flows = {
        "gd": GradientFlow(),
        "adagrad": AdaGradFlow(EPS),
        "rmsprop": RMSPropFlow(EPS, B),
        "adam": AdamFlow(EPS, B),
    }
    return {k: simulate(f, toy_model, toy, 1e6) for k, f in flows.items()}


def exact_toy_gamma(data, branch):
    """gamma* of the toy model by a brute-force angle scan (docs/math.md section 6).

    v > 0: 1/2 max_u min(min_{y=+1} <u,x>, min_{y=-1} -<u,x>/2);
    v < 0: 1/2 max_u min(min_{y=-1} -<u,x>, min_{y=+1} <u,x>/2).
    Written independently of marginflow.analysis: a 1e5-angle scan refined once.
    """
    X, y = np.asarray(data.X), np.asarray(data.y)
    pos, neg = X[y > 0], X[y < 0]

    def value(th):
        U = np.stack([np.cos(th), np.sin(th)], 1)
        P, N = U @ pos.T, U @ neg.T
        if branch > 0:
            return 0.5 * np.minimum(P.min(1), (-N / 2).min(1))
        return 0.5 * np.minimum((-N).min(1), (P / 2).min(1))

    th = np.linspace(0, 2 * np.pi, 100_001)
    best = th[np.argmax(value(th))]
    fine = np.linspace(best - 1e-4, best + 1e-4, 100_001)  # a concave max: 2e-9 rad grid
    return float(value(fine).max())


def test_rmsprop_and_adam_conditioner_converges(runs):
    # Theorem 5: h -> eps^{-1/2}; by t = 1e6 within 1e-3 relative (issue 2).
    for name in ("rmsprop", "adam"):
        traj = runs[name]
        assert traj.success
        h_end = traj.h()[-1]
        np.testing.assert_allclose(h_end, EPS**-0.5, rtol=1e-3)


def test_adagrad_conditioner_non_increasing(runs):
    # Theorem 4: dh/dt = -1/2 h^3 g^2 <= 0. Saved values may only tie (rounding) or fall.
    h = runs["adagrad"].h()
    assert np.all(np.diff(h, axis=0) <= 1e-12 * h[:-1])
    assert np.all(h[-1] > 0)


def test_loss_decreases_and_norm_grows(runs):
    for name, traj in runs.items():
        # dL/dt = -<g, h g> <= 0 for every flow: non-increasing up to solver tolerance.
        assert np.all(np.diff(traj.log_loss) <= 1e-7), name
        assert traj.log_loss[-1] < -10, name  # L(1e6) < e^{-10}: towards 0
        norms = np.linalg.norm(traj.w, axis=1)
        assert norms[-1] > 2 * norms[0], name
        late = norms[traj.ts > 1e2]
        assert np.all(np.diff(late) > 0), name


def test_rmsprop_margin_close_to_exact_gamma(runs, toy, toy_model):
    traj = runs["rmsprop"]
    w_end = traj.w[-1]
    obj = Objective(toy_model, toy)
    q_min = float(np.min(obj.margins(w_end)))
    gamma = q_min / np.linalg.norm(w_end) ** 2
    v_sign = np.sign(traj.model_at(len(traj) - 1).v)
    gamma_star = exact_toy_gamma(toy, v_sign)
    # Theorem 6 + docs/math.md section 6: the margin approaches gamma* of the branch of sign(v)
    # from below, slowly (1e-2..4e-2 relative at 1e5); the issue asks 1% below at t = 1e6.
    assert gamma <= gamma_star * (1 + 1e-9)
    assert gamma >= 0.99 * gamma_star


def test_integration_accuracy_against_tight_run(toy, toy_model):
    flow = RMSPropFlow(EPS, B)
    ts = np.geomspace(1e-2, 1e2, 30)
    # The default tolerances (rtol 1e-8, atol 1e-12: the program `runs` compiled), against
    # a run 1000 times tighter.
    loose = simulate(flow, toy_model, toy, 1e2, ts=ts)
    tight = simulate(flow, toy_model, toy, 1e2, ts=ts, rtol=1e-11, atol=1e-15)
    err = np.max(np.abs(loose.w - tight.w) / (1e-12 / 1e-8 + np.abs(tight.w)))
    # Global error of an adaptive method is a modest multiple of the local tolerance; we
    # measured 1.1e-7 (11 rtol) here and allow 100 rtol so solver changes do not flake.
    assert err < 100 * 1e-8


def test_save_load_roundtrip_and_model_at(tmp_path, runs, toy, toy_model):
    traj = runs["adam"]
    path = tmp_path / "traj.npz"
    traj.save(path)
    back = Trajectory.load(path)
    for field in ("ts", "w", "m", "conditioner", "log_loss", "I"):
        np.testing.assert_array_equal(getattr(back, field), getattr(traj, field))
    assert back.meta == traj.meta and back.result == traj.result
    model = back.model_at(len(back) - 1)
    np.testing.assert_array_equal(Objective(model, toy).w0(), traj.w[-1])
    assert back.flow().name == "adam"
    # no pickle: the file opens with allow_pickle=False
    with np.load(path, allow_pickle=False) as f:
        assert "header" in f.files
    assert sorted(os.listdir(tmp_path)) == ["traj.npz"]  # no temporary file left


def test_batch_equals_individual_runs(toy):
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    models = eqx.filter_vmap(lambda k: Linear(2, key=k))(keys)
    flow = RMSPropFlow(1e-3, 0.9)
    batch = simulate(flow, models, toy, 1e3, batch=True, n_save=20)
    assert batch.w.shape[:2] == (3, 20)
    for i, k in enumerate(keys):
        single = simulate(flow, Linear(2, key=k), toy, 1e3, n_save=20)
        # vmapped adaptive solves take the union of steps, so they differ at tolerance level.
        np.testing.assert_allclose(batch.w[i], single.w, rtol=1e-6, atol=1e-8)
        # member(i): the member's arrays and statistics; the segment ends are shared.
        one = batch.member(i)
        np.testing.assert_array_equal(one.w, batch.w[i])
        assert one.stats["num_steps"] == batch.stats["num_steps"][i]
        assert sum(one.stats["num_steps_per_segment"]) == one.stats["num_steps"]
        assert one.stats["segment_ends"] == batch.stats["segment_ends"] == (1.0, 10.0, 100.0, 1e3)
        np.testing.assert_array_equal(flatten(batch.model_at(-1, b=i)), batch.w[i, -1])
    # Indices out of range name the rule, the count and a fix (were bare IndexErrors).
    for call, needle in ((lambda: batch.member(3), "`b` must be an integer in \\[-3, 3\\)"),
                         (lambda: batch.model_at(20, b=0), "`i` must be .* \\[-20, 20\\)"),
                         (lambda: batch.model_at(0, b=5), "3 members"),
                         (lambda: batch.member(True), "got True")):
        with pytest.raises(IndexError, match=needle):
            call()
    with pytest.raises(ValueError, match="pass the member"):
        batch.model_at(3)


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_state_variable_v_and_its_derivative(degree):
    # simulate integrates v = w ||w||^(L-1): check the map, its inverse and dv against
    # JAX's own derivative of the map, on a batch of 4 rows and on one row.
    import jax.numpy as jnp
    from marginflow.flows._fields import _dv, _v_of_w, _w_of_v

    rng = np.random.default_rng(degree)
    w = jnp.asarray(rng.normal(size=(4, 5)))
    v = _v_of_w(w, degree)
    norms = np.linalg.norm(np.asarray(w), axis=-1)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(v), axis=-1), norms**degree, rtol=1e-14)
    np.testing.assert_allclose(_w_of_v(v, degree), w, rtol=1e-14)
    dw = jnp.asarray(rng.normal(size=5))
    _, expected = jax.jvp(lambda x: _v_of_w(x, degree), (w[0],), (dw,))
    np.testing.assert_allclose(_dv(w[0], dw, degree), expected, rtol=1e-13)
    # At w = 0 the maps and their Jacobians stay finite (an implicit solver may take one).
    zero = jnp.zeros(5)
    for fn in (_v_of_w, _w_of_v):
        assert np.all(np.isfinite(jax.jacfwd(lambda x, fn=fn: fn(x, degree))(zero)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"t1": 1.0, "t0": 2.0}, r"`t1` must be greater than `t0`, got t0 = 2.0, t1 = 1.0"),
        ({"t1": 0.0}, r"`t1` must be greater than `t0`"),
        ({"t1": float("nan")}, r"`t1` must be finite"),
        ({"t1": 10.0, "ts": [0.0, 20.0]}, r"save times `ts` must lie in \[t0, t1\]"),
        ({"t1": 10.0, "ts": [0.0, 5.0, 3.0]}, "strictly increasing"),
        ({"t1": 10.0, "rtol": 0.0}, r"`rtol` must be in \(0, 1\)"),
        ({"t1": 10.0, "n_save": 1}, r"`n_save` must be an integer >= 2"),
    ],
)
def test_simulate_validation(kwargs, match, toy, toy_model):
    with pytest.raises(ValueError, match=match):
        simulate(RMSPropFlow(), toy_model, toy, **kwargs)


def test_simulate_rejects_bad_models_and_params(toy):
    k = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="input dimension of the data"):
        simulate(GradientFlow(), Linear(3, key=k), toy, 1.0)
    bad = eqx.tree_at(lambda m: m.weight, Linear(2, key=k), np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="initial parameters must be finite"):
        simulate(GradientFlow(), bad, toy, 1.0)
    with pytest.raises(TypeError, match="`flow` must be a marginflow flow"):
        simulate("rmsprop", Linear(2, key=k), toy, 1.0)


def test_regular_install_imports_outside_repo(tmp_path):
    """A non-editable install into a fresh venv imports from a directory outside the repo.

    Dependencies come from the running environment through a .pth file (no download);
    marginflow itself is built as a wheel and installed into the fresh venv, and the test
    checks that the import resolves there, not to the source tree.
    """
    import site
    import sysconfig

    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), REPO],
        check=True, capture_output=True,
    )
    (wheel,) = wheel_dir.glob("marginflow-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]]
    with open(os.path.join(purelib, "_deps.pth"), "w") as fh:
        fh.write("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", purelib,
         str(wheel)],
        check=True, capture_output=True,
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    out = subprocess.run(
        [str(py), "-c",
         "import marginflow.flows, marginflow.models, marginflow;"
         "print(marginflow.__file__); print(marginflow.flows.simulate.__module__)"],
        cwd=outside, check=True, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).stdout.split()
    assert out[0].startswith(purelib), out
    assert out[1] == "marginflow.flows._simulate"
