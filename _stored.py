"""Compiled programs stored whole: marginflow's own programs loaded without tracing.

JAX's persistent cache keeps a compiled program on disk, but a process finds it only by
tracing and lowering the function first, because the cache is keyed by the lowered
program. For the segment of the toy that is about 1.3 s of Python on the 2-core machine,
half of a warm `marginflow simulate`; for the run's small programs (its first step,
initial state, homogeneity check, margins) 20-50 ms each. This module keeps the compiled
executable itself (`jax.experimental.serialize_executable`), zlib-compressed, in
`marginflow-export/<environment>/` beside JAX's cache, under a key made of everything the
trace and the compiled code depend on; a later process deserialises it and calls it,
without tracing or lowering. The folders of other environments (marginflow's source, the
libraries' versions) are deleted once unused for 30 days. `StoredProgram(name, fn)` is
such a program; marginflow uses it for programs called a few times per run (a key costs
about 1 ms to compute).

The key must tell apart any two programs that could differ, or a process would run the
wrong one. So it is made only of things whose identity is exact, and a call with
anything else is traced as before:
- marginflow's own source (a digest of its package's .py files, read when this module is
  imported; if a file changes later, by an edit or a checkout under a running kernel, the
  process stops storing and loading, as its traces are of the old code) and the versions
  of Python, jax, jaxlib, diffrax, equinox, optimistix and lineax;
- the machine: the CPU's model and instruction-set flags (the executable is native code,
  compiled for this CPU; a cache folder shared by different machines keeps one per CPU);
- every JAX setting but those of caching and logging, the JAX_*, XLA_* and EQX_*
  environment variables, the platform and device kind, and the compiler options;
- the arguments: every array as its shape, dtype and weak type; every other value as
  itself, where its type is exactly None, bool, int, float, str, bytes, a dtype, or a
  tuple, list or dict of those (a subclass, such as np.float64 or an IntEnum, may trace
  differently); every class and function by its module and name, only where it comes
  from marginflow or one of the libraries above, is not a lambda or a local definition,
  and the name finds the object itself (not a wrapper such as jax.grad(f) that copies
  f's name). A model class or an activation written in a notebook is traced every time:
  two notebooks may define different functions under one name.

Off with MARGINFLOW_EXPORT=0, when JAX's cache is off (`marginflow.cache_dir()` is None),
under jax_disable_jit, jax_debug_nans or jax_debug_infs, and for calls under a
transformation (vmap: batched runs), on several devices or with a default device set.
Any failure to compile, store, load or call falls back to tracing, and is remembered for
the process. The stored program is the one `jax.jit` compiles: a run through it equals a
traced run bit for bit (`tests/test_compile.py`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import sys
import threading
import time
import zlib

import equinox as eqx
import jax
import numpy as np
from jax._src import core as jax_core

from ._cache import STORED_LOAD_EVENT, cache_dir

# Where a class or function may come from and still be keyed by its name: marginflow (its
# source digest is in the key) and the libraries whose versions are in the key.
_LIBRARIES = ("jax", "jaxlib", "diffrax", "equinox", "optimistix", "lineax", "numpy")
_TRUSTED = ("marginflow", *_LIBRARIES, "builtins", "numpy", "typing")
# JAX settings left out of the key: where programs are cached and what is logged.
_CONFIG_IGNORED = ("cache", "log", "explain", "traceback", "persistent")
_ENV_PREFIXES = ("JAX_", "XLA_", "EQX_")
_FORMAT = "marginflow-export-4"
# JAX's context managers that change a trace but are not among its settings (a mesh, a
# device, compute_on, XLA metadata): a call inside one is traced, as it cannot be keyed.
_CONTEXTS = ("mesh_context_manager", "abstract_mesh_context_manager", "device_context",
             "compute_on_context_manager", "xla_metadata_context_manager",
             "pallas_tpu_interpret_mode_context_manager")
# Where a stored program not used for this long is deleted (a folder per environment:
# marginflow's source and the libraries' versions; an edit or an upgrade makes a new one).
_UNUSED_DAYS = 30
_ROOT = os.path.dirname(os.path.abspath(__file__))  # marginflow's folder (the package root)


class _Unkeyable(Exception):
    """An argument whose identity is not exact: the call is traced instead."""


def _package_files() -> list[str]:
    """marginflow's .py files: the package folder and its sub-packages (folders with an
    __init__.py), not the checkout's tests, docs or virtual environments."""
    found = []
    for folder, dirs, files in os.walk(_ROOT):
        dirs[:] = sorted(d for d in dirs
                         if os.path.isfile(os.path.join(folder, d, "__init__.py")))
        found += [os.path.join(folder, f) for f in sorted(files)
                  if f.endswith(".py") and os.path.isfile(os.path.join(folder, f))]
    return found


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def _read_sources():
    """(digest, stamps) of marginflow's source as this process imported it: read when this
    module is imported, with each file's (mtime, size), so that a file changed later (an
    edit, a checkout in a running kernel) switches stored programs off for the process."""
    digest, stamps = hashlib.sha256(), []
    try:
        for path in _package_files():
            with open(path, "rb") as fh:
                data = fh.read()
            stamps.append((path, *_stamp(path)))
            digest.update(os.path.relpath(path, _ROOT).encode() + b"\0")
            digest.update(hashlib.sha256(data).digest())
    except OSError:
        return None, []
    return (digest.hexdigest() if stamps else None), stamps


_SOURCE_DIGEST, _SOURCE_STAMPS = _read_sources()


def _sources_unchanged() -> bool:
    try:
        return all(_stamp(p) == (m, n) for p, m, n in _SOURCE_STAMPS)
    except OSError:
        return False


@functools.cache
def _environment() -> str:
    """The part of the key that is fixed for a process (module docstring): marginflow's
    source, the libraries' versions and the environment variables."""
    from importlib import metadata

    versions = []
    for lib in _LIBRARIES:
        try:
            versions.append(f"{lib}={metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{lib}=none")
    # The variables as the process started with them: JAX, XLA and equinox read them then.
    env = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)]
    return repr((_FORMAT, _SOURCE_DIGEST, sys.version, versions, env, _machine()))


def _machine() -> str:
    """The CPU the executables are compiled for: the first processor's block of
    /proc/cpuinfo on Linux (model and instruction-set features: `flags` on x86, `Features`
    and `CPU part` on Arm) without the fields that change while it runs; the platform
    module's names elsewhere (XLA's CPU loader checks the features on load too)."""
    import platform

    volatile = ("mhz", "bogomips", "processor", "core id", "apicid", "initial apicid")
    fields = []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor's block
                name, _, value = line.partition(":")
                if not any(v in name.strip().lower() for v in volatile):
                    fields.append((name.strip(), value.strip()))
    except OSError:
        pass
    return repr((platform.machine(), platform.processor(), fields))


def _config() -> list[str]:
    """Every JAX setting that may change a trace (all but _CONFIG_IGNORED's), now: they
    can change at any time (jax.config.update, context managers)."""
    names = sorted(n for n in jax.config.values if not any(w in n for w in _CONFIG_IGNORED))
    return [f"{n}={getattr(jax.config, n, None)!r}" for n in names]


def _named(x) -> str:
    """A class or function by module and qualified name, where that name finds x itself
    (not a wrapper copying a function's name, nor a bound method)."""
    if x is type(None):  # a pytree node type, not reachable as builtins.NoneType
        return "builtins:NoneType"
    module = getattr(x, "__module__", None) or ""
    qualname = getattr(x, "__qualname__", None) or ""
    if module.split(".")[0] not in _TRUSTED or not qualname or "<" in qualname:
        raise _Unkeyable
    found = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not x:
        raise _Unkeyable
    return f"{module}:{qualname}"


def _value(x):
    """A static value as exact text (_Unkeyable where that is not possible). Types are
    matched exactly: a subclass (np.float64, an IntEnum, a namedtuple) may trace apart."""
    kind = type(x)
    if x is None or kind in (bool, int, str, bytes):
        return f"{kind.__name__}:{x!r}"
    if kind is float:
        return f"float:{float.hex(x)}"
    if kind in (tuple, list):
        return f"{kind.__name__}({','.join(_value(v) for v in x)})"
    if kind is dict:
        items = sorted(((_value(k), _value(v)) for k, v in x.items()))
        return "dict(" + ",".join(f"{k}:{v}" for k, v in items) + ")"
    if isinstance(x, np.dtype):
        return f"dtype({x})"
    if isinstance(x, type):
        return f"type({_named(x)})"
    if kind is functools.partial:
        return f"partial({_value(x.func)},{_value(x.args)},{_value(x.keywords)})"
    if callable(x) and hasattr(x, "__qualname__"):
        return f"fn({_named(x)})"
    if kind.__module__.split(".")[0] == "equinox" and kind.__name__ == "_Missing":
        return "eqx.Missing"
    raise _Unkeyable


def _tree(treedef) -> str:
    """A pytree's structure: node types by name, with their static data (`_value`)."""
    node = treedef.node_data()
    if node is None:
        return "*"
    kind, aux = node
    children = ",".join(_tree(c) for c in treedef.children())
    return f"{_named(kind)}[{_value(aux)}]({children})"


def program_key(name: str, args, compiler_options: dict, platform: str) -> str | None:
    """The stored program's key for `name` called on `args`, or None: not keyable."""
    try:
        if _SOURCE_DIGEST is None or not _sources_unchanged():
            return None
        if jax.config.jax_default_device is not None or _in_a_jax_context():
            return None  # the stored program runs on the platform's first device
        leaves, treedef = jax.tree_util.tree_flatten(args)
        parts = [_tree(treedef)]
        for leaf in leaves:
            if eqx.is_array(leaf):
                weak = bool(getattr(leaf, "weak_type", False))
                parts.append(f"array({leaf.dtype},{tuple(leaf.shape)},{weak})")
            else:
                parts.append(_value(leaf))
        device = jax.devices(platform)[0]
        text = repr((_environment(), _config(), name, platform, device.device_kind,
                     sorted(compiler_options.items()), parts))
    except Exception:  # noqa: BLE001  (_Unkeyable, or anything odd: trace instead)
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def _in_a_jax_context() -> bool:
    from jax._src import config

    for name in _CONTEXTS:
        state = getattr(config, name, None)
        if state is not None and state.value not in (None, ()):
            return True
    return False


def _folder() -> str | None:
    """The folder of this environment's stored programs (one per `_environment()`)."""
    base = cache_dir()
    return None if base is None else os.path.join(base, "marginflow-export", _environment_id())


@functools.cache
def _environment_id() -> str:
    """A short name for `_environment()`: its folder (hashed once, not on every call)."""
    return hashlib.sha256(_environment().encode()).hexdigest()[:16]


def _prune(folder: str) -> None:
    """Once per process that stores a program: delete the stored programs of other
    environments (other marginflow sources or library versions) not used for _UNUSED_DAYS
    days (a load marks its folder used), so that edits and upgrades do not fill the disk;
    and files of older releases, which kept their programs in the parent folder itself."""
    import shutil

    parent, mine = os.path.split(folder)
    cutoff = time.time() - _UNUSED_DAYS * 86400
    try:
        for name in os.listdir(parent):
            path = os.path.join(parent, name)
            if name == mine or os.stat(path).st_mtime >= cutoff:
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                _remove(path)
    except OSError:
        pass


def available() -> bool:
    """Whether stored programs are in use in this process (module docstring)."""
    if os.environ.get("MARGINFLOW_EXPORT", "").strip().lower() in ("0", "off", "false", "no"):
        return False
    if jax.config.jax_disable_jit or _folder() is None:
        return False
    if jax.config.jax_debug_nans or jax.config.jax_debug_infs:
        return False  # their checks re-run a traced program op by op: keep them whole
    return True


_state = {"pruned": False, "unwritable": False}
# False (so: traced) where this JAX lacks the check.
_trace_state_clean = getattr(jax_core, "trace_state_clean", lambda: False)


_MISSING = object()  # a key this process has not looked up yet
PROGRAMS: list[StoredProgram] = []  # every one made (the tests drop their loaded copies)


class StoredProgram:
    """`fn` (a function of arrays and static values, as `eqx.filter_jit` takes it) called
    through its stored executable where the call is keyable (loaded from the folder, or
    compiled and stored there at the first call), else through `jitted`, its
    `eqx.filter_jit` with the same compiler options. `name` and the compiler options name
    the program in the key: they must be unique among the stored programs."""

    def __init__(self, name: str, fn, compiler_options: dict | None = None):
        self.name, self.fn = name, fn
        self.compiler_options = dict(compiler_options or {})
        ident = (name, sorted(self.compiler_options.items()))
        if any((p.name, sorted(p.compiler_options.items())) == ident for p in PROGRAMS):
            raise ValueError(f"StoredProgram: the name {name!r} with compiler options "
                             f"{self.compiler_options} is taken; the key holds the name, "
                             "not the function: give each program its own name.")
        self.jitted = eqx.filter_jit(fn, **({"compiler_options": self.compiler_options}
                                            if self.compiler_options else {}))
        # key -> (compiled call, out static, out tree), or None where it could not be used
        self._loaded: dict[str, tuple | None] = {}
        self._lock = threading.Lock()  # one thread loads or compiles a key, the others wait
        PROGRAMS.append(self)

    def __call__(self, *args):
        platform = _single_device_platform(args)
        # Inside another program's trace a call must be staged into it, not run now.
        if platform is None or not available() or not _trace_state_clean():
            return self.jitted(*args)
        key = program_key(self.name, args, self.compiler_options, platform)
        if key is None:  # not keyable
            return self.jitted(*args)
        dyn, static = eqx.partition(args, eqx.is_array)
        dyn_leaves, dyn_tree = jax.tree_util.tree_flatten(dyn)
        program = self._loaded.get(key, _MISSING)
        if program is _MISSING:
            with self._lock:
                program = self._loaded.get(key, _MISSING)
                if program is _MISSING:
                    program = self._make(key, dyn_leaves, dyn_tree, static, platform)
                    self._loaded[key] = program  # None: remembered, this process traces it
        if program is None:
            return self.jitted(*args)
        call, out_static, out_tree, path = program
        try:
            out = call(*jax.device_put(dyn_leaves, jax.devices(platform)[0]))
        except Exception:  # noqa: BLE001  (inputs the stored program does not take: trace)
            self._loaded[key] = None
            if path is not None:  # a stored file that does not run is not loaded again
                _remove(path)
            return self.jitted(*args)
        return eqx.combine(jax.tree_util.tree_unflatten(out_tree, out), out_static)

    def _make(self, key: str, dyn_leaves, dyn_tree, static, platform: str):
        """The program for `key`: loaded, else compiled (and stored where the folder can be
        written; a read-only folder, such as a shared cache, leaves it to `jitted` and JAX's
        own cache); None where neither works."""
        start = time.time()
        folder = _folder()
        path = os.path.join(folder, key + ".pkl")
        program = self._load(path, platform)
        if program is None and _writable(folder):
            program = self._compile_and_store(path, dyn_leaves, dyn_tree, static, platform)
        # For CompileClock (and the progress meter's phases): a load is no JAX event.
        jax.monitoring.record_event_time_span(STORED_LOAD_EVENT, start, time.time(),
                                              fun_name=self.name)
        return program

    def _load(self, path: str, platform: str):
        try:
            with open(path, "rb") as fh:
                blob, in_tree, out_def, out_static, out_tree, targets = pickle.loads(
                    zlib.decompress(fh.read()))
            from jax.experimental.serialize_executable import deserialize_and_load

            _prepare_custom_calls(targets)
            compiled = deserialize_and_load(blob, in_tree, out_def, backend=platform,
                                            execution_devices=jax.devices(platform)[:1])
        except Exception:  # noqa: BLE001  (none stored yet, or a damaged file: compile anew)
            return None
        _mark_used(os.path.dirname(path))
        return compiled, out_static, out_tree, path

    def _compile_and_store(self, path: str, dyn_leaves, dyn_tree, static, platform: str):
        holder = {}

        def flat(*leaves):
            out = self.fn(*eqx.combine(jax.tree_util.tree_unflatten(dyn_tree, leaves), static))
            out_dyn, holder["static"] = eqx.partition(out, eqx.is_array)
            out_leaves, holder["tree"] = jax.tree_util.tree_flatten(out_dyn)
            return out_leaves

        # The name (JAX names the program after the function) is new each time, so that JAX
        # compiles it afresh: XLA's CPU backend serialises an executable it loaded from JAX's
        # persistent cache without its kernels (a later process that loads that copy fails
        # with "Function ... not found"). And JAX does not store its own copy, which no
        # process would read again.
        flat.__name__ = flat.__qualname__ = f"_{self.name}_stored_{os.urandom(6).hex()}"
        device = jax.sharding.SingleDeviceSharding(jax.devices(platform)[0])
        avals = [jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False),
                                      sharding=device) for x in dyn_leaves]
        try:
            with _not_in_jax_cache():
                compiled = jax.jit(flat, compiler_options=self.compiler_options or None).lower(
                    *avals).compile()
        except Exception:  # noqa: BLE001  (not compilable this way: trace instead)
            return None
        program = compiled, holder["static"], holder["tree"], None
        try:
            from jax.experimental.serialize_executable import serialize

            targets = _custom_call_targets(compiled)
            if _calls_the_host(compiled) or any("callback" in t for t in targets):
                # The executable holds pointers into this process (equinox's runtime checks,
                # say): it runs here, and is not stored.
                return program
            blob, in_tree, out_def = serialize(compiled)
            # zlib level 1: a fifth of the size (1.3 MB -> 0.27 MB, the toy's segment) for
            # 4 ms to read back.
            payload = zlib.compress(pickle.dumps(
                (blob, in_tree, out_def, holder["static"], holder["tree"], targets)), 1)
        except Exception:  # noqa: BLE001  (not serialisable or not picklable: run it here)
            return program
        if _write(path, payload) and not _state["pruned"]:
            _state["pruned"] = True
            _prune(os.path.dirname(path))
        return program


def _calls_the_host(compiled) -> bool:
    """Whether the compiled program calls back into Python (host callbacks, effects): its
    executable refers to objects of this process, and another process that loaded it would
    crash. JAX's persistent cache refuses such programs too. True where it cannot tell."""
    unloaded = getattr(getattr(compiled, "_executable", None), "_unloaded_executable", None)
    try:
        return bool(unloaded.host_callbacks or unloaded.keepalive
                    or unloaded.ordered_effects or unloaded.unordered_effects)
    except AttributeError:
        return True


def _custom_call_targets(compiled) -> tuple[str, ...]:
    """The custom calls (library kernels: LAPACK's, callbacks) of the compiled program."""
    import re

    return tuple(sorted(set(re.findall(r'custom_call_target="([^"]+)"', compiled.as_text()))))


def _prepare_custom_calls(targets) -> None:
    """What lowering would have done before the program runs: JAX fills in its LAPACK
    kernels' function pointers (from scipy) when it lowers a linear-algebra operation, and
    a process that loads a program calling them without lowering one crashes (a null
    pointer: seen with `newton_solver`'s QR). jax.export's own loader does the same."""
    if any(t.startswith("lapack_") for t in targets):
        from jax._src.lax import linalg

        linalg.initialize_lapack()


def _not_in_jax_cache():
    """A context in which JAX writes no program to its persistent cache (its minimum compile
    time for an entry raised to infinity, in this thread only); a no-op where this JAX
    lacks the setting."""
    import contextlib

    from jax._src import config

    setting = getattr(config, "persistent_cache_min_compile_time_secs", None)
    return contextlib.nullcontext() if setting is None else setting(float("inf"))


def _single_device_platform(args) -> str | None:
    """The platform where every array of `args` is on its first device; None for a tracer
    (a call under jit or vmap) or arrays spread over devices: those calls are traced."""
    platform = None
    for leaf in jax.tree_util.tree_leaves(args):
        if isinstance(leaf, jax.core.Tracer):
            return None
        if isinstance(leaf, jax.Array):
            devices = leaf.devices()
            if len(devices) != 1:
                return None
            (device,) = devices
            if device != jax.devices(device.platform)[0]:
                return None
            platform = device.platform
    return platform or jax.default_backend()


def _write(path: str, payload: bytes) -> bool:
    """Atomically, in the private cache folder; False where it failed (then the program is
    only lost to later processes), and no more stores are tried in this process."""
    import tempfile

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
    except OSError:
        _state["unwritable"] = True
        return False
    return True


def _writable(folder: str) -> bool:
    """Whether programs can be stored in `folder` (or the folder it will be made in)."""
    if _state["unwritable"]:
        return False
    probe = folder
    while not os.path.isdir(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    return os.access(probe, os.W_OK | os.X_OK)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


_used: set[str] = set()


def _mark_used(folder: str) -> None:
    """The folder's mtime set to now, once per process: `_prune` keeps used folders."""
    if folder not in _used:
        _used.add(folder)
        try:
            os.utime(folder)
        except OSError:
            pass
