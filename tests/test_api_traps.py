"""An API without traps (issue 16): keyword-only optimiser hyper-parameters, analysis
functions that take a Trajectory, result records that print their values, and a CLI whose
flags show their defaults and whose outputs are plain JSON numbers with one file mode.

The runs reuse configurations of other tests (the CLI's toy run of tests/test_cli.py, the
batched toy runs of tests/test_discrete_run.py), so that a full test session compiles
each of them once.
"""

import inspect
import json
import os
import re
import stat

import equinox as eqx
import jax
import numpy as np
import pytest
from marginflow import analysis as mfa
from marginflow.discrete import GD, AdaGrad, Adam, RMSProp, SGDMomentum, compare, run
from marginflow.experiments._cli import build_parser, main
from marginflow.flows import RMSPropFlow, Trajectory, simulate
from marginflow.models import ToyLeaky, soudry_dataset, toy_dataset

OPTIMIZERS = (GD, AdaGrad, RMSProp, Adam, SGDMomentum)
# The CLI's default job at the size tests/test_cli.py runs it.
CLI_ARGS = ["simulate", "--flow", "rmsprop", "--model", "toy", "--t1", "1e4", "--no-progress",
            "--n-save", "40"]


@pytest.fixture(scope="module")
def toy():
    data = toy_dataset(0)
    model = ToyLeaky(key=jax.random.PRNGKey(0))
    # The run `marginflow simulate` makes with CLI_ARGS (same arguments: same compilation).
    traj = simulate(RMSPropFlow(1e-5, 0.9), model, data, 1e4, progress=False, checkpoint=None,
                    rtol=1e-8, n_save=40, loss="exponential")
    assert traj.success
    return model, data, traj


@pytest.fixture(scope="module")
def batched():
    data = toy_dataset(0)
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(keys)
    a = run(RMSProp(0.1, b=0.9, eps=1e-5), models, data, 200, save_every=50, batch=True)
    b = run(Adam(0.1, b2=0.9, eps=1e-5), models, data, 200, save_every=50, batch=True)
    return ToyLeaky(key=jax.random.PRNGKey(0)), data, a, b


# ------------------------------------------------------------ keyword-only optimisers
@pytest.mark.parametrize("cls", OPTIMIZERS)
def test_only_lr_is_positional(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())
    assert [p.name for p in params[:2]] == ["self", "lr"]
    assert params[1].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])
    keywords = [p.name for p in params[2:] if p.name not in ("eps_placement", "convention")]
    with pytest.raises(TypeError, match=r"^" + cls.__name__) as err:
        cls(0.1, 0.5, 0.5)
    # The message names every keyword, so the fix is in it.
    for name in keywords:
        assert f"{name}=" in str(err.value)


def test_optax_style_adam_fails_loudly():
    # optax.adam(1e-3, 0.9, 0.999) means b1 = 0.9, b2 = 0.999; here it used to mean b2 = 0.9,
    # eps = 0.999 in silence.
    with pytest.raises(TypeError, match=r"Adam: only `lr` may be passed by position, got 3"):
        Adam(1e-3, 0.9, 0.999)
    opt = Adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)
    assert opt.hyperparameters() == {"lr": 1e-3, "b2": 0.999, "eps": 1e-8, "b1": 0.9}
    assert RMSProp(lr=0.01, b=0.995, eps=1.0).hyperparameters() == {"lr": 0.01, "b": 0.995,
                                                                    "eps": 1.0}


# ------------------------------------------------------------ analysis on a Trajectory
def test_analysis_takes_a_trajectory_as_its_last_state(toy):
    model, data, traj = toy
    w_end = traj.w[-1]
    np.testing.assert_array_equal(mfa.normalized_margin(model, data, traj),
                                  mfa.normalized_margin(model, data, w_end))
    np.testing.assert_array_equal(mfa.q_min(model, data, traj), mfa.q_min(model, data, w_end))
    a, b = mfa.kkt_residual(model, data, traj), mfa.kkt_residual(model, data, w_end)
    for f in ("residual_best", "eps_paper", "gamma", "lambda_best"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    flow = traj.flow()
    t1 = mfa.lemma3_terms(flow, model, data, traj)
    t2 = mfa.lemma3_terms(flow, model, data, traj.ts[-1], w_end, traj.m[-1])
    np.testing.assert_array_equal(t1.dlog_gamma_tilde, t2.dlog_gamma_tilde)
    np.testing.assert_array_equal(t1.q_min, t2.q_min)
    u = np.array([1.0, 2.0, 3.0])
    assert mfa.angle(traj, u) == mfa.angle(w_end, u)


def test_analysis_on_a_batched_trajectory_gives_one_value_per_member(batched):
    model, data, a, _ = batched
    gamma = mfa.normalized_margin(model, data, a)
    assert gamma.shape == (2,)
    np.testing.assert_array_equal(gamma, mfa.normalized_margin(model, data, a.w[:, -1]))


def test_per_member_weights_of_a_batched_run(batched):
    """A batched run's h_inf^{-1/2} is (B, p); it was refused with a message that told the
    user to pass exactly that."""
    model, data, a, _ = batched
    W = np.array([[1.0, 2.0, 0.5], [3.0, 1.0, 1.0]])
    gamma = mfa.normalized_margin(model, data, a, weights=W)
    kkt = mfa.kkt_residual(model, data, a, weights=W)
    for b in range(2):
        assert gamma[b] == mfa.normalized_margin(model, data, a.w[b, -1], weights=W[b])
        assert kkt.gamma[b] == mfa.kkt_residual(model, data, a.w[b, -1], weights=W[b]).gamma
    # ... and for every save of traj.w, (B, n, p), the same weights per member.
    curve = mfa.normalized_margin(model, data, a.w, weights=W)
    assert curve[:, -1].tolist() == gamma.tolist()
    with pytest.raises(ValueError, match=r"shape \(3,\), the states' shape \(2, 3\)"):
        mfa.normalized_margin(model, data, a, weights=W[:, :2])
    with pytest.raises(ValueError, match=r"finite and > 0 .*got min 0"):
        mfa.normalized_margin(model, data, a, weights=W * [[1.0, 0.0, 1.0]])


def test_analysis_checks_the_trajectory_against_its_inputs(toy):
    model, data, traj = toy
    with pytest.raises(ValueError, match=r"normalized_margin: `data` is not the data set"):
        mfa.normalized_margin(model, toy_dataset(1), traj)
    with pytest.raises(ValueError, match=r"kkt_residual: `loss` is 'logistic' but the "
                       r"trajectory was computed with 'exponential'"):
        mfa.kkt_residual(model, data, traj, loss="logistic")
    with pytest.raises(TypeError, match=r"lemma3_terms: pass either a Trajectory"):
        mfa.lemma3_terms(traj.flow(), model, data, traj, traj.w)
    with pytest.raises(TypeError, match=r"lemma3_terms: `w` and `m` are required"):
        mfa.lemma3_terms(traj.flow(), model, data, traj.ts)
    # The same p = 3 and degree 2 in another function: its margins are other numbers.
    from marginflow.models import DeepLinear
    other = DeepLinear((2, 1, 1), key=jax.random.PRNGKey(0))
    assert other.degree == model.degree and traj.w.shape[-1] == 3
    with pytest.raises(ValueError, match=r"normalized_margin: `model` is not the model the "
                       r"trajectory was computed on.*DeepLinear"):
        mfa.normalized_margin(other, data, traj)


# ------------------------------------------------------------ readable records
def test_record_repr_shows_values():
    lim = mfa.ConditionerLimit(h_inf=np.array([316.227766, 316.227766]), t_end=1e6,
                               decade_starts=np.array([1e5, 1e4, 1e3]),
                               change=np.array([1.23456e-9, np.nan, 2.0]),
                               last_decade_change=1.23456e-9)
    assert repr(lim) == (
        "ConditionerLimit(\n"
        "  h_inf=[316.2, 316.2],\n"
        "  t_end=1e+06,\n"
        "  decade_starts=[1e+05, 1e+04, 1000],\n"
        "  change=[1.235e-09, nan, 2],\n"
        "  last_decade_change=1.235e-09,\n"
        ")"
    )
    fit = mfa.RateFit(loss_exponent=1.00234, norm_exponent=0.5, loss_t_exponent=-1.0,
                      t_min=10.0, t_max=1e6, n_points=9)
    assert repr(fit) == ("RateFit(\n  loss_exponent=1.002,\n  norm_exponent=0.5,\n  "
                         "loss_t_exponent=-1,\n  t_min=10,\n  t_max=1e+06,\n  n_points=9,\n)")
    # Long arrays: dtype[shape] with their range, the last entry of a series, and how many
    # entries are not finite; boolean arrays with their count of True.
    sm = mfa.SurrogateMargin(ts=np.linspace(0.0, 1.0, 100), rho=np.full(100, 2.0),
                             gamma_tilde=np.r_[np.nan, np.linspace(-1.0, 0.5, 99)],
                             g_value=np.zeros((2, 50)), separated=np.arange(100) > 59,
                             i0=60, t0=0.6)
    text = repr(sm)
    assert "ts=f64[100](min 0, max 1, last 1)" in text
    assert "gamma_tilde=f64[100](min -1, max 0.5, last 0.5, 1 non-finite)" in text
    assert "g_value=f64[2,50](min 0, max 0)" in text
    assert "separated=bool[100](40 True)" in text
    assert "i0=60" in text and "t0=0.6" in text


def test_records_from_real_runs_print_no_shapes(toy, batched):
    model, data, traj = toy
    _, data_b, a, b = batched
    records = [
        mfa.kkt_residual(model, data, traj),
        mfa.conditioner_limit(traj),
        compare(a, b, data_b),
        mfa.max_margin_linear(soudry_dataset(0).X, soudry_dataset(0).y),
        mfa.toy_max_margin(data),
        mfa.surrogate_margin(traj, model, data),
        mfa.monotone_quantity(traj, model, data),
        mfa.lemma3_terms(traj.flow(), model, data, traj),
        mfa.rate_fit(traj),
    ]
    for r in records:
        text = repr(r)
        assert "(numpy)" not in text and "(jax)" not in text, text
    kkt = records[0]
    assert f"gamma={float(kkt.gamma):.4g}," in repr(kkt)
    assert f"residual_best={float(kkt.residual_best):.4g}," in repr(kkt)
    h = records[1].h_inf
    assert f"h_inf=[{h[0]:.4g}, {h[1]:.4g}, {h[2]:.4g}]" in repr(records[1])
    c = records[2]
    assert f"max {float(np.max(c.distance)):.4g}" in repr(c)


# ------------------------------------------------------------ the command line
def _norm(text: str) -> str:
    return " ".join(text.split())


def test_every_cli_flag_has_help_and_shows_its_default():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"simulate", "resume", "reproduce"}
    for name, sp in sub.choices.items():
        text = _norm(sp.format_help())
        for action in sp._actions:
            if action.dest == "help":
                continue
            assert action.help, f"marginflow {name} {action.option_strings or action.dest}"
            if not action.option_strings:
                continue  # a positional argument has no default
            if action.required:
                shown = "(required)"
            elif action.default is None:
                shown = "(default: none)"
            else:
                shown = f"(default: {action.default})"
            assert _norm(f"{action.help} {shown}") in text, (name, action.option_strings)
    help_text = _norm(sub.choices["simulate"].format_help())
    assert "--t1 T1 end time of the flow (default: 1e6)" in help_text


def test_cli_runs_once_writes_numbers_and_one_file_mode(tmp_path, capsys, monkeypatch):
    import marginflow.flows

    calls = []
    real = marginflow.flows.simulate

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(marginflow.flows, "simulate", counted)
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        rc = main([*CLI_ARGS, "--out", str(out)])
    finally:
        os.umask(old)
    assert rc == 0
    assert len(calls) == 1  # no second run to time a compiled call
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    traj = Trajectory.load(out / "trajectory.npz")
    for key, value in summary.items():
        if key not in ("result", "meta"):
            assert type(value) in (int, float), (key, value)
    assert summary["log L (final loss)"] == float(traj.log_loss[-1])
    assert summary["solver steps"] == int(np.sum(traj.stats["num_steps"]))
    assert summary["t"] == float(traj.ts[-1])
    assert summary["wall_s"] > 0
    assert summary["result"] == "successful"
    # The table says what the time is, and shows the same number.
    assert re.search(rf"wall time of the run\s+{summary['wall_s']:.2f} s", printed)
    # ... split into making the programs and the integration (one run: the two add up).
    assert 0 <= summary["compile_s"] <= summary["wall_s"]
    assert summary["compile_s"] + summary["integration_s"] == pytest.approx(summary["wall_s"])
    assert re.search(rf"of it compiling .*\s+{summary['compile_s']:.2f} s", printed)
    # trajectory.npz used to be 0600 (tempfile + rename); now every file gets 0o666 & ~umask.
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {"trajectory.npz": 0o640, "trajectory.png": 0o640, "summary.json": 0o640}


def test_flows_optimisers_and_trajectories_show_values():
    """equinox prints array fields as shapes (f64[]); the flows, optimisers and
    Trajectory print their values (the record repr of marginflow._records)."""
    from marginflow.flows import AdamFlow, MomentumFlow, RMSPropFlow

    assert repr(RMSPropFlow(1e-5, 0.9)) == "RMSPropFlow(eps_placement='inside', eps=1e-05, b=0.9)"
    assert "b1=0.5" in repr(AdamFlow(1e-5, 0.9, b1=0.5)) and "b1=0.9" in repr(MomentumFlow(0.9))
    assert repr(SGDMomentum(0.1, momentum=0.9)) == (
        "SGDMomentum(lr=0.1, eps_placement='inside', momentum=0.9)")
    assert "b2=0.999, eps=1e-08" in repr(Adam(1e-3, b2=0.999, eps=1e-8))
    data, model = toy_dataset(0), ToyLeaky(key=jax.random.PRNGKey(0))
    traj = run(GD(0.001), model, data, 20, save_every=10)
    text = repr(traj)
    # Short series in full (3 saves), longer arrays by their range; the numbers are there.
    assert f"{traj.log_loss[-1]:.4g}]" in text and "result='successful'" in text
    assert f"w=f64[3,3](min {traj.w.min():.4g}, max {traj.w.max():.4g})" in text


def test_experiment_json_is_strict_with_null_for_non_finite(tmp_path):
    """An experiment's NAME.json (and the docs' generated tables read from it) holds numbers
    as numbers and a NaN or infinity as null: strict JSON, the rule of summary.json. Before,
    a crossover time that never came was written as the string "nan"."""
    from marginflow.experiments._results import Claim, ExperimentResult

    result = ExperimentResult(
        name="strict", quick=True, settings={"t1": 1e30, "eps": np.float64(1e-5)},
        numbers={"crossover": float("nan"), "slope": np.float32(-1.0),
                 "never": [1.0, np.inf, -np.inf], "count": np.int64(3)},
        claims=[Claim("c", "p", "measured nan", None)], data={"x": np.arange(3.0)})
    result.save(tmp_path)
    text = (tmp_path / "strict.json").read_text()

    def refuse(constant):
        raise AssertionError(f"non-JSON number {constant} in strict.json")

    summary = json.loads(text, parse_constant=refuse)
    assert summary["numbers"] == {"crossover": None, "slope": -1.0,
                                  "never": [1.0, None, None], "count": 3}
    assert summary["settings"] == {"t1": 1e30, "eps": 1e-5}
    assert summary["claims"][0]["measured"] == "measured nan"  # text stays text


def test_experiments_leave_the_matplotlib_backend_alone():
    """The experiments' plotting helper used to force the "Agg" backend, which switched off
    a notebook's inline figures for the rest of the process."""
    import matplotlib
    from marginflow.experiments._common import pyplot

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        pyplot()
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
