"""The segment program stored traced: `jax.export` of `_segment` kept beside JAX's cache.

A warm process loads the segment's compiled code from JAX's persistent cache, but it still
traces the segment in Python first (about 1.3 s for the toy on the 2-core machine, a
quarter of a warm `marginflow simulate`), because JAX's cache is keyed by the traced
program. This module keeps the traced program too: the first process exports it
(`jax.export`: StableHLO, serialised) under a key made of everything the trace depends
on, and later processes deserialise it and call it, without tracing.

The key must tell apart any two programs that could differ, or a process would run the
wrong one. So it is made only of things whose identity is exact, and a call with
anything else is traced as before:
- marginflow's own source (a digest of its package's .py files, read when this module is
  imported; if a file changes later, by an edit or a checkout under a running kernel, the
  process stops storing and loading, as its traces are of the old code) and the versions
  of Python, jax, jaxlib, diffrax, equinox, optimistix and lineax;
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
for batched runs, runs over several devices or with a default device set, and where
`flatbuffers` (which jax.export's serialisation needs) is missing. Any failure to export,
store, load or call falls back to tracing, and is remembered for the process. The stored program
compiles to the same code: a run through it equals a traced run bit for bit
(`tests/test_compile.py`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import sys

import equinox as eqx
import jax
import numpy as np

# Where a class or function may come from and still be keyed by its name: marginflow (its
# source digest is in the key) and the libraries whose versions are in the key.
_LIBRARIES = ("jax", "jaxlib", "diffrax", "equinox", "optimistix", "lineax")
_TRUSTED = ("marginflow", *_LIBRARIES, "builtins", "numpy", "typing")
# JAX settings left out of the key: where programs are cached and what is logged.
_CONFIG_IGNORED = ("cache", "log", "explain", "traceback", "persistent")
_ENV_PREFIXES = ("JAX_", "XLA_", "EQX_")
_FORMAT = "marginflow-export-2"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # marginflow's folder


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
    return repr((_FORMAT, _SOURCE_DIGEST, sys.version, versions, env))


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
        if jax.config.jax_default_device is not None:
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


def _folder() -> str | None:
    from .._cache import cache_dir

    base = cache_dir()
    return None if base is None else os.path.join(base, "marginflow-export")


def available() -> bool:
    """Whether stored programs are in use in this process (module docstring)."""
    if os.environ.get("MARGINFLOW_EXPORT", "").strip().lower() in ("0", "off", "false", "no"):
        return False
    if jax.config.jax_disable_jit or _folder() is None:
        return False
    try:
        import flatbuffers  # noqa: F401
    except ImportError:
        return False
    return True


_MISSING = object()  # a key this process has not looked up yet


class StoredProgram:
    """`fn` (a function of arrays and static values, as `eqx.filter_jit` takes it) called
    through its exported program where the call is keyable, else through `jitted`, its
    `eqx.filter_jit` with the same compiler options."""

    def __init__(self, name: str, fn, compiler_options: dict | None = None):
        self.name, self.fn = name, fn
        self.compiler_options = dict(compiler_options or {})
        self.jitted = eqx.filter_jit(fn, **({"compiler_options": self.compiler_options}
                                            if self.compiler_options else {}))
        # key -> (compiled call, out static, out tree), or None where it could not be used
        self._loaded: dict[str, tuple | None] = {}

    def __call__(self, *args):
        platform = _single_device_platform(args)
        if platform is None or not available():
            return self.jitted(*args)
        key = program_key(self.name, args, self.compiler_options, platform)
        if key is None:  # not keyable
            return self.jitted(*args)
        program = self._loaded.get(key, _MISSING)
        if program is None:  # it failed before in this process
            return self.jitted(*args)
        dyn, static = eqx.partition(args, eqx.is_array)
        dyn_leaves, dyn_tree = jax.tree_util.tree_flatten(dyn)
        if program is _MISSING:
            program = (self._load(key)
                       or self._export(key, dyn_leaves, dyn_tree, static, platform))
            self._loaded[key] = program  # None: remembered, this process traces it
            if program is None:
                return self.jitted(*args)
        call, out_static, out_tree = program
        # Committed to the device, all of them: the first call's inputs (numpy, uncommitted)
        # and the next's (the last call's outputs, committed) would otherwise lower and
        # compile the program twice.
        try:
            out = call(*jax.device_put(dyn_leaves, jax.devices(platform)[0]))
        except Exception:  # noqa: BLE001  (inputs the stored program does not take: trace)
            self._loaded[key] = None
            return self.jitted(*args)
        return eqx.combine(jax.tree_util.tree_unflatten(out_tree, out), out_static)

    def _compiled(self, exported):
        def call(*args):
            return exported.call(*args)

        # JAX names the compiled program (and its cache file) after the function.
        call.__name__ = call.__qualname__ = f"_{self.name}_stored"
        return jax.jit(call, compiler_options=self.compiler_options or None)

    def _load(self, key: str):
        path = os.path.join(_folder(), key + ".pkl")
        try:
            with open(path, "rb") as fh:
                blob, out_static, out_tree = pickle.load(fh)
            exported = jax.export.deserialize(blob)
        except Exception:  # noqa: BLE001  (none stored yet, or a damaged file: export anew)
            return None
        return self._compiled(exported), out_static, out_tree

    def _export(self, key: str, dyn_leaves, dyn_tree, static, platform: str):
        holder = {}

        def flat(*leaves):
            out = self.fn(*eqx.combine(jax.tree_util.tree_unflatten(dyn_tree, leaves), static))
            out_dyn, holder["static"] = eqx.partition(out, eqx.is_array)
            out_leaves, holder["tree"] = jax.tree_util.tree_flatten(out_dyn)
            return out_leaves

        avals = [jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False))
                 for x in dyn_leaves]
        try:
            exported = jax.export.export(jax.jit(flat), platforms=[platform])(*avals)
            blob = exported.serialize()
            payload = pickle.dumps((blob, holder["static"], holder["tree"]))
        except Exception:  # noqa: BLE001  (not exportable or not picklable: trace instead)
            return None
        _write(os.path.join(_folder(), key + ".pkl"), payload)
        return self._compiled(exported), holder["static"], holder["tree"]


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


def _write(path: str, payload: bytes) -> None:
    """Atomically, in the private cache folder; a failure only loses the stored copy."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(payload)
        os.replace(tmp, path)
    except OSError:
        pass
