"""A readable `repr` for the result records (KKTResidual, ConditionerLimit, Comparison, ...),
the flows, the optimisers and Trajectory.

equinox prints an array field as its shape (`f64[](numpy)`), which hides the numbers a
result record exists to report. `record_repr` prints the values instead:
- scalars (Python numbers, 0-d arrays) with 4 significant digits: `gamma=0.7071`;
- arrays of at most `SHORT` entries in full: `h_inf=[316.2, 316.2, 316.2]`;
- longer arrays as dtype[shape] and their range, `rho=f64[60](min 0.1234, max 5.678, last
  5.678)` (the last entry for 1-D arrays; the count of non-finite entries if any; the count
  of True entries for a boolean array);
- dicts entry by entry, other values with their own repr.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHORT = 6
_WIDTH = 88
_DTYPES = {"f": "f", "i": "i", "u": "u", "b": "bool", "c": "c"}


def _number(x) -> str:
    if isinstance(x, (bool, np.bool_)):
        return str(bool(x))
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.4g}"


def _array(a: np.ndarray) -> str:
    if a.ndim == 0:
        return _number(a.item())
    if a.dtype.kind not in "fiub":
        return repr(a)
    if a.size <= SHORT:
        return np.array2string(a, separator=", ", formatter={"all": _number})
    kind = _DTYPES[a.dtype.kind]
    head = f"{kind}{a.dtype.itemsize * 8 if kind != 'bool' else ''}[{','.join(map(str, a.shape))}]"
    if a.dtype.kind == "b":
        return f"{head}({int(np.count_nonzero(a))} True)"
    finite = a[np.isfinite(a)] if a.dtype.kind == "f" else a
    parts = ([f"min {_number(finite.min())}", f"max {_number(finite.max())}"]
             if finite.size else [])
    if a.ndim == 1:  # a series over saves: its last value is what a run ended with
        parts.append(f"last {_number(a[-1])}")
    if finite.size < a.size:
        parts.append(f"{a.size - finite.size} non-finite")
    return f"{head}({', '.join(parts)})"


def format_value(x) -> str:
    """One field's value as `record_repr` prints it (see the module docstring)."""
    if x is None or isinstance(x, str):
        return repr(x)
    if isinstance(x, (bool, np.bool_, int, float, np.integer, np.floating)):
        return _number(x)
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k!r}: {format_value(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (list, tuple)) and all(isinstance(v, (int, float)) for v in x):
        return _array(np.asarray(x))
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # numpy or jax arrays
        try:
            return _array(np.asarray(x))
        except Exception:  # a tracer (under jit or vmap) has no values to show
            return repr(x)
    return repr(x)


def record_repr(self) -> str:
    """`Name(field=value, ...)` with the values shown (module docstring); one field per
    line when it does not fit on one."""
    items = [f"{f.name}={format_value(getattr(self, f.name))}" for f in dataclasses.fields(self)]
    name = type(self).__name__
    line = f"{name}({', '.join(items)})"
    if len(line) <= _WIDTH:
        return line
    return f"{name}(\n" + "".join(f"  {item},\n" for item in items) + ")"
