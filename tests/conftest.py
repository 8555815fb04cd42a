"""The test session shares compiled programs across its two workers and the processes it
starts (notebook kernels, the CLI): JAX's persistent compilation cache in one folder, set
here before any test imports marginflow, unless MARGINFLOW_CACHE_DIR is set already.

The folder is .pytest_cache/marginflow-jax in the checkout: the user's own folder (JAX runs
what it loads from the cache), ignored by git, kept between runs, and deleted with
`rm -rf .pytest_cache` for a cold run.
"""

import gc
import os
from pathlib import Path

_FOLDER = Path(__file__).resolve().parent.parent / ".pytest_cache" / "marginflow-jax"
os.environ.setdefault("MARGINFLOW_CACHE_DIR", str(_FOLDER))


# The two workers take whole files (`--dist loadfile`), and a worker that finishes early
# idles while the other runs its last file. xdist would order the files by their number of
# tests, which put the notebooks (8 tests, a fifth of the suite's time) near the end: one
# run took 11:49 at 1.5 busy cores. So the files go out longest first (their measured
# seconds on 2 cores, `--durations=0`), and the tail is made of short files.
_SECONDS = {  # every file of 5 s or more; the shorter ones (0 here) make the tail
    "test_notebooks.py": 138, "test_experiments.py": 86, "test_bank.py": 80,
    "test_momentum.py": 54, "test_kinks.py": 54, "test_sde_adaptive.py": 51,
    "test_long_horizon.py": 50, "test_discrete_run.py": 43, "test_sde.py": 32,
    "test_models.py": 31, "test_lemmas.py": 28, "test_compile.py": 27, "test_early_phase.py": 26,
    "test_loss_numerics.py": 25, "test_discrete_dictionary.py": 24, "test_sharding.py": 23,
    "test_cli.py": 22, "test_reliability.py": 21, "test_readme.py": 20, "test_checkpoint.py": 18,
    "test_simulate.py": 17, "test_precision.py": 16, "test_run_integrity.py": 10,
    "test_entry_checks.py": 10, "test_fuzz.py": 9, "test_analysis_trajectories.py": 7,
    "test_discrete_rules.py": 7, "test_figures.py": 7, "test_docs.py": 6,
    "test_penalty_walk.py": 6, "test_separability.py": 5, "test_analysis_kkt.py": 5,
}


# Python's collector walks every object of the worker on each full pass, and a worker that
# has imported JAX and traced programs holds about a million: 1.25-1.5 s of collections in
# 20 s of tests (test_flows, test_discrete_run and test_lemmas in one process), 0.3 s with
# the youngest generation collected every 10,000 allocations instead of 700, as the
# `marginflow` command does (experiments/_cli.py: entry).
gc.set_threshold(10_000, 10, 10)


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -_SECONDS.get(item.path.name, 0))  # stable: files stay whole
