"""marginflow: continuous flows of adaptive optimisers on homogeneous networks.

Sub-packages: `marginflow.models`, `marginflow.flows`, `marginflow.discrete`,
`marginflow.analysis`, `marginflow.experiments`. Importing marginflow switches JAX to
float64 (`jax_enable_x64`): every check of the theory is done in double precision, and
float32 runs are asked for explicitly (`simulate(..., dtype=jnp.float32)`). This changes
the configuration of the whole process, deliberately: float64 must be on before the first
array is made (a model or data set built earlier would be float32 and round the run's
inputs), and a library whose purpose is float64 checks should not depend on the user
remembering a call. It is documented (docs/errors.md, "What importing marginflow
changes") and can be declined: with MARGINFLOW_X64=0 in the environment the import leaves
`jax_enable_x64` alone, and `simulate` / `run` with dtype=float64 then refuse to start
with a message saying how to turn float64 on, instead of computing in float32.

On a CPU with AVX-512, importing marginflow before JAX's first computation also asks XLA
for 512-bit vectors (`--xla_cpu_prefer_vector_width=512`; XLA's default is 256): float64
exp, the bulk of a loss evaluation, runs 1.7-1.9x faster and the toy sweep's steps 1.2x
(docs/changelog.md, 2026-11-28). The flag is added to os.environ["XLA_FLAGS"], so subprocesses
inherit it. Nothing is changed if XLA_FLAGS already sets that option, if JAX's backend is
already running (a computation before `import marginflow`), with a jaxlib outside the
versions it was verified with (0.10.x from 0.10.2: XLA aborts on a flag it does not know),
or with MARGINFLOW_XLA_DEFAULTS=0 in the environment.
"""

import os as _os

import jax as _jax

if _os.environ.get("MARGINFLOW_X64", "1").strip().lower() not in ("0", "false", "no", "off"):
    _jax.config.update("jax_enable_x64", True)

__version__ = "0.1.0"

from ._cache import cache_dir as cache_dir  # noqa: E402
from ._cache import use_cache as use_cache  # noqa: E402
from ._checkpoint import CheckpointFolder as CheckpointFolder  # noqa: E402
from ._trajectory import SimulationError as SimulationError  # noqa: E402
from ._trajectory import Trajectory as Trajectory  # noqa: E402


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:  # not Linux: leave XLA's default
        pass
    return False


def _xla_option_ours(option: str) -> bool:
    """Whether marginflow may choose the XLA option `option` (the vector width here, the
    segment's code generator in flows/_kernels.py): not if XLA_FLAGS names it already, not
    with MARGINFLOW_XLA_DEFAULTS=0, and not with a jaxlib outside the versions the choices
    were verified with (0.10.x from 0.10.2: XLA aborts on a flag it does not know)."""
    if (_os.environ.get("MARGINFLOW_XLA_DEFAULTS", "1") == "0"
            or option in _os.environ.get("XLA_FLAGS", "")):
        return False
    import jaxlib

    try:
        version = tuple(int(v) for v in jaxlib.__version__.split(".")[:3])
    except ValueError:
        return False
    return (0, 10, 2) <= version < (0, 11, 0)


def _xla_defaults() -> None:
    if not _xla_option_ours("prefer_vector_width"):
        return
    from jax._src import xla_bridge

    if getattr(xla_bridge, "_backends", None):  # too late: the flags were read already
        return
    if _has_avx512():
        flags = _os.environ.get("XLA_FLAGS", "")
        _os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_prefer_vector_width=512").strip()


_xla_defaults()
