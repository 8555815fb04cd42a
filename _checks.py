"""Input checks shared across the package: the model and the initial parameters (`simulate`
and `run`), and the hyper-parameters of the flows and the optimisers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def is_model(model) -> bool:
    """Whether `model` is one of marginflow's homogeneous models (else: a flat parameter
    vector or a user's model, which `Objective` wraps)."""
    from .models import AbstractModel

    return isinstance(model, AbstractModel)


def check_finite_params(w0, where: str) -> None:
    """ValueError if the initial parameters hold NaN or inf."""
    w = np.asarray(w0)
    if not np.all(np.isfinite(w)):
        raise ValueError(
            f"{where}: the initial parameters must be finite, found "
            f"{int(np.sum(~np.isfinite(w)))} NaN/inf entries; re-initialise the model."
        )


def is_concrete(x) -> bool:
    """False for a tracer (a value under jit / vmap, which cannot be checked)."""
    try:
        np.asarray(x)
        return True
    except Exception:  # a tracer under jit/vmap: nothing to check here
        return False


_SWEEP = "to sweep values build the flows with eqx.filter_vmap over the constructor"


def real_array(x, name: str, where: str, example: str, *, scalar: bool = False,
               sweep: str = _SWEEP):
    """`x` as a float array; TypeError for a bool, a string or a non-number, and with
    `scalar` a ValueError for a concrete non-scalar (one flow per value: a sweep vmaps the
    constructor, where the value is a tracer and not checked here)."""
    check_real_type(x, name, where, example)
    try:
        arr = jnp.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"{where}: `{name}` must be a real number, got {x!r}.") from None
    if scalar and is_concrete(x) and arr.ndim != 0:
        raise ValueError(
            f"{where}: `{name}` must be a scalar, got shape {arr.shape}; {sweep}."
        )
    return arr


def check_positive(x, name: str, where: str, hint: str, example: str, *,
                   scalar: bool = False, sweep: str = _SWEEP):
    """`x` as a float array, checked finite and > 0 where it is concrete."""
    arr = real_array(x, name, where, example, scalar=scalar, sweep=sweep)
    if is_concrete(x):
        v = np.asarray(x, dtype=float)
        if not np.all(np.isfinite(v)) or np.any(v <= 0):
            raise ValueError(f"{where}: `{name}` must be a finite number > 0, got {x!r}; {hint}.")
    return arr


def check_unit(x, name: str, where: str, hint: str, example: str = "0.9", *,
               scalar: bool = False, sweep: str = _SWEEP):
    """`x` as a float array, checked in [0, 1) where it is concrete (a decay factor b)."""
    arr = real_array(x, name, where, example, scalar=scalar, sweep=sweep)
    if is_concrete(x):
        v = np.asarray(x, dtype=float)
        if not np.all(np.isfinite(v)) or np.any(v < 0) or np.any(v >= 1):
            raise ValueError(f"{where}: `{name}` must be in [0, 1), got {x!r}; {hint}.")
    return arr


def check_eps(eps, where: str):
    """A flow's eps (> 0, a scalar)."""
    return check_positive(eps, "eps", where, "the paper uses eps = 1e-5 (try 1e-8 .. 1)",
                          "1e-5", scalar=True)


def check_b(b, where: str, name: str = "b"):
    """A flow's decay factor b or b1: a finite scalar < 1, so that the m-equation decays at
    the rate 1 - b > 0. The paper's b lies in [0, 1); b < 0 (a rate above 1) is the flow of
    a discrete run whose accumulator forgets in fewer than 1 / lr steps, 1 - b_d > lr
    (`discrete.matching_flow`)."""
    what = ("the m-equation decays at rate 1 - b" if name == "b" else
            "the first moment m1 decays at rate 1 - b1")
    arr = real_array(b, name, where, "0.9", scalar=True)
    if is_concrete(b):
        v = float(np.asarray(b, dtype=float))
        if not (np.isfinite(v) and v < 1):
            raise ValueError(
                f"{where}: `{name}` must be a finite number < 1 ({what}, which must be > 0), "
                f"got {b!r}; the paper uses {name} = 0.9.")
    return arr


# Where eps sits in the conditioner, one term for the flows and the optimisers:
# "inside" h = 1/sqrt(eps + psi) (the paper's), "outside" h = 1/(sqrt(psi) + eps) (PyTorch's).
EPS_PLACEMENTS = ("inside", "outside")
# The names used before, per keyword (flows: conditioner=, optimisers: convention=).
_OLD_PLACEMENTS = {"conditioner": {"eps_inside": "inside", "eps_outside": "outside"},
                   "convention": {"paper": "inside", "pytorch": "outside"}}


def check_eps_placement(eps_placement, where: str, old=None, old_name: str = "") -> str:
    """"inside" or "outside"; `old` is the deprecated keyword's value (`old_name`:
    "conditioner" on flows, "convention" on optimisers), mapped with a DeprecationWarning."""
    if old is not None:
        names = _OLD_PLACEMENTS[old_name]
        if old not in names:
            raise ValueError(f"{where}: `{old_name}` must be one of {sorted(names)}, got "
                             f"{old!r}; pass eps_placement='inside' or 'outside' instead.")
        new = names[old]
        if eps_placement is not None and eps_placement != new:
            raise ValueError(f"{where}: `{old_name}={old!r}` and `eps_placement="
                             f"{eps_placement!r}` disagree; pass eps_placement only.")
        import warnings

        warnings.warn(f"{where}: `{old_name}={old!r}` is deprecated, pass "
                      f"eps_placement={new!r} (one name for where eps sits, in the flows and "
                      "the optimisers; 'conditioner' means h).", DeprecationWarning,
                      stacklevel=_caller_level())
        eps_placement = new
    if eps_placement is None:
        return "inside"
    if eps_placement not in EPS_PLACEMENTS:
        raise ValueError(
            f"{where}: `eps_placement` must be 'inside' (h = 1/sqrt(eps + psi), the paper's) "
            f"or 'outside' (h = 1/(sqrt(psi) + eps), PyTorch's), got {eps_placement!r}."
        )
    return eps_placement


def require_x64(dtype, where: str) -> None:
    """ValueError if a float64 run is asked for while JAX's float64 mode is off (declined
    with MARGINFLOW_X64=0, or switched off after import): JAX would compute in float32."""
    import jax

    if np.dtype(dtype) == np.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{where}: dtype=float64 needs JAX's float64 mode, which is off in this process "
            "(MARGINFLOW_X64=0, or jax_enable_x64 switched off after importing marginflow); "
            "run jax.config.update('jax_enable_x64', True) before building the model and the "
            "data, or pass dtype=jnp.float32."
        )


def check_real_type(x, name: str, where: str, example: str) -> None:
    """TypeError if a real number is expected but `x` is a bool or a string (or an array of
    them): float(True) and np.asarray("1e6", float) would otherwise accept them silently."""
    try:
        kind = None if isinstance(x, type) else np.dtype(getattr(x, "dtype", None)).kind
    except TypeError:  # no dtype, or one numpy does not know (a PRNG key)
        kind = None
    if isinstance(x, (bool, np.bool_)) or kind == "b":
        what = "a bool"
    elif isinstance(x, (str, bytes)) or kind in ("U", "S"):
        what = "a string"
    else:
        return
    raise TypeError(
        f"{where}: `{name}` must be a real number, got {x!r} ({what}); pass a float such as "
        f"{name}={example}."
    )


def check_int(x, name: str, where: str, minimum: int = 1, fix: str = "") -> int:
    """`x` as an int; ValueError unless it is an integer (not a bool) >= minimum."""
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
        fix = fix or f"pass e.g. {name}={max(minimum, 2)}"
        raise ValueError(f"{where}: `{name}` must be an integer >= {minimum}, got {x!r}; {fix}.")
    return int(x)


def _caller_level() -> int:
    """The `stacklevel` that points a warning at the first frame outside marginflow and
    equinox (a constructor is reached through equinox's module machinery and wrappers)."""
    import inspect
    import os

    ours = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.sep + "equinox" + os.sep)
    level, frame = 1, inspect.currentframe()
    while frame is not None and (frame.f_code.co_filename.startswith(ours[0])
                                 or ours[1] in frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    return level - 1
