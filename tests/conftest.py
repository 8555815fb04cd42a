"""The test session shares compiled programs across its two workers and the processes it
starts (notebook kernels, the CLI): JAX's persistent compilation cache in one folder, set
here before any test imports marginflow, unless MARGINFLOW_CACHE_DIR is set already.

The folder is .pytest_cache/marginflow-jax in the checkout: the user's own folder (JAX runs
what it loads from the cache), ignored by git, kept between runs, and deleted with
`rm -rf .pytest_cache` for a cold run.
"""

import os
from pathlib import Path

_FOLDER = Path(__file__).resolve().parent.parent / ".pytest_cache" / "marginflow-jax"
os.environ.setdefault("MARGINFLOW_CACHE_DIR", str(_FOLDER))
