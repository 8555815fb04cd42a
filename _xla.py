"""The XLA options marginflow chooses on CPU, and when the choice is yours instead.

Two defaults are set for the whole process at `import marginflow`, before JAX's backend
starts (XLA reads XLA_FLAGS once, then):

- `--xla_cpu_prefer_vector_width=512` on a CPU with AVX-512 (XLA's default is 256): float64
  exp, the bulk of a loss evaluation, runs 1.7-1.9x faster and the toy sweep's steps 1.2x
  (docs/changelog.md, 2026-11-28).
- `--xla_cpu_use_fusion_emitters=false`: XLA's classic loop emitters instead of its fusion
  emitters. Most of the programs a session compiles are small (a model's random
  initialisation, an eager operation, the first step of a flow), and the classic emitters
  compile those in 0.5-0.75x the time; a flow's results are the same bit for bit. The test
  suite took 410-455 s instead of 546 s of pytest with them (docs/performance.md, "Which
  code generator"). The programs whose run time can outweigh their compilation choose for
  themselves (`FusionPinned`, and `flows/_kernels.segment_program` by problem size), so a
  large run keeps the faster kernels and a discrete run its results bit for bit, whatever
  the process default.

The flags are added to os.environ["XLA_FLAGS"], so subprocesses inherit them, and listed in
MARGINFLOW_XLA_ADDED, so that a subprocess still counts them as marginflow's choice. A
choice is yours, and nothing is changed or pinned for it, if XLA_FLAGS names the option
(beyond what marginflow added), with MARGINFLOW_XLA_DEFAULTS=0 (which also takes back, in
a subprocess, the flags its parent added), or with a jaxlib outside the versions the
choices were verified with (0.10.x from 0.10.2: XLA aborts on a flag it does not know). A
computation before `import marginflow` leaves XLA_FLAGS alone (too late: the backend has
read it), and the pinned programs then compile as they would anyway.
"""

from __future__ import annotations

import functools
import os
from collections import Counter

EMITTERS = "xla_cpu_use_fusion_emitters"
_ADDED = "MARGINFLOW_XLA_ADDED"


def has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:  # not Linux: leave XLA's default
        pass
    return False


def _declined() -> bool:
    return os.environ.get("MARGINFLOW_XLA_DEFAULTS", "1") == "0"


def user_flags() -> list[str]:
    """XLA_FLAGS without the flags marginflow added (MARGINFLOW_XLA_ADDED lists them, once
    each: a second copy of one, as a subprocess may append to what it inherited, is yours)."""
    added = Counter(os.environ.get(_ADDED, "").split())
    kept = []
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if added[flag]:
            added[flag] -= 1
        else:
            kept.append(flag)
    return kept


@functools.cache
def _verified_jaxlib() -> bool:
    """Whether this jaxlib is one the choices were measured with (0.10.x from 0.10.2)."""
    import jaxlib

    try:
        version = tuple(int(v) for v in jaxlib.__version__.split(".")[:3])
    except ValueError:
        return False
    return (0, 10, 2) <= version < (0, 11, 0)


def option_ours(option: str) -> bool:
    """Whether marginflow may choose the XLA option `option` (module docstring)."""
    if _declined() or any(option in flag for flag in user_flags()):
        return False
    return _verified_jaxlib()


def emitters_ours(platform: str) -> bool:
    """Whether marginflow names the code generator of its programs on `platform`: on the
    CPU, where the emitters option is its choice (`option_ours`)."""
    return platform == "cpu" and option_ours(EMITTERS)


def apply_defaults() -> None:
    """Add marginflow's default flags to XLA_FLAGS, unless JAX's backend has started."""
    from jax._src import xla_bridge

    if getattr(xla_bridge, "_backends", None):  # too late: the flags were read already
        return
    if _declined():  # also in a subprocess of a process that added them
        if os.environ.get(_ADDED):
            os.environ["XLA_FLAGS"] = " ".join(user_flags())
            del os.environ[_ADDED]
        return
    wanted = []
    if option_ours("prefer_vector_width") and has_avx512():
        wanted.append("--xla_cpu_prefer_vector_width=512")
    if option_ours(EMITTERS):
        wanted.append(f"--{EMITTERS}=false")
    if not wanted:
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(flags + [f for f in wanted if f not in flags])
    added = os.environ.get(_ADDED, "").split()
    os.environ[_ADDED] = " ".join(added + [f for f in wanted if f not in added])


class FusionPinned:
    """`eqx.filter_jit(fn)` compiled with XLA's fusion emitters where the emitters are
    marginflow's choice (`emitters_ours`), whatever the process default: for the programs
    whose run time can outweigh their compilation (a discrete run, the SDE's paths and
    exact minibatch steps), whose kernels the classic emitters would make slower on large
    arrays, and whose results would change in the last bits (a discrete run's do). Where
    the choice is yours, it is the plain `eqx.filter_jit(fn)`."""

    def __init__(self, fn):
        import equinox as eqx

        self.default = eqx.filter_jit(fn)
        self.fusion = eqx.filter_jit(fn, compiler_options={EMITTERS: True})

    def __call__(self, *args, **kwargs):
        import jax

        pinned = emitters_ours(jax.default_backend())
        return (self.fusion if pinned else self.default)(*args, **kwargs)
