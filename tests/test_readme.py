"""The README's Python examples run as written (a stale example is a bug)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks():
    with open(README) as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), flags=re.S)


def test_readme_has_examples():
    assert len(_blocks()) >= 4


def test_readme_examples_run():
    from marginflow.analysis import normalized_margin, toy_max_margin

    namespace: dict = {}
    for i, block in enumerate(_blocks()):
        try:
            exec(compile(block, f"README.md python block {i}", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the failure message is the point
            pytest.fail(f"README python block {i} failed: {err!r}\n{block}")
        if i == 0:
            # the claims written next to the first example: gamma* = 0.1023 (v > 0 branch)
            # and the RMSProp flow's margin at t = 1e6 just below it.
            traj, data, model = namespace["traj"], namespace["data"], namespace["model"]
            gamma = float(normalized_margin(model, data, traj.w[-1]))
            assert abs(toy_max_margin(data).gamma_plus - 0.1023) < 5e-5
            assert 0.99 * 0.1023 < gamma <= 0.1023 + 5e-5
        if i == 1:
            assert namespace["batch"].w.shape == (100, 200, 3)
