"""The Python examples of the README and of the docs pages run as written (a stale example
is a bug), and the README keeps its shape: the two commands first, at most 120 lines.

Each file's ```python blocks run in order in one namespace (a page's blocks build on each
other). All files run in this one process, so a program compiled for one page (the toy's
RMSProp flow, say) is reused by the next; keep new blocks small and fast (tiny t1, small
models, few compiled configurations).
"""

import glob
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FIRST_COMMAND = "pip install . && marginflow simulate --out out"
TEST_COMMAND = 'pip install ".[test,docs,mnist]" && python -m pytest'


def _doc_files() -> list[str]:
    pages = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    return ["README.md"] + [os.path.relpath(p, ROOT) for p in pages]


def _blocks(path: str) -> list[str]:
    with open(os.path.join(ROOT, path)) as fh:
        return re.findall(r"^```python\n(.*?)^```", fh.read(), flags=re.S | re.M)


def _check_readme(ns):
    from marginflow.analysis import normalized_margin, toy_max_margin

    # the claims written next to the ten-line example: gamma* = 0.1023 (v > 0 branch) and
    # the RMSProp flow's margin at t = 1e6 just below it; h -> eps^{-1/2} = 316.2.
    traj, data, model = ns["traj"], ns["data"], ns["model"]
    gamma = float(normalized_margin(model, data, traj.w[-1]))
    assert abs(toy_max_margin(data).gamma_plus - 0.1023) < 5e-5
    assert 0.99 * 0.1023 < gamma <= 0.1023 + 5e-5
    np.testing.assert_allclose(traj.h()[-1], 1e-5**-0.5, rtol=1e-3)


def _check_getting_started(ns):
    _check_readme(ns)
    assert ns["batch"].w.shape == (8, 200, 3)


def _check_solvers(ns):
    from marginflow.flows import AdaGradFlow, RMSPropFlow, default_solver, late_solver

    # the output printed in the page's comment
    names = [(type(default_solver(f, 3)).__name__, type(late_solver(f, 3)).__name__)
             for f in (AdaGradFlow(1e-5), RMSPropFlow(1e-5, 0.9))]
    assert names == [("Dopri8", "Dopri8"), ("DecayIMEX", "DecayIMEX")]
    assert ns["traj"].result == "successful"
    # the branch point printed in "Where the flow branches": (t, unit 11, sample 53)
    from marginflow.analysis import switching_surfaces

    found = switching_surfaces(ns["adam"], ns["model"], ns["data"]).branch_points()
    # one branch point, at the save printed (saves 1e-3 apart; t read back as a float)
    assert [b[1:] for b in found] == [(11, 53)] and abs(found[0][0] - 0.097) < 1e-9, found


def _check_discrete(ns):
    assert float(ns["matching_flow"](ns["opt"]).b) == pytest.approx(0.5)
    assert (float(ns["rms"].lr), float(ns["rms"].b)) == pytest.approx((0.01, 0.995))
    assert ns["c"].max_distance().shape == (8,)


def _check_theory(ns):
    mfa, traj, model, data = ns["mfa"], ns["traj"], ns["model"], ns["data"]
    assert mfa.angle(traj.w[-1], ns["ref"].direction) < 1e-3
    assert mfa.monotone_quantity(traj, model, data).max_drop <= 1e-8
    np.testing.assert_allclose(mfa.conditioner_limit(traj).h_inf, 1e-5**-0.5, rtol=1e-3)
    assert abs(mfa.rate_fit(traj).loss_exponent - 1) < 0.01


def _check_errors(ns):
    assert ns["partial"].result == "max_steps_reached"
    assert sorted(os.listdir(ns["folder"]))[:2] == ["run.npz", "segment_00000.npz"]


CHECKS = {
    "README.md": _check_readme,
    os.path.join("docs", "getting-started.md"): _check_getting_started,
    os.path.join("docs", "solvers.md"): _check_solvers,
    os.path.join("docs", "discrete.md"): _check_discrete,
    os.path.join("docs", "theory-checks.md"): _check_theory,
    os.path.join("docs", "errors.md"): _check_errors,
}


def test_readme_shape():
    with open(README) as fh:
        text = fh.read()
    lines = text.split("\n")
    assert len(lines) <= 121, f"README.md has {len(lines)} lines; the limit is 120"
    # the two commands come first, before any other command or example
    commands = [line.strip() for line in lines if line.startswith("    ") and line.strip()]
    assert commands[:2] == [FIRST_COMMAND, TEST_COMMAND]
    assert len(_blocks("README.md")) >= 1


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as fh:
        ci = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    assert TEST_COMMAND in ci


def test_every_page_with_examples_is_checked():
    with_blocks = {p for p in _doc_files() if _blocks(p)}
    assert {"README.md", os.path.join("docs", "getting-started.md")} <= with_blocks
    assert set(CHECKS) <= with_blocks


@pytest.mark.parametrize("path", [p for p in _doc_files() if _blocks(p)])
def test_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a block writes lands in a temporary folder
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(_blocks(path)):
        try:
            exec(compile(block, f"{path} python block {i}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{path} python block {i} failed: {err!r}\n{block}")
    if path in CHECKS:
        CHECKS[path](namespace)
