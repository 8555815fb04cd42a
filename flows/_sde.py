"""`simulate_sde`: the stochastic modified equation a minibatch run of SGD follows.

A minibatch step of SGD on the sum loss over a batch of B of the N samples, drawn without
replacement and afresh at each step (`discrete.run(..., sampling="independent")`), is

    w_{k+1} = w_k - eta g_B(w_k),    g_B = sum_{i in batch} grad l_i,

with mean (B/N) grad L and covariance (Cochran's finite-population formula)

    Cov(g_B) = B (N - B) / (N (N - 1)) G^T G,    G = the N x p matrix of centred per-sample
                                                    gradients, rows grad l_i - grad L / N.

So a step moves the flow time t = k eta B / N by dt = eta B / N, with mean -grad L dt and
covariance eta^2 Cov(g_B) = eta (N - B) / (N - 1) G^T G dt. The SDE that matches these two
moments (Li, Tai and E 2017, 2019: first-order weak approximation, error O(eta) in the
expectations of smooth functions over a fixed time) is

    dw = -grad L(w) dt + sqrt(eta (N - B) / (N - 1)) G(w)^T dW_t,    W: N-dim Brownian,

(Ito). G^T dW is one vector-Jacobian product of the per-sample log-losses: O(N p) work and
O(N + p) memory per step, never a p x p matrix. After t = 1 it runs in u = log t, where
dt = t du and dW_t = sqrt(t) dW_u:

    dw = -(t grad L) du + sqrt(eta (N - B) / (N - 1)) e^{-u/2} (t G)^T dW_u,

with t grad L and t G formed in log space (L reaches e^{-230} at t = 1e100). The noise dies
out as the per-sample gradients do (like L, so t G = O(1) and the noise like t^{-1/2}): the
paths settle onto the flow's late direction, each with its own log-time offset.

The integrator: Euler-Maruyama (weak order 1 in its step, Ito) on a fixed grid, `substeps`
steps per minibatch step in t (dt = eta B / (N substeps)) and du = min(dt, 0.01) after t = 1,
the save times on the grid; one diffrax `VirtualBrownianTree` of shape (paths, N), so the
paths are fixed by the key and a finer grid refines the same paths (or, with
brownian="increments", an `UnsafeBrownianPath`: 6x cheaper, not refinable).

Only gradient flow (SGD) has its SDE here: the RMSProp and Adam flows would need the noise
of their second-moment equation, whose increment (1 - b) eta (g_B^2 - m) has a covariance
of fourth moments of the sampling and a mean shifted by diag Cov(g_B) (docs/discrete.md,
"Minibatch runs and their SDE").
"""

from __future__ import annotations

import math
import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from .._checks import check_int, require_x64
from .._trajectory import Trajectory
from ..models._objective import Objective
from ._flow import GradientFlow
from ._plan import _check_number

_DU_MAX = 0.01  # the largest step in log t: the late drift is O(1) per unit of u


def _noise_scale(n: int, b: int, eta: float) -> float:
    """sqrt(eta (N - B) / (N - 1)): 0 for a full batch, where the run is the flow."""
    return math.sqrt(eta * (n - b) / (n - 1)) if n > 1 else 0.0


def _drift(u, w, args):
    """-grad L (in t) or -t grad L (in u = log t), for each path (w: (paths, p))."""
    objective, _, log_time = args

    def one(w):
        log_l, glog = jax.value_and_grad(objective.log_loss)(w)
        log_j = jnp.where(log_time, u, 0.0)  # t grad L = e^{log L + log t} grad log L
        return -jnp.exp(log_l + log_j).astype(w.dtype) * glog

    return jax.vmap(one)(w)


def _noise(u, w, args, dW):
    """scale e^{-u/2} (t G)^T dW for one path (in t: scale G^T dW): one VJP."""
    objective, scale, log_time = args
    log_terms, vjp = jax.vjp(objective.log_terms, w)
    # t l_i e^{-u/2} = e^{log l_i + u/2}: the per-sample losses' weights, in log space
    weights = jnp.exp(log_terms + jnp.where(log_time, 0.5 * u, 0.0)).astype(w.dtype)
    centred = dW - jnp.mean(dW)  # G^T dW = sum_i (grad l_i - grad L / N) dW_i
    return scale * vjp(weights * centred)[0]


def _diffusion(u, w, args):
    """The operator dW (paths, N) -> the paths' noise increments (paths, p)."""
    n = args[0].data.X.shape[0]
    return lx.FunctionLinearOperator(
        lambda dW: jax.vmap(lambda w1, d1: _noise(u, w1, args, d1))(w, dW),
        jax.ShapeDtypeStruct((w.shape[0], n), w.dtype))


@eqx.filter_jit
def _paths(objective, scale, w0, grid, save_at, log_time, key, tree: bool):
    """All paths (w0: (paths, p)) on one grid (t, or u = log t), saving at save_at (points
    of the grid). One Brownian motion of shape (paths, N): one tree traversal per step for
    all paths (tree), or independent increments (not tree)."""
    shape = (w0.shape[0], objective.data.X.shape[0])
    if tree:
        brownian = dfx.VirtualBrownianTree(grid[0], grid[-1], shape=shape, key=key,
                                           tol=jnp.min(jnp.diff(grid)) / 2)
        adjoint = dfx.RecursiveCheckpointAdjoint()
    else:
        brownian = dfx.UnsafeBrownianPath(shape=shape, key=key)
        adjoint = dfx.ForwardMode()  # (diffrax's rule for this path; nothing is differentiated)
    terms = dfx.MultiTerm(dfx.ODETerm(_drift), dfx.ControlTerm(_diffusion, brownian))
    sol = dfx.diffeqsolve(terms, dfx.Euler(), grid[0], grid[-1], None, w0,
                          args=(objective, scale, log_time),
                          stepsize_controller=dfx.StepTo(ts=grid),
                          saveat=dfx.SaveAt(ts=save_at), max_steps=grid.shape[0],
                          throw=False, adjoint=adjoint)
    finite = jnp.all(jnp.isfinite(sol.ys), axis=(0, 2))  # per path
    return jnp.swapaxes(sol.ys, 0, 1), finite & (sol.result == dfx.RESULTS.successful)


def _grid(lo: float, hi: float, step: float, saves: np.ndarray):
    """(lo, lo + step, ..., hi with the save times in (lo, hi] on it, the saves). A save
    within a quarter step of an inner grid point moves that point (no sliver steps, which
    would make the Brownian tree's tolerance tiny, or vanish in float32); a save within
    rounding of hi is hi (log t1 computed twice); the others are inserted."""
    n = max(1, math.ceil((hi - lo) / step - 1e-9))
    grid = np.linspace(lo, hi, n + 1)
    h = (hi - lo) / n
    saves = np.where(np.abs(saves - hi) <= 1e-12 * (1.0 + abs(hi)), hi, saves)
    if saves.size:
        j = np.clip(np.rint((saves - lo) / h).astype(int), 0, n)
        move = (np.abs(grid[j] - saves) <= h / 4) & (j > 0) & (j < n)
        grid[j[move]] = saves[move]
        grid = np.unique(np.concatenate([grid, saves[~move]]))
    return grid, saves


def _positive(x, name: str, example: str) -> float:
    """A finite real number > 0 (not a bool or a string), as for `simulate`'s numbers."""
    return _check_number(x, name, "must be a finite number > 0",
                         lambda v: math.isfinite(v) and v > 0, example, where="simulate_sde")


def _save_times(ts, n_save: int, t1: float) -> np.ndarray:
    if ts is None:
        n_save = check_int(n_save, "n_save", "simulate_sde", 1, "pass e.g. n_save=40")
        lo = min(t1, 1.0) / 100
        return np.unique(np.append(np.geomspace(lo, t1, n_save), t1))
    save = np.asarray(ts, np.float64).ravel()
    if save.size == 0 or not np.all(np.isfinite(save)) or save.min() <= 0 or save.max() > t1:
        raise ValueError(f"simulate_sde: `ts` must be finite save times in (0, t1 = {t1:g}], "
                         f"got {ts!r}.")
    return np.unique(save)


def simulate_sde(flow, model, data, t1: float, *, batch_size: int, eta: float, key,
                 n_paths: int, ts=None, n_save: int = 40, loss=None, substeps: int = 4,
                 du: float | None = None, brownian: str = "tree",
                 dtype=jnp.float64) -> Trajectory:
    """Paths of the SDE that minibatch SGD at step eta and batch size B follows.

    The SDE and its derivation are in the module docstring: flow time t = k eta B / N for
    step k (the sum loss over each batch, drawn without replacement afresh at each step);
    drift the gradient flow's, diffusion sqrt(eta (N - B) / (N - 1)) G(w)^T dW with G the
    centred per-sample gradients and W an N-dimensional Brownian motion.

    Args:
        flow: `GradientFlow()` (the SDEs of the adaptive flows are not built yet).
        model, data, loss: as for `simulate`.
        t1: the end time (> 0); from t = 1 on the SDE runs in log t.
        batch_size: B, 1 <= B <= N (B = N: no noise, the paths are the flow's, solved by
            Euler-Maruyama).
        eta: the discrete run's learning rate (> 0).
        key: a PRNG key: the paths are fixed by (key, n_paths), and a finer grid
            (substeps, du) refines the same Brownian paths.
        n_paths: number of paths (integrated together: one state of shape (paths, p)).
        ts / n_save: save times in (0, t1] (default: n_save log-spaced times from
            min(t1, 1) / 100 to t1, plus t1).
        substeps: Euler-Maruyama steps per minibatch step in t (weak error O(dt)).
        du: the step in u = log t after t = 1 (default min(dt, 0.01): the early phase's
            resolution at t = 1, and at most 0.01 since the late drift is O(1) in u).
        brownian: "tree" (default: diffrax's VirtualBrownianTree; a finer grid refines the
            same paths) or "increments" (UnsafeBrownianPath: independent increments per
            step, fixed by the key and the grid, not refinable; measured 6x faster on the
            toy, where the tree's traversal is most of the cost).
    Returns:
        a Trajectory with a leading path axis (w (P, n, p), log_loss (P, n)); m = 0, h = 1,
        I = 0 (gradient flow); meta["kind"] = "sde" with eta, batch_size, n_paths.

    Example:
        >>> traj = simulate_sde(GradientFlow(), Linear(2, key=k), soudry_dataset(), 10.0,
        ...                     batch_size=1, eta=0.05, key=jax.random.key(1), n_paths=256)
    """
    if type(flow) is not GradientFlow:  # a subclass may change the field: no SDE for it
        raise NotImplementedError(
            f"simulate_sde: only GradientFlow (SGD) has its SDE so far, got "
            f"{type(flow).__name__}; the adaptive flows need the noise of their second-moment "
            "equation (docs/discrete.md, 'Minibatch runs and their SDE'). For their "
            "deterministic flow use simulate."
        )
    require_x64(dtype, "simulate_sde")
    objective = Objective(model, data, loss, where="simulate_sde")
    n = int(objective.data.X.shape[0])
    b = check_int(batch_size, "batch_size", "simulate_sde", 1, "pass a batch size in [1, N]")
    if b > n:
        raise ValueError(f"simulate_sde: `batch_size` must be at most the number of samples, "
                         f"{n}, got {b}.")
    n_paths = check_int(n_paths, "n_paths", "simulate_sde", 1, "pass e.g. n_paths=256")
    substeps = check_int(substeps, "substeps", "simulate_sde", 1, "pass e.g. substeps=4")
    eta = _positive(eta, "eta", "0.1")
    t1 = _positive(t1, "t1", "10.0")
    save = _save_times(ts, n_save, t1)
    if brownian not in ("tree", "increments"):
        raise ValueError(f"simulate_sde: `brownian` must be 'tree' or 'increments', got "
                         f"{brownian!r}.")
    tree = brownian == "tree"
    dt = eta * b / (n * substeps)
    du = min(dt, _DU_MAX) if du is None else _positive(du, "du", "0.01")
    start = time.perf_counter()
    obj = eqx.tree_at(lambda o: o.data.X, objective, objective.data.X.astype(dtype))
    w = jnp.broadcast_to(objective.w0().astype(dtype), (n_paths, objective.w0().shape[0]))
    scale = jnp.asarray(_noise_scale(n, b, eta), dtype)
    pieces, ok, steps = [], np.ones(n_paths, bool), 0
    phases = [(0.0, min(t1, 1.0), dt, save[save <= 1.0], False)]
    if t1 > 1.0:
        phases.append((0.0, math.log(t1), du, np.log(save[save > 1.0]), True))
    for k, (lo, hi, step, saves, log_time) in enumerate(phases):
        grid, saves = _grid(lo, hi, step, saves)
        at = np.unique(np.append(saves, hi))  # the phase's end carries the paths on
        ys, fine = _paths(obj, scale, w, jnp.asarray(grid, dtype), jnp.asarray(at, dtype),
                          jnp.asarray(log_time), jax.random.fold_in(key, k), tree)
        pieces.append(np.asarray(ys[:, : len(saves)]))
        w = ys[:, -1]
        ok &= np.asarray(fine)
        steps += len(grid) - 1
    w = np.concatenate(pieces, axis=1)
    log_loss = np.asarray(jax.jit(jax.vmap(jax.vmap(obj.log_loss)))(jnp.asarray(w)))
    wall = time.perf_counter() - start
    result = "successful" if ok.all() else "nonfinite_state"
    message = "" if ok.all() else (
        f"{int((~ok).sum())} of {n_paths} paths left the finite range; lower eta or raise "
        "substeps.")
    meta = {"kind": "sde", "flow": "gd", "hyper": {}, "eta": eta, "batch_size": b,
            "n_paths": n_paths, "substeps": substeps, "dt": dt, "du": du,
            "brownian": brownian,
            "noise_scale": float(scale), "t0": 0.0, "t1": t1, "dtype": np.dtype(dtype).name,
            "batch": True, "wall_time_s": wall, **objective.describe()}
    return Trajectory(ts=np.asarray(save), w=w, m=np.zeros_like(w),
                      conditioner=np.ones_like(w), log_loss=log_loss,
                      I=np.zeros(w.shape[:2]), stats={"num_steps": steps}, result=result,
                      message=message, meta=meta)
