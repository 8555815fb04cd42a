"""Compiled programs that persist across processes: JAX's persistent compilation cache.

A simulate call spends seconds compiling and milliseconds integrating the toy; the cache
keeps the compiled segment on disk so that the next process (a rerun of the CLI, a new
notebook kernel) loads it instead. `simulate` and `run` switch it on at their first call,
and the CLI's `simulate` and `reproduce` at their start, before building a model (the
CLI owns its process; a library call must not change JAX's settings before the user's
code has had its say):

- in the folder MARGINFLOW_CACHE_DIR names, else the user cache folder the OS convention
  gives (platformdirs: ~/.cache/marginflow/jax on Linux, ~/Library/Caches/marginflow/jax
  on macOS, %LOCALAPPDATA%/marginflow/Cache/jax on Windows), created private (0700):
  JAX runs what it loads from there, so nobody else may write to it;
- read but not written where that folder exists and is read-only (a shared cache): one
  warning says so, and JAX's warning for each program it cannot store is filtered out;
- not at all with MARGINFLOW_CACHE_DIR=off (or 0, false, none);
- and never over a cache the user configured in JAX (jax_compilation_cache_dir, or
  jax.config's enable_compilation_cache = False): that choice is kept as it is.
When marginflow sets the folder it also lowers JAX's minimum compile time for an entry
from 1 s to 0, so that the small programs of eager operations are kept (a model's random
initialisation: about 25 ms each to compile, less to load), and so is the segment where it
is not stored by marginflow itself (`_stored`: MARGINFLOW_EXPORT=0, a model class of your
own; about a second to compile for a small model on a fast machine). Measured on the main job
(`benchmarks/first_result.py`): 0.15 s less per warm process than with a 0.1 s minimum;
and switching the cache on before the model is built, so that its initialisation's 11
programs load instead of compiling, 0.57 s less (medians of 5, 6.33 s against 6.90 s,
alternating, on a slow hour of the 2-core machine).
"""

from __future__ import annotations

import os

import jax

_OFF = {"off", "0", "false", "none", "no"}
_MIN_COMPILE_TIME_S = 0.0
_state = {"checked": False}


def default_cache_dir() -> str:
    """The folder `use_cache` picks when MARGINFLOW_CACHE_DIR is unset."""
    import platformdirs

    return os.path.join(platformdirs.user_cache_dir("marginflow", appauthor=False), "jax")


def use_cache() -> str | None:
    """Switch JAX's persistent compilation cache on (once per process); its folder or None.

    Called by `simulate` and `run`; see the module docstring for the rules."""
    if _state["checked"]:
        return cache_dir()
    _state["checked"] = True
    choice = os.environ.get("MARGINFLOW_CACHE_DIR", "").strip()
    if choice.lower() in _OFF:
        return cache_dir()
    if jax.config.jax_compilation_cache_dir or not jax.config.jax_enable_compilation_cache:
        return cache_dir()  # the user's own configuration
    folder = os.path.abspath(os.path.expanduser(choice)) if choice else default_cache_dir()
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
    except OSError as err:  # a read-only home: run without the cache, and say so
        import warnings

        warnings.warn(
            f"marginflow: cannot create the compilation cache folder {folder} ({err}); "
            "running without it. Set MARGINFLOW_CACHE_DIR to a writable folder, or to off.",
            stacklevel=3,
        )
        return None
    if not os.access(folder, os.W_OK | os.X_OK):  # e.g. a shared cache mounted read-only
        import warnings

        warnings.warn(
            f"marginflow: the compilation cache folder {folder} is read-only: programs "
            "stored there are loaded, new ones are not stored (JAX's warning for each is "
            "silenced). Set MARGINFLOW_CACHE_DIR to a writable folder, or to off.",
            stacklevel=3,
        )
        warnings.filterwarnings("ignore", message="Error writing persistent compilation cache")
    jax.config.update("jax_compilation_cache_dir", folder)
    if jax.config.jax_persistent_cache_min_compile_time_secs > _MIN_COMPILE_TIME_S:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_TIME_S)
    return folder


def cache_dir() -> str | None:
    """The folder JAX's persistent compilation cache uses now, or None if it is off."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    return jax.config.jax_compilation_cache_dir or None


# JAX reports each phase of making a program (tracing to a jaxpr, lowering it to MLIR, the
# backend's compilation or the load from the persistent cache) as a time span. Phases nest
# (a jit traced inside another's trace reports its own span), so the clock measures the
# union of the spans, not their sum.
# marginflow's stored programs (`_stored`) report the load of a compiled program, which
# skips JAX's three phases, as STORED_LOAD_EVENT (time.time() spans, as JAX's).
STORED_LOAD_EVENT = "/marginflow/stored_program_load_duration"
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
    STORED_LOAD_EVENT,
)
_MADE = _COMPILE_EVENTS[2:]  # a program is ready: XLA's step (the last of JAX's), or a load


class CompileClock:
    """Seconds spent making programs (trace, lower, compile or load) while it is open.

    with CompileClock() as clock: ...; clock.seconds. Used by `simulate` to split its wall
    time into compilation and integration (Trajectory.meta["compile_time_s"])."""

    def __init__(self, on_compiled=None):
        self.spans: list[tuple[float, float]] = []
        self.open = False
        # Called after each program is compiled or loaded (XLA's step, the last of JAX's
        # three, or a stored program's load; a progress meter then knows that the call now
        # integrates).
        self.on_compiled = on_compiled

    def _listen(self, event, start, end, **kwargs):
        if self.open and event in _COMPILE_EVENTS:
            self.spans.append((start, end))
            if self.on_compiled is not None and event in _MADE:
                self.on_compiled()

    def __enter__(self):
        self.open = True
        jax.monitoring.register_event_time_span_listener(self._listen)
        return self

    def __exit__(self, *exc):
        self.open = False
        unregister = getattr(jax.monitoring, "unregister_event_time_span_listener", None)
        if unregister is not None:  # an older JAX keeps the (closed, idle) listener
            unregister(self._listen)
        return False

    @property
    def seconds(self) -> float:
        total, reach = 0.0, -float("inf")
        for start, end in sorted(self.spans):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total
