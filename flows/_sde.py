"""`simulate_sde`: the stochastic modified equations minibatch runs follow (SGD first, then the
adaptive and momentum flows).

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
brownian="increments", an `UnsafeBrownianPath`: 6x cheaper, not refinable). The loop over
the grid runs a traced number of steps on a grid padded to a bucket of lengths, so a new
eta, t1 or set of save times reuses the compiled paths in a running process.

The adaptive flows (AdaGrad, RMSProp, Adam, with or without momentum, and the heavy-ball
MomentumFlow) follow `discrete.matching_optimizer(flow, eta)` run on minibatches, at flow time
t = k eta per step. The batch's gradient g_B has mean (B/N) grad L: the deterministic part is
the flow's field on the loss (B/N) L, except that the second moment takes in
E g_B^2 = (B/N)^2 g^2 + kappa sum_i c_i^2 (c_i the centred per-sample gradients, kappa
Cochran's B (N - B) / (N (N - 1))), an O(1) shift of its drift that no step size removes.
Per step each of w, m2 (the second moment) and m1 (the first) moves by eta times a
function of the batch, so their noise is first order as well:

    dw  = -h (B/N) grad L dt                       - sqrt(eta) h delta        (no momentum)
    dm2 = phi_2 + a2 kappa sum_i c_i^2 dt           + sqrt(eta) a2 (2 (B/N) grad L delta + Q)
    dm1 = phi_1                                     + sqrt(eta) a1 delta      (momentum)

with a2, a1 the rates at which m2 takes in g^2 and m1 takes in g (1 - b, 1 - b1; 1 for
AdaGrad), and (delta, Q) the Gaussian with the covariance of (g_B - (B/N) grad L,
g_B^2 - E g_B^2) over the draw of a batch (`_sampling.draw`: exact second moments of
sampling without replacement, O(N^2 p) work per step). With momentum w has no noise at
first order: it moves along m1. h uses m2 clipped at 0. m2 starts at 0 and is, for the first
k steps, an average of k squared batch gradients (relative spread 1/sqrt(k)); a Gaussian m2
then crosses 0 on many paths, whose h jumps to eps^{-1/2} (1/eps outside) where the run's
stays moderate: the variance of Adam's paths came out 1.6-1.9x the runs' at eta = 0.1-0.025.
So the first `exact_steps` (16) steps are the run's own, in flow variables, and the SDE
starts at t0 = 16 eta (-> 0 with eta; the first SDE steps err by O(eta / t), which may cost
a log(1/eta) factor). Later, m2's relative noise is
about sqrt(eta (1 - b) / 2) times that of g_B^2; where that is not small, m2 still crosses
0, and `stats["paths_m2_negative"]` counts the paths (with a warning). These SDEs run in t
up to t1 (no log time: the m-equation's decay makes a fixed step in log t unstable past
t ~ 1/(1 - b)), so the grid has t1 substeps / eta steps, the run's steps times `substeps`.
"""

from __future__ import annotations

import math
import time
import warnings

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from .._checks import check_int, require_x64
from .._precision import matmul_precision
from .._trajectory import Trajectory
from .._xla import FusionPinned
from ..models._objective import Objective
from . import _sampling
from ._flow import AbstractFlow, GradientFlow
from ._plan import _check_number

_DU_MAX = 0.01  # the largest step in log t: the late drift is O(1) per unit of u
# Minibatch steps taken exactly before an adaptive flow's SDE starts: the Gaussian model of
# the second moment needs it to be an average of many squared batch gradients (spread
# 1/sqrt(k) relative; docs/discrete.md, "The first steps").
_EXACT_STEPS = 16
# AdaGrad: with 16, the mean of log L(T) stayed 2.2-2.6e-3 off the runs' at eta = 0.0125 and
# 0.00625 (tests/test_sde_adaptive.py's problem); with 64 it is at the Monte Carlo level.
_EXACT_STEPS_SUM = 64


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


def _brownian(grid, n, shape, key, tree: bool):
    """Brownian motion of `shape` over grid[0..n]: a VirtualBrownianTree resolving the
    smallest step (refinable), or independent increments."""
    if tree:
        steps = jnp.diff(grid)
        smallest = jnp.min(jnp.where(jnp.arange(steps.shape[0]) < n, steps, jnp.inf))
        return dfx.VirtualBrownianTree(grid[0], grid[n], shape=shape, key=key, tol=smallest / 2)
    return dfx.UnsafeBrownianPath(shape=shape, key=key)


def _bucket(size: int, base: int, least: int) -> int:
    """The padded length of a grid or of a list of saves: the next power of `base`, at least
    `least`. The length is a shape of the compiled program, the number of steps is not: a new
    eta, T or set of save times reuses the program while the lengths stay in their bucket."""
    padded = least
    while padded < size:
        padded *= base
    return padded


def _on_grid(grid: np.ndarray, at: np.ndarray, dtype):
    """(padded grid, number of steps n, padded index of each save time on it): the
    arguments of `_euler` for the grid grid[0] < ... < grid[n] and the saves `at` (points
    of the grid). Padding repeats the last time; a padded save index is -1 (never hit). The
    grid is one time per step (padding it 8x costs little); the saves hold the paths' states,
    so they are padded to a power of 2 only."""
    padded = np.full(_bucket(len(grid), 8, 4096), grid[-1])
    padded[: len(grid)] = grid
    index = np.full(_bucket(len(at), 2, 16), -1)
    index[: len(at)] = np.searchsorted(grid, at)
    return jnp.asarray(padded, dtype), jnp.asarray(len(grid) - 1), jnp.asarray(index)


def _euler(terms, y0, args, grid, n, index, keep):
    """Euler-Maruyama on grid[0] < ... < grid[n]: diffrax's Euler step (its terms, its
    Brownian path) in a loop whose length n is traced, so that a new grid of the same padded
    length runs the same program (diffrax's own loop takes StepTo's ts as a shape: every new
    eta or T recompiled). Returns keep(t, y) at grid[index[j]] for each j (padded entries
    hold keep(grid[0], y0); the caller drops them)."""
    solver = dfx.Euler()
    saved = jax.tree.map(lambda x: jnp.broadcast_to(x, (index.shape[0], *x.shape)),
                         keep(grid[0], y0))
    last = index.shape[0] - 1

    def step(i, carry):
        y, saved, j = carry
        y = solver.step(terms, grid[i], grid[i + 1], y, args, None, made_jump=False)[0]
        hit = index[jnp.minimum(j, last)] == i + 1
        saved = jax.lax.cond(hit, lambda s: jax.tree.map(
            lambda a, x: a.at[j].set(x), s, keep(grid[i + 1], y)), lambda s: s, saved)
        return y, saved, j + hit

    j0 = jnp.sum(index == 0)  # saves at grid[0] hold y0 already
    return jax.lax.fori_loop(0, n, step, (y0, saved, j0))[1]


def _paths_traced(objective, scale, w0, grid, n, index, log_time, key, tree: bool):
    """All paths (w0: (paths, p)) on one grid (t, or u = log t) of n steps, saved at the
    grid points `index`. One Brownian motion of shape (paths, N): one tree traversal per step
    for all paths (tree), or independent increments (not tree)."""
    shape = jax.ShapeDtypeStruct((w0.shape[0], objective.data.X.shape[0]), w0.dtype)
    terms = dfx.MultiTerm(dfx.ODETerm(_drift),
                          dfx.ControlTerm(_diffusion, _brownian(grid, n, shape, key, tree)))
    ys = _euler(terms, w0, (objective, scale, log_time), grid, n, index, lambda t, y: y)
    return jnp.swapaxes(ys, 0, 1), jnp.all(jnp.isfinite(ys), axis=(0, 2))  # finite per path


# Trace counters (eqx.debug.get_num_traces): the tests check that a new eta, T or set of
# save times does not retrace the paths.
_paths_counted = eqx.debug.assert_max_traces(_paths_traced, max_traces=None)
_paths = FusionPinned(_paths_counted)  # `_xla`: long runs, on large batches of paths


class _Sampling(eqx.Module):
    """The draw of a batch: B / N, Cochran's kappa, the pair factor mu, sqrt(eta)."""

    frac: float = eqx.field(static=True)
    kappa: float = eqx.field(static=True)
    mu: float = eqx.field(static=True)
    scale: jax.Array


def _rates(flow, t, w, m):
    """(a2, a1) per coordinate: phi is affine in g^2 (m2) and in g (m1); these are its slopes,
    the rates at which m takes them in (1 - b, 1 - b1; 1 for AdaGrad; 0 where unused)."""
    zero = jnp.zeros_like(m)
    return flow.phi(t, zero, jnp.ones_like(w)) - flow.phi(t, zero, jnp.zeros_like(w))


def _moments(flow, objective, sampling, t, w, m):
    """Per path: (mean batch gradient (B/N) grad L, centred per-sample gradients c (N, p),
    E delta^2 = kappa sum_i c_i^2, h, the rates (a2, a1) at which m takes in g^2 and g)."""
    log_terms, jac = jax.jacrev(lambda v: (objective.log_terms(v),) * 2, has_aux=True)(w)[::-1]
    grads = jnp.exp(log_terms)[:, None].astype(w.dtype) * jac  # grad l_i = l_i grad log l_i
    g = jnp.sum(grads, axis=0)
    c = grads - g / grads.shape[0]
    mean = sampling.frac * g
    shift = sampling.kappa * jnp.sum(c * c, axis=0)
    # h sees E g_B^2 only through Adam's t = 0 limit psi(0) = g^2; m2 clipped at 0 (docstring)
    h = flow.h(t, flow.nonnegative(m), jnp.sqrt(mean * mean + shift))
    rates = _rates(flow, t, w, m)
    return mean, c, shift, h, rates


def _adaptive_drift(t, y, args):
    """Per path: (-h direction, phi + the second moment's shift a2 E delta^2, and 1 while
    some coordinate of m2 is below 0: the third component times how long the Gaussian
    model of m2 failed)."""
    flow, objective, sampling = args

    def one(w, m, _):
        mean, _, shift, h, rates = _moments(flow, objective, sampling, t, w, m)
        p = w.shape[0]
        dm = flow.phi(t, m, mean) + jnp.concatenate([rates[:p] * shift, jnp.zeros_like(m[p:])])
        negative = jnp.any(flow.split(m)[0] < 0) & jnp.any(rates[:p] != 0)
        return -h * flow.direction(t, m, mean), dm, negative.astype(w.dtype)

    return jax.vmap(one)(*y)


def _adaptive_diffusion(t, y, args):
    """The operator (z (paths, N)[, Z (paths, N, N)]) -> the paths' (dw, dm) noise."""
    flow, objective, sampling = args
    w, m, below = y
    n = objective.data.X.shape[0]

    def one(w, m, z, Z):
        mean, c, _, h, rates = _moments(flow, objective, sampling, t, w, m)
        delta, square = _sampling.draw(c, z, Z, sampling.kappa, sampling.mu, sampling.frac)
        p = w.shape[0]
        noise_m = rates[:p] * (2 * mean * delta + square)  # m2 takes in g_B^2
        if flow.n_moments == 2:  # m1 takes in g_B; w moves along m1, no noise of its own
            noise_m = jnp.concatenate([noise_m, rates[p:] * delta])
            noise_w = jnp.zeros_like(w)
        else:
            noise_w = -h * delta
        return sampling.scale * noise_w, sampling.scale * noise_m

    def apply(dW):
        z, Z = dW if sampling.mu > 0 else (dW[0], None)
        dw, dm = jax.vmap(one, in_axes=(0, 0, 0, 0 if Z is not None else None))(w, m, z, Z)
        return dw, dm, jnp.zeros_like(below)

    shapes = [jax.ShapeDtypeStruct((w.shape[0], n), w.dtype)]
    if sampling.mu > 0:
        shapes.append(jax.ShapeDtypeStruct((w.shape[0], n, n), w.dtype))
    return lx.FunctionLinearOperator(apply, tuple(shapes))


def _exact_steps_traced(flow, objective, sampling, eta, batch: int, w0, m0, key, steps: int):
    """The first `steps` minibatch steps themselves, in flow variables, per path: a batch
    S of B drawn afresh, g_B = sum_{i in S} grad l_i, then m += eta phi(t_k, m, g_B) and
    w -= eta h(m) direction(m, g_B): the run of matching_optimizer(flow, eta), Adam's
    corrections 1 - b^{k+1} included (at the t where c(t) equals them). Returns
    (w, m, h) after 0..steps steps, each (paths, steps + 1, ...)."""
    n, p = objective.data.X.shape[0], w0.shape[-1]
    rates = _rates(flow, 0.0, w0[0], m0[0])

    def corrected(k, at):
        """The time t at which Adam's c(t) = 1 - e^{-a t} equals the run's 1 - (1 - eta a)^{k+1}
        (a = rates[at]: m2's or m1's); the other flows do not read t there."""
        a = rates[at] if at < rates.shape[0] else 0.0
        safe = jnp.where(a > 0, a, 1.0)
        return jnp.where(a > 0, -(k + 1) * jnp.log1p(-eta * safe) / safe, (k + 1) * eta)

    def one(w, m, key):
        def step(carry, k):
            w, m = carry
            chosen = jax.random.permutation(jax.random.fold_in(key, k), n)[:batch]
            weights = jnp.zeros(n, w.dtype).at[chosen].set(1.0)
            log_terms, vjp = jax.vjp(objective.log_terms, w)
            g_b = vjp(weights * jnp.exp(log_terms).astype(w.dtype))[0]  # sum_S l_i grad log l_i
            t = k * eta
            m = m + eta * flow.phi(t, m, g_b)
            h = flow.h(corrected(k, 0), flow.nonnegative(m), g_b)
            w = w - eta * h * flow.direction(corrected(k, p), m, g_b)
            return (w, m), (w, m, h)

        _, (ws, ms, hs) = jax.lax.scan(step, (w, m), jnp.arange(steps))
        h0 = _moments(flow, objective, sampling, 0.0, w, m)[3]
        return tuple(jnp.concatenate([a[None], b]) for a, b in ((w, ws), (m, ms), (h0, hs)))

    return jax.vmap(one)(w0, m0, jax.random.split(key, w0.shape[0]))


# A minibatch run, as `discrete.run` is: its last bits follow the code generator (`_xla`).
_exact_steps = FusionPinned(_exact_steps_traced)


def _adaptive_paths_traced(flow, objective, sampling, w0, m0, grid, n, index, key,
                           tree: bool):
    """All paths of an adaptive flow's SDE (w0, m0: (paths, p), (paths, k p)) on one grid in
    t of n steps, saving (w, m, clock of m2 below 0, h) at the grid points `index`. Brownian
    motion: a pytree (z (paths, N)[, Z (paths, N, N)]), as a tree (refinable) or independent
    increments."""
    y0 = (w0, m0, jnp.zeros(w0.shape[0], w0.dtype))
    args = (flow, objective, sampling)
    shapes = _adaptive_diffusion(grid[0], y0, args).in_structure()
    terms = dfx.MultiTerm(dfx.ODETerm(_adaptive_drift), dfx.ControlTerm(
        _adaptive_diffusion, _brownian(grid, n, shapes, key, tree)))

    def keep(t, y):
        h = jax.vmap(lambda w, m: _moments(flow, objective, sampling, t, w, m)[3])(*y[:2])
        return (*y, h)

    w, m, below, h = (jnp.swapaxes(x, 0, 1) for x in _euler(terms, y0, args, grid, n, index,
                                                             keep))
    finite = jnp.all(jnp.isfinite(w), axis=(1, 2)) & jnp.all(jnp.isfinite(m), axis=(1, 2))
    return w, m, h, below, finite


_adaptive_paths_counted = eqx.debug.assert_max_traces(_adaptive_paths_traced, max_traces=None)
_adaptive_paths = FusionPinned(_adaptive_paths_counted)  # the classic emitters compile it 3x longer


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


def _save_times(ts, n_save: int, t1: float, t0: float = 0.0, eta: float = 1.0) -> np.ndarray:
    """The save times: `ts` checked, or n_save log-spaced from min(t1, 1) / 100 to t1, those
    before t0 (inside the exact steps) moved to the nearest step k eta, k >= 1."""
    if ts is None:
        n_save = check_int(n_save, "n_save", "simulate_sde", 1, "pass e.g. n_save=40")
        save = np.append(np.geomspace(min(t1, 1.0) / 100, t1, n_save), t1)
        early = save < t0
        save[early] = np.maximum(np.rint(save[early] / eta), 1) * eta
        return np.unique(np.round(save, 12))
    save = np.asarray(ts, np.float64).ravel()
    if save.size == 0 or not np.all(np.isfinite(save)) or save.min() <= 0 or save.max() > t1:
        raise ValueError(f"simulate_sde: `ts` must be finite save times in (0, t1 = {t1:g}], "
                         f"got {ts!r}.")
    return np.unique(save)


def simulate_sde(flow, model, data, t1: float, *, batch_size: int, eta: float, key,
                 n_paths: int, ts=None, n_save: int = 40, loss=None, substeps: int = 4,
                 du: float | None = None, brownian: str = "tree",
                 exact_steps: int | None = None, shard: bool = True,
                 dtype=jnp.float64) -> Trajectory:
    """Paths of the SDE that a minibatch run at step eta and batch size B follows.

    The SDEs and their derivation are in the module docstring. Batches of B of the N
    samples are drawn without replacement, afresh at each step, the loss summed over the
    batch (`discrete.run(..., batch_size=B, sampling="independent")`).
    - GradientFlow: SGD at learning rate eta, flow time t = k eta B / N; drift -grad L,
      diffusion sqrt(eta (N - B) / (N - 1)) G(w)^T dW (G the centred per-sample gradients,
      W an N-dimensional Brownian motion); log time after t = 1.
    - AdaGradFlow, RMSPropFlow, AdamFlow (bias_correction="ema", with or without b1),
      MomentumFlow: the run of `discrete.matching_optimizer(flow, eta)`, flow time t = k eta;
      drift the flow's field on the loss (B/N) L with the second moment's intake shifted by
      the batch variance, diffusion of (w, m) from the exact two moments of the draw.

    Args:
        flow: one of the flows above (Adam's "paper" correction follows no discrete run).
        model, data, loss: as for `simulate`.
        t1: the end time (> 0). GradientFlow runs in log t after t = 1; the other flows run
            in t throughout (t1 substeps / eta steps).
        batch_size: B, 1 <= B <= N (B = N: no noise, the paths are the flow's, solved by
            Euler-Maruyama).
        eta: GD's learning rate, or the flow time per step of the matching optimiser (> 0).
        key: a PRNG key: the paths are fixed by (key, n_paths), and a finer grid
            (substeps, du) refines the same Brownian paths.
        n_paths: number of paths (integrated together: one state of shape (paths, p)).
        ts / n_save: save times in (0, t1] (default: n_save log-spaced times from
            min(t1, 1) / 100 to t1, plus t1).
        substeps: Euler-Maruyama steps per minibatch step in t (weak error O(dt)).
        du: GradientFlow's step in u = log t after t = 1 (default min(dt, 0.01): the early
            phase's resolution at t = 1, and at most 0.01 since the late drift is O(1) in u).
        brownian: "tree" (default: diffrax's VirtualBrownianTree; a finer grid refines the
            same paths) or "increments" (UnsafeBrownianPath: independent increments per
            step, fixed by the key and the grid, not refinable; measured 6x faster on the
            toy, where the tree's traversal is most of the cost).
        exact_steps: adaptive flows: the first k minibatch steps are taken as the run takes
            them (in flow variables), and the SDE starts at t0 = k eta (default 16 for
            RMSProp and Adam, 64 for AdaGrad, 0 for MomentumFlow): the Gaussian model of
            the second moment fails while it averages few squared batch gradients.
        shard: split the paths over the local devices when there are several and they
            divide n_paths (meta["devices"] says how many were used).
        dtype: jnp.float64 (default) or jnp.float32 (traced at JAX's matmul precision
            "highest" unless you set one: GPUs round float32 products to TF32 by default).
    Returns:
        a Trajectory with a leading path axis: w (P, n, p), m (P, n, k p), conditioner h
        (P, n, p), log_loss (P, n) of the full loss L; I = 0 (Lemma 3's penalty is not
        tracked on paths); meta["kind"] = "sde" with eta, batch_size, n_paths. m and h at
        t = k eta are the state after k steps (`run` records at step k the state after
        k + 1: its n and h have taken in step k's gradient).

    Example:
        >>> traj = simulate_sde(GradientFlow(), Linear(2, key=k), soudry_dataset(), 10.0,
        ...                     batch_size=1, eta=0.05, key=jax.random.key(1), n_paths=256)
    """
    if not isinstance(flow, AbstractFlow):
        raise TypeError(f"simulate_sde: `flow` must be a marginflow flow, got "
                        f"{type(flow).__name__}.")
    gd = type(flow) is GradientFlow
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
    if not gd:
        from ..discrete import matching_optimizer  # refuses Adam's "paper" correction, by name

        try:
            matching_optimizer(flow, eta)
        except ValueError as err:  # the run this SDE would model does not exist
            raise ValueError(f"simulate_sde: no minibatch run to model: {err}") from None
    if exact_steps is None:  # AdaGrad's m2 (a sum, no decay) needs more: _EXACT_STEPS_SUM
        exact_steps = 0 if not flow.has_conditioner else (
            _EXACT_STEPS if flow.has_decay else _EXACT_STEPS_SUM)
    k = check_int(exact_steps, "exact_steps", "simulate_sde", 0, "pass e.g. exact_steps=16")
    if gd and k:
        raise ValueError("simulate_sde: `exact_steps` is for the adaptive flows (GradientFlow "
                         f"has no second moment to start), got {k}; leave it unset.")
    k = min(k, math.floor(t1 / eta + 1e-9))
    save = _save_times(ts, n_save, t1, min(k * eta, t1), eta)
    if brownian not in ("tree", "increments"):
        raise ValueError(f"simulate_sde: `brownian` must be 'tree' or 'increments', got "
                         f"{brownian!r}.")
    tree = brownian == "tree"
    dt = (eta * b / n if gd else eta) / substeps
    du = min(dt, _DU_MAX) if du is None else _positive(du, "du", "0.01")
    start = time.perf_counter()
    obj = objective.in_dtype(dtype)
    w0 = jnp.broadcast_to(objective.w0().astype(dtype), (n_paths, objective.w0().shape[0]))
    devices = jax.local_devices() if shard else jax.local_devices()[:1]
    if len(devices) > 1 and n_paths % len(devices) == 0:  # split the paths over the devices
        mesh = jax.sharding.Mesh(np.asarray(devices), ("paths",))
        w0 = jax.device_put(w0, jax.sharding.NamedSharding(mesh,
                                                           jax.sharding.PartitionSpec("paths")))
    else:
        devices = devices[:1]
    stats = {}
    with matmul_precision(dtype):  # float32: no TF32 on GPUs (_precision.py)
        if gd:
            scale = _noise_scale(n, b, eta)
            w, m, h, ok, steps = _gd_paths(obj, w0, scale, t1, dt, du, save, key, tree, dtype)
            extra = {"noise_scale": scale, "du": du}
        else:
            sampling = _Sampling(b / n, _sampling.cochran(n, b), _sampling.pair_factor(n, b),
                                 jnp.asarray(math.sqrt(eta), dtype))
            flow = jax.tree_util.tree_map(
                lambda x: jnp.asarray(x, dtype) if eqx.is_inexact_array(x) else x, flow)
            w, m, h, ok, below, steps = _adaptive(flow, obj, sampling, eta, b, w0, k, t1, dt,
                                                  save, key, tree, dtype)
            extra = {"kappa": sampling.kappa, "pair_factor": sampling.mu, "exact_steps": k}
            stats["paths_m2_negative"] = int(np.sum(below > 0))
            stats["max_time_m2_negative"] = float(np.max(below, initial=0.0))
        log_loss = np.asarray(_log_losses(obj, jnp.asarray(w)))
    wall = time.perf_counter() - start
    result = "successful" if ok.all() else "nonfinite_state"
    message = "" if ok.all() else (
        f"{int((~ok).sum())} of {n_paths} paths left the finite range; lower eta or raise "
        "substeps.")
    if stats.get("paths_m2_negative"):  # the SDE's Gaussian m2 is outside its validity
        message = (message + " " if message else "") + (
            f"m2 went below 0 on {stats['paths_m2_negative']} of {n_paths} paths (one spent a "
            f"time {stats['max_time_m2_negative']:.3g} there), where h was clipped: the "
            "second moment's relative noise, about sqrt(eta (1 - b) / 2) times the relative "
            "spread of g_B^2, is too large for a Gaussian model; lower eta.")
        warnings.warn(f"simulate_sde: {message}", stacklevel=2)
    meta = {"kind": "sde", "flow": flow.name, "hyper": flow.hyperparameters(),
            "eps_placement": flow.eps_placement, "eta": eta, "batch_size": b,
            "n_paths": n_paths, "substeps": substeps, "dt": dt, "brownian": brownian,
            **extra, "devices": len(devices), "t0": 0.0, "t1": t1, "dtype": np.dtype(dtype).name,
            "batch": True, "wall_time_s": wall, **objective.describe()}
    return Trajectory(ts=np.asarray(save), w=w, m=m, conditioner=h, log_loss=log_loss,
                      I=np.zeros(w.shape[:2]), stats={"num_steps": steps, **stats},
                      result=result,
                      message=message, meta=meta)


@eqx.filter_jit
def _log_losses(objective, w):
    """log L at each path's saves, w: (paths, saves, p) (one program per shape, not per call)."""
    return jax.vmap(jax.vmap(objective.log_loss))(w)


def _gd_paths(obj, w, scale, t1, dt, du, save, key, tree, dtype):
    """SGD's SDE: in t up to min(t1, 1), then in log t. Returns (w, m = 0, h = 1, ok, steps)."""
    scale = jnp.asarray(scale, dtype)
    n_paths = w.shape[0]
    pieces, ok, steps = [], np.ones(n_paths, bool), 0
    phases = [(0.0, min(t1, 1.0), dt, save[save <= 1.0], False)]
    if t1 > 1.0:
        phases.append((0.0, math.log(t1), du, np.log(save[save > 1.0]), True))
    for k, (lo, hi, step, saves, log_time) in enumerate(phases):
        grid, saves = _grid(lo, hi, step, saves)
        at = np.unique(np.append(saves, hi))  # the phase's end carries the paths on
        ys, fine = _paths(obj, scale, w, *_on_grid(grid, at, dtype), jnp.asarray(log_time),
                          jax.random.fold_in(key, k), tree)
        pieces.append(np.asarray(ys[:, : len(saves)]))
        w = ys[:, len(at) - 1]
        ok &= np.asarray(fine)
        steps += len(grid) - 1
    w = np.concatenate(pieces, axis=1)
    return w, np.zeros_like(w), np.ones_like(w), ok, steps


def _adaptive(flow, obj, sampling, eta, b, w0, k, t1, dt, save, key, tree, dtype):
    """k exact minibatch steps, then the SDE from t0 = k eta to t1. Saves at t <= t0 are
    states of the exact steps (multiples of eta); the others come from the SDE."""
    key_steps, key_sde = jax.random.split(key)
    _, m0 = flow.init_state(w0)
    t0 = k * eta
    early = save[save <= t0 * (1 + 1e-12)]
    index = np.rint(early / eta).astype(int)
    off = np.abs(index * eta - early) > 1e-9 * max(1.0, t0)
    if np.any(off):
        raise ValueError(
            f"simulate_sde: save times up to t0 = {t0:g} fall in the {k} exact minibatch steps "
            f"and must be multiples of eta = {eta:g}, got {early[off].tolist()}; pass later "
            "times or exact_steps=0.")
    ws, ms, hs = _exact_steps(flow, obj, sampling, jnp.asarray(eta, dtype), b, w0, m0,
                              key_steps, k)
    w, m, h = (np.asarray(x)[:, index] for x in (ws, ms, hs))
    ok = np.all(np.isfinite(ws[:, -1]), axis=-1) & np.all(np.isfinite(ms[:, -1]), axis=-1)
    late = save[save > t0 * (1 + 1e-12)]
    if late.size == 0:
        return w, m, h, np.asarray(ok), np.zeros(w.shape[0]), k
    grid, at = _grid(t0, late[-1], dt, late)  # (nothing to save after the last save)
    wl, ml, hl, below, fine = _adaptive_paths(flow, obj, sampling, ws[:, -1], ms[:, -1],
                                              *_on_grid(grid, at, dtype), key_sde, tree)
    cat = [np.concatenate([a, np.asarray(x)[:, : len(at)]], axis=1)
           for a, x in ((w, wl), (m, ml), (h, hl))]
    return (*cat, np.asarray(ok) & np.asarray(fine), np.asarray(below)[:, len(at) - 1],
            k + len(grid) - 1)
