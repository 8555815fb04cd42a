"""Every PNG the package writes (issue 16): labelled axes, a legend wherever there is more
than one line, the theory's reference lines, at least 150 dpi, and no 3-D axes.

The experiments run in the quick configurations of tests/test_experiments.py and the CLI
in that of tests/test_cli.py: in a full test session (one process) their computations are
compiled already, and these checks cost about 20 seconds.
"""

import jax
import matplotlib
import numpy as np
import pytest
from marginflow.analysis import toy_max_margin
from marginflow.experiments._cli import main
from marginflow.experiments._cli_figure import (
    conditioner_limit_value,
    reference_margin,
    trajectory_figure,
)
from marginflow.experiments._crossover import crossover
from marginflow.experiments._fig2 import fig2
from marginflow.experiments._qian import qian
from marginflow.experiments._results import DPI
from marginflow.experiments._soudry import soudry
from marginflow.flows import Trajectory
from marginflow.models import ToyLeaky, soudry_dataset, toy_dataset
from PIL import Image

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

EXPERIMENTS = {
    "fig2": lambda: fig2(quick=True, n_init=4),
    "soudry": lambda: soudry(quick=True),
    "qian": lambda: qian(quick=True),
    "crossover": lambda: crossover(quick=True),
}


def check_figure(fig, where: str) -> None:
    """Both axes labelled on every panel with data; a legend covering every labelled line
    wherever a panel has more than one line; no 3-D axes."""
    for ax in fig.axes:
        if not ax.has_data():
            continue
        what = f"{where}: panel {ax.get_title()!r}"
        assert ax.name != "3d", what
        assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), what
        lines = ax.get_lines()
        if len(lines) > 1:
            legends = [lg for lg in [ax.get_legend(), *fig.legends] if lg is not None]
            assert legends, what
            shown = {t.get_text() for lg in legends for t in lg.get_texts()}
            labelled = {ln.get_label() for ln in lines if not ln.get_label().startswith("_")}
            assert labelled and labelled <= shown, what


def check_png(path, figsize) -> None:
    """At DPI (150) dots per inch: the PNG's own resolution and its size in pixels."""
    with Image.open(path) as im:
        dpi, size = im.info["dpi"], im.size
    # PNG stores pixels per metre as an integer: 150 dpi reads back as 149.9994.
    assert DPI >= 150 and min(dpi) > DPI - 0.01, (path, dpi)
    assert size == (round(figsize[0] * DPI), round(figsize[1] * DPI)), (path, size)


def lines_labelled(ax, prefix: str):
    return [ln for ln in ax.get_lines() if ln.get_label().startswith(prefix)]


def loglog_slope(line) -> float:
    x, y = (np.asarray(v, np.float64) for v in line.get_data())
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def check_saved(result, tmp_path) -> dict:
    figs = result.figures()
    sizes = {name: tuple(fig.get_size_inches()) for name, fig in figs.items()}
    for name, fig in figs.items():
        check_figure(fig, f"{result.name}_{name}")
    paths = [p for p in result.save(tmp_path) if p.endswith(".png")]
    assert sorted(paths) == sorted(str(tmp_path / f"{result.name}_{n}.png") for n in figs)
    for name in figs:
        check_png(tmp_path / f"{result.name}_{name}.png", sizes[name])
    return figs


# fig2's figure checks (22 s: its own quick run) are -m slow; the default run still saves
# and opens its PNG in test_experiments.py::test_fig2_saves.
@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.slow) if name == "fig2" else name
    for name in EXPERIMENTS
])
def experiment(request):
    return EXPERIMENTS[request.param]()


def test_experiment_figures(experiment, tmp_path):
    figs = check_saved(experiment, tmp_path)
    try:
        if experiment.name == "fig2":
            d = experiment.data
            # Margin panels: gamma* of both branches of the toy model.
            for ax in figs["margins"].axes[:2]:
                for key, prefix in (("gamma_plus", "gamma*_+"), ("gamma_minus", "gamma*_-")):
                    (line,) = lines_labelled(ax, prefix)
                    np.testing.assert_array_equal(line.get_ydata(), float(d[key]))
            # Directions: 2-D, the isotropic direction (Theorem 5) at the origin, and each
            # run at distance sin(angle to it) from there.
            for ax, name in zip(figs["directions"].axes, ("AdaGrad", "RMSProp", "Adam"),
                                strict=True):
                (ref,) = lines_labelled(ax, "(1,1,1)/sqrt3")
                assert tuple(ref.get_xydata()[0]) == (0.0, 0.0)
                for kind in ("flow", "discrete"):
                    (runs,) = lines_labelled(ax, f"{kind} runs")
                    r = np.linalg.norm(runs.get_xydata(), axis=1)
                    angle = np.radians(d[f"{kind}_{name}_angle_deg"])
                    np.testing.assert_allclose(r, np.sin(angle), rtol=1e-9, atol=1e-12)
        if experiment.name == "soudry":
            loss = figs["rates"].axes[2]
            (guide,) = lines_labelled(loss, "slope -1")
            assert abs(loglog_slope(guide) + 1.0) < 1e-12
            gamma_star = float(experiment.data["gamma_star"])
            assert f"gamma* = {gamma_star:.4g}" in figs["rates"].axes[1].get_title()
    finally:
        for fig in figs.values():
            plt.close(fig)


# The MNIST figures (fig1, fig4, fig5) are checked by check_saved in
# tests/test_experiments.py::test_mnist_figures_quick, on the runs it makes anyway.


def test_cli_figure(tmp_path, capsys):
    out = tmp_path / "run"
    # The run of tests/test_cli.py.
    assert main(["simulate", "--flow", "rmsprop", "--model", "toy", "--t1", "1e4", "--out",
                 str(out), "--no-progress", "--n-save", "40"]) == 0
    capsys.readouterr()
    traj = Trajectory.load(out / "trajectory.npz")
    data = toy_dataset(0)
    fig = trajectory_figure(traj, ToyLeaky(key=jax.random.PRNGKey(0)), data)
    try:
        check_figure(fig, "trajectory.png")
        check_png(out / "trajectory.png", tuple(fig.get_size_inches()))
        loss, margin, cond = fig.axes
        # log10 L against log t: the guide has slope -1 and ends at the last save.
        (guide,) = lines_labelled(loss, "slope -1")
        x, y = guide.get_data()
        assert abs(np.polyfit(np.log10(x), y, 1)[0] + 1.0) < 1e-12
        assert y[-1] == traj.log_loss[-1] / np.log(10)
        # gamma* of the branch the run ended on (toy_max_margin), and Theorem 5's
        # limit eps^{-1/2} of the RMSProp conditioner (eps = 1e-5, the CLI default).
        (g,) = lines_labelled(margin, "gamma*")
        np.testing.assert_array_equal(g.get_ydata(),
                                      toy_max_margin(data).gamma_for(traj.w[-1]))
        (h,) = lines_labelled(cond, "eps^-1/2")
        np.testing.assert_array_equal(h.get_ydata(), 1e-5**-0.5)
    finally:
        plt.close(fig)


def _meta_only(**meta):
    """A one-save Trajectory that carries only `meta` (what the reference helpers read)."""
    z = np.zeros((1, 2))
    return Trajectory(ts=np.ones(1), w=z + 1.0, m=z, conditioner=z + 1.0, log_loss=np.zeros(1),
                      I=np.zeros(1), stats={}, result="successful", message="", meta=meta)


def test_reference_values_of_the_cli_figure():
    # Linear model: gamma* is the SVM margin, sqrt 2 on Soudry's data (its docstring).
    ref = reference_margin(_meta_only(model={"class": "Linear"}), soudry_dataset(0))
    assert abs(ref[0] - np.sqrt(2.0)) < 1e-12
    # No exact reference for other models: no line rather than a wrong one.
    assert reference_margin(_meta_only(model={"class": "MLP"}), soudry_dataset(0)) is None
    # Theorem 5: h -> eps^{-1/2} (eps inside the root) or 1/eps (outside) for RMSProp and
    # Adam; AdaGrad's limit depends on the run and GD has h = 1: no line.
    for flow, conditioner, value in (("rmsprop", "eps_inside", 1e-4**-0.5),
                                     ("adam", "eps_outside", 1e4)):
        got = conditioner_limit_value(_meta_only(flow=flow, conditioner=conditioner,
                                                 hyper={"eps": 1e-4}))
        assert got[0] == value
    for flow in ("adagrad", "gd"):
        assert conditioner_limit_value(_meta_only(flow=flow, eps_placement="inside",
                                                  hyper={"eps": 1e-4})) is None
