"""The switching surfaces of a ReLU MLP along a run: where the flow crosses them, slides on
them, or meets one that repels and so stops being unique (docs/solvers.md, "Where the flow
branches").

A first-layer hidden unit j of a ReLU (or leaky-ReLU) MLP switches on sample i across the
hyperplane z_ji = <w_j, x_i> = 0 of parameter space; grad L jumps there. For a flow whose
velocity is dw/dt = -h * grad L (GD, AdaGrad, RMSProp, Adam without momentum; h > 0 the
conditioner, which depends on the moments, not on w), the surface's normal velocity
dz_ji/dt = -<h_j * g_j, x_i> has one value just above it (z > 0) and another just below.
Filippov's classification of the surface at that state:
- both push the same way: the solution crosses;
- above < 0 < below, both push onto it: the solution slides along it (sliding mode);
- above > 0 > below, both push away: the surface repels, and a Filippov solution may stay
  on it or leave it on either side at any time. The flow is not unique from there, and two
  runs whose errors differ (another kink_tol, rtol or solver; a discrete optimiser's step)
  may take different branches.
In a two-layer net with one output, the gradient of w_j carries the factor a_j, the unit's
output weight, on both sides, so a sliding surface turns repelling where a_j changes sign
while the run slides on it (deeper nets and several outputs: a vector of weights instead).
In a deeper net only the first layer's surfaces are examined (a later layer's are not
hyperplanes of w): every later activation is taken as it is at the saved state, so a state
that also sits on a later layer's surface is classified on one side of it, unflagged.

Each surface is classified with every other activation as it is at the saved state. Where
two surfaces of one unit meet (a junction: the state also slides on, or is repelled by,
another sample's surface of the same unit within the band), which side of that other
surface the state is on is a matter of rounding, so the classification is not reliable;
such triples are flagged and never make a branch point. Runs can also part at a junction
without any surface repelling (a place where several surfaces are crossed at once is one
too); such places are found by comparing runs, not by this classification.
"""

from __future__ import annotations

from collections import Counter

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._records import record_repr
from ..models import MLP, unflatten
from ..models._mlp import _activation
from ._common import trajectory_objective

KINDS = ("crossing", "sliding", "repelling")
# States per compiled call: one program for any number of triples and saves.
_CHUNK = 64


class SwitchingSurfaces(eqx.Module):
    """The (save, unit, sample) triples found within `band` of their switching surface, one
    entry per triple (see `switching_surfaces`), and the branch points among them."""

    ts: np.ndarray  # (N,) the save's time
    save: np.ndarray  # (N,) the save's index in the trajectory
    unit: np.ndarray  # (N,) the first-layer hidden unit j
    sample: np.ndarray  # (N,) the sample i
    z: np.ndarray  # (N,) <w_j, x_i> / (|w_j| |x_i|) at the save
    above: np.ndarray  # (N,) dz_ji/dt on the surface's side z > 0
    below: np.ndarray  # (N,) dz_ji/dt on its side z < 0
    kind: np.ndarray  # (N,) 0 crossing, 1 sliding, 2 repelling (KINDS), from the signs of
    # the sides' velocities before the factor L (which can underflow both to 0 late in
    # training); a side exactly 0: crossing
    junction: np.ndarray  # (N,) the state also slides on or is repelled by another surface of j
    band: float = eqx.field(static=True)

    __repr__ = record_repr

    def kinds(self) -> list[str]:
        """`kind` in words."""
        return [KINDS[k] for k in self.kind]

    def branch_points(self) -> list[tuple[float, int, int]]:
        """(t, unit, sample), in time order, wherever a pair's surface slid at two
        consecutive saves and repels at the next, none of the three at a junction; t is the
        first save at which it repels. The run was then on the surface (within the band)
        when it turned repelling, and from there the Filippov solution is not unique
        (module docstring). A surface that repels a state which has just crossed it is no
        branch: that state is off it, on one side. Saves too sparse for the run to be seen
        sliding twice, or a state still approaching the surface at both saves, can hide or
        feign one: read `z` at those saves, and save densely where it matters."""
        history = {}  # (unit, sample) -> [(save, kind), ...] where examined off junctions
        out = []
        for k in np.argsort(self.save, kind="stable"):
            if self.junction[k]:
                continue
            pair = (int(self.unit[k]), int(self.sample[k]))
            seen = history.setdefault(pair, [])
            s = int(self.save[k])
            if self.kind[k] == 2 and seen[-2:] == [(s - 2, 1), (s - 1, 1)]:
                out.append((float(self.ts[k]), *pair))
            seen.append((s, int(self.kind[k])))
        return out


@eqx.filter_jit
def _one_sided(objective, ws, hs, sample, unit, slope):
    """(log L, u) at each state of `ws`, with the first-layer activation of (sample, unit)
    on its linear piece of the given slope (1 above the surface; 0, or leaky ReLU's slope,
    below) and every other activation as at w: the field's value on that side is
    dz/dt = L u, u = -<h_j * (grad log L)_j, x_i> (L factored out: it underflows late in
    training, and u keeps the sign)."""
    X = objective.data.X.reshape(objective.data.X.shape[0], -1)

    def log_loss(w, i, j, s):
        model = objective.unravel(w)
        act, _ = _activation(model.activation)
        z = X.astype(w.dtype) @ model.weights[0].T  # (n, width)
        forced = jnp.zeros_like(z, dtype=bool).at[i, j].set(True)
        a = jnp.where(forced, s * z, act(z))
        for W in model.weights[1:-1]:
            a = act(a @ W.T)
        out = a @ model.weights[-1].T
        return objective.loss.log_loss(out[:, 0] if model.out_dim == 1 else out,
                                       objective.data.y)

    def velocity(w, h, i, j, s):
        log_l, g = jax.value_and_grad(log_loss)(w, i, j, s)
        g_j = objective.unravel(g).weights[0][j]
        h_j = objective.unravel(h).weights[0][j]
        return log_l, -(h_j * g_j) @ X[i].astype(w.dtype)

    return jax.vmap(velocity)(ws, hs, sample, unit, slope)


def _is_momentum_run(traj) -> bool:
    # A flow's run keeps its first moments in m; a discrete run keeps only h's moments and
    # names its flow ('momentum', or Adam's b1) and, always, its optimiser's own
    # hyper-parameters (b1, or heavy ball's momentum), read here in case no flow matched.
    meta = traj.meta
    hyper = {**(meta.get("optimizer_hyper") or {}), **(meta.get("hyper") or {})}
    return (traj.m1 is not None or meta.get("flow") == "momentum"
            or any(float(hyper.get(k) or 0.0) != 0.0 for k in ("b1", "momentum")))


def switching_surfaces(traj, model, data, *, band: float = 1e-3) -> SwitchingSurfaces:
    """Classify the first-layer switching surfaces near each saved state of a run.

    For each save k, hidden unit j of the first layer and sample i with
    |<w_j, x_i>| <= band |w_j| |x_i|, the normal velocities dz_ji/dt = -<h_j * g_j, x_i>
    on both sides of the surface: g = grad L at the saved w with that one activation taken
    on its linear piece above the surface (slope 1) or below it (0; leaky ReLU's slope),
    every other activation as at w, and h the saved conditioner. Each triple is then
    crossing, sliding (both sides push onto the surface) or repelling (both push away; the
    flow branches there), and flagged as a junction where the state also slides on, or is
    repelled by, another sample's surface of the same unit (there the classification is
    unreliable). Two
    gradients per triple, in one compiled program.

    Where to use it: two runs of a ReLU MLP that disagree by more than their kink_tol (at
    tau and tau/10, or a flow and its discrete optimiser) may have taken different branches
    of a flow that is not unique. Save densely (`ts=`) over the time where they part and
    call this on either run: `branch_points()` names the surface.

    Args:
        traj: a Trajectory of a flow without momentum (simulate, or discrete.run, whose
            saved h is the flow's up to a positive factor: the signs are the same), one run
            (traj.member(b) of a batch).
        model, data: the MLP (ReLU or leaky ReLU, depth >= 2) and data set of the run.
        band: the relative distance |z_ji| / (|w_j| |x_i|) within which a triple is
            examined (> 0). A kink step's error is bounded relative to the whole state,
            not to |w_j|: a small unit may slide farther from its surface than kink_tol
            relative, so if a sliding phase seen in the runs is missing here, widen it.

    Returns:
        SwitchingSurfaces with one entry per triple found, in save order.
    """
    where = "switching_surfaces"
    if not isinstance(model, MLP):
        raise ValueError(
            f"{where}: needs a ReLU or leaky-ReLU MLP, whose first-layer switching surfaces "
            f"are the hyperplanes <w_j, x_i> = 0; got {type(model).__name__}. The toy and "
            "the CNN are not covered."
        )
    if not model.piecewise_linear:
        why = (f"depth {model.depth} has no hidden units" if model.depth < 2 else
               f"activation {model.activation!r} is smooth (no switching surfaces)")
        raise ValueError(f"{where}: needs a ReLU or leaky-ReLU MLP of depth >= 2; this MLP's "
                         f"{why}. Pass the model the run was computed with.")
    objective = trajectory_objective(traj, model, data, where)
    if traj.batched:
        raise ValueError(f"{where}: the trajectory is batched; pass one member, "
                         "traj.member(b).")
    if traj.meta.get("kind") == "sde" or traj.meta.get("batch_size") is not None:
        raise ValueError(
            f"{where}: the run is a minibatch one (traj.meta: kind {traj.meta.get('kind')!r}, "
            f"batch_size {traj.meta.get('batch_size')}): it follows a stochastic flow, to "
            "which the surfaces' sliding and branching do not apply. Pass a flow's run "
            "(simulate) or a full-batch discrete run (discrete.run without batch_size)."
        )
    if _is_momentum_run(traj):
        raise ValueError(
            f"{where}: the run has momentum (traj.meta: flow {traj.meta.get('flow')!r}, "
            f"hyper {traj.meta.get('hyper')}): its dw/dt is the integrated momentum, "
            "continuous across the surfaces, so it neither slides on them nor branches "
            "there. Only runs with dw/dt = -h * grad L are covered (b1 = 0)."
        )
    try:
        band = float(band)
    except (TypeError, ValueError):
        band = float("nan")
    if not np.isfinite(band) or band <= 0:
        raise ValueError(f"{where}: `band` must be a finite number > 0 (a relative "
                         f"distance), got {band!r}; e.g. band=1e-3.")
    p = traj.w.shape[-1]
    # The positions of the first layer's weights in the flat w: unflatten the positions.
    index = np.asarray(unflatten(model, jnp.arange(p, dtype=jnp.float64)).weights[0])
    index = index.astype(np.int64)  # (width, in)
    X = np.asarray(data.X, np.float64).reshape(len(data), -1)
    x_norm = np.linalg.norm(X, axis=1)
    w_all = np.asarray(traj.w, np.float64)
    h_all = np.asarray(traj.h(), np.float64)
    act, _ = _activation(model.activation)
    below_slope = -float(act(jnp.asarray(-1.0)))  # 0 (ReLU) or the leaky slope

    found = []  # (save, unit, sample, z relative)
    for k in range(len(traj)):
        w1 = w_all[k][index]
        scale = np.linalg.norm(w1, axis=1)[:, None] * x_norm[None, :]
        near = (np.abs(w1 @ X.T) <= band * scale) & (scale > 0)  # a dead unit: no surface
        for j, i in zip(*np.nonzero(near), strict=True):
            found.append((k, j, i, (w1[j] @ X[i]) / scale[j, i]))
    n = len(found)
    # Two evaluations per triple (above, below), in chunks of one compiled size.
    rows = [(k, j, i, s) for k, j, i, _ in found for s in (1.0, below_slope)]
    log_l, u = np.zeros(2 * n), np.zeros(2 * n)
    for start in range(0, 2 * n, _CHUNK):
        chunk = rows[start:start + _CHUNK]
        chunk = chunk + [chunk[-1]] * (_CHUNK - len(chunk))
        k, j, i, s = (np.array(c) for c in zip(*chunk, strict=True))
        out = _one_sided(objective, jnp.asarray(w_all[k]), jnp.asarray(h_all[k]),
                         jnp.asarray(i), jnp.asarray(j), jnp.asarray(s, np.float64))
        stop = min(_CHUNK, 2 * n - start)
        log_l[start:start + stop] = np.asarray(out[0])[:stop]
        u[start:start + stop] = np.asarray(out[1])[:stop]
    u_above, u_below = u[0::2], u[1::2]
    kind = np.where((u_above < 0) & (u_below > 0), 1,
                    np.where((u_above > 0) & (u_below < 0), 2, 0))
    velocity = np.exp(log_l) * u
    save, unit, sample, zrel = (np.array([f[c] for f in found]) for c in range(4))
    # A junction: the same unit's surface for another sample is one the state sits on (it
    # slides on it or it repels), so which side of it the state is on is a matter of
    # rounding, and this triple's fields were read on one side only. A surface the state
    # is crossing is no junction: the state is on a definite side of it.
    on = Counter((int(save[r]), int(unit[r])) for r in range(n) if kind[r] != 0)
    junction = np.array([on[int(save[r]), int(unit[r])] > (kind[r] != 0) for r in range(n)],
                        dtype=bool)
    return SwitchingSurfaces(
        ts=np.asarray(traj.ts, np.float64)[save.astype(np.int64)],
        save=save.astype(np.int64), unit=unit.astype(np.int64),
        sample=sample.astype(np.int64), z=zrel.astype(np.float64),
        above=velocity[0::2], below=velocity[1::2], kind=kind.astype(np.int64),
        junction=junction.astype(bool), band=band,
    )
