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
The gradient of unit j's weights carries the factor of its outgoing weights (a_j in a
two-layer net) on both sides, so a sliding surface turns repelling where a_j changes sign
while the run slides on it.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._records import record_repr
from ..models import MLP, unflatten
from ..models._mlp import _activation
from ._common import trajectory_objective

KINDS = ("crossing", "sliding", "repelling")
# States per compiled gradient call: one program for any number of pairs and saves.
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
    kind: np.ndarray  # (N,) 0 crossing, 1 sliding, 2 repelling (KINDS)
    band: float = eqx.field(static=True)

    __repr__ = record_repr

    def kinds(self) -> list[str]:
        """`kind` in words."""
        return [KINDS[k] for k in self.kind]

    def branch_points(self) -> list[tuple[float, int, int]]:
        """(t, unit, sample) wherever a pair's surface was sliding at one save and repels at
        the next (consecutive saves, the pair examined at both), in time order: the run was
        on the surface when it turned repelling, and from there the Filippov solution is
        not unique (module docstring). A surface that repels a state which has just crossed
        it is no branch: that state is off it, on one side."""
        last = {}  # (unit, sample) -> (save, kind) where last examined
        out = []
        for k in np.argsort(self.save, kind="stable"):
            pair = (int(self.unit[k]), int(self.sample[k]))
            before = last.get(pair)
            if before == (self.save[k] - 1, 1) and self.kind[k] == 2:
                out.append((float(self.ts[k]), *pair))
            last[pair] = (int(self.save[k]), int(self.kind[k]))
        return out


@eqx.filter_jit
def _one_sided_grads(objective, ws, sample, unit, slope):
    """grad L at each w of `ws` with the first-layer activation of (sample, unit) taken on
    its linear piece of the given slope (1 above the surface; 0, or leaky ReLU's slope,
    below) and every other activation as at w: the field's value on that side."""
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

    def grad(w, i, j, s):
        log_l, g = jax.value_and_grad(log_loss)(w, i, j, s)
        return jnp.exp(log_l) * g

    return jax.vmap(grad)(ws, sample, unit, slope)


def switching_surfaces(traj, model, data, *, band: float = 1e-3) -> SwitchingSurfaces:
    """Classify the first-layer switching surfaces near each saved state of a run.

    For each save k, hidden unit j of the first layer and sample i with
    |<w_j, x_i>| <= band |w_j| |x_i|, the normal velocities dz_ji/dt = -<h_j * g_j, x_i>
    on both sides of the surface: g = grad L at the saved w with that one activation taken
    on its linear piece above the surface (slope 1) or below it (0; leaky ReLU's slope),
    every other activation as at w, and h the saved conditioner. Each triple is then
    crossing, sliding (both sides push onto the surface) or repelling (both push away; the
    flow branches there). Two gradients per triple, in one compiled program.

    Where to use it: two runs of a ReLU MLP that disagree by more than their kink_tol (at
    tau and tau/10, or a flow and its discrete optimiser) may have taken different branches
    of a flow that is not unique. Save densely (`ts=`) over the time where they part and
    call this on either run: `branch_points()` names the surface.

    Args:
        traj: a Trajectory of a flow without momentum (simulate, or discrete.run, whose
            saved h is the flow's up to a positive factor: the signs are the same), one run
            (traj.member(b) of a batch).
        model, data: the MLP (ReLU or leaky ReLU) and data set of the run.
        band: the relative distance |z_ji| / (|w_j| |x_i|) within which a triple is
            examined (> 0; a run's kink steps keep a sliding state within about kink_tol).

    Returns:
        SwitchingSurfaces with one entry per triple found, in save order.
    """
    where = "switching_surfaces"
    if not (isinstance(model, MLP) and model.piecewise_linear):
        raise ValueError(
            f"{where}: needs a ReLU or leaky-ReLU MLP, whose first-layer switching surfaces "
            f"are the hyperplanes <w_j, x_i> = 0; got {type(model).__name__}"
            + (f" with activation {model.activation!r}" if isinstance(model, MLP) else "")
            + ". The toy and the CNN are not covered."
        )
    objective = trajectory_objective(traj, model, data, where)
    if traj.batched:
        raise ValueError(f"{where}: the trajectory is batched; pass one member, "
                         "traj.member(b).")
    if traj.m1 is not None:
        raise ValueError(
            f"{where}: the run has first moments (a momentum flow): its dw/dt is the "
            "integrated momentum, continuous across the surfaces, so it neither slides on "
            "them nor branches there. Only flows with dw/dt = -h * grad L are covered."
        )
    band = float(band)
    if not np.isfinite(band) or band <= 0:
        raise ValueError(f"{where}: `band` must be a finite number > 0, got {band!r}; "
                         "e.g. band=1e-3.")
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
        z = w1 @ X.T
        for j, i in zip(*np.nonzero(np.abs(z) <= band * scale), strict=True):
            if scale[j, i] > 0:  # a dead unit (w_j = 0) has no surface
                found.append((k, j, i, z[j, i] / scale[j, i]))
    n = len(found)
    # Two evaluations per triple (above, below), in chunks of one compiled size.
    rows = [(k, j, i, s) for k, j, i, _ in found for s in (1.0, below_slope)]
    g = np.zeros((2 * n, p))
    for start in range(0, 2 * n, _CHUNK):
        chunk = rows[start:start + _CHUNK]
        chunk = chunk + [chunk[-1]] * (_CHUNK - len(chunk))
        k, j, i, s = (np.array(c) for c in zip(*chunk, strict=True))
        out = _one_sided_grads(objective, jnp.asarray(w_all[k]), jnp.asarray(i),
                               jnp.asarray(j), jnp.asarray(s, np.float64))
        g[start:start + _CHUNK] = np.asarray(out)[:min(_CHUNK, 2 * n - start)]
    save, unit, sample, zrel = (np.array([f[c] for f in found]) for c in range(4))
    velocity = np.empty((n, 2))
    for r, (k, j, i, _) in enumerate(found):
        for s in range(2):
            velocity[r, s] = -(h_all[k][index[j]] * g[2 * r + s][index[j]]) @ X[i]
    above, below = velocity[:, 0], velocity[:, 1]
    kind = np.where((above < 0) & (below > 0), 1, np.where((above > 0) & (below < 0), 2, 0))
    as_int = (lambda a: a.astype(np.int64)) if n else (lambda a: np.zeros(0, np.int64))
    return SwitchingSurfaces(
        ts=np.asarray(traj.ts, np.float64)[as_int(save)], save=as_int(save),
        unit=as_int(unit), sample=as_int(sample),
        z=zrel.astype(np.float64) if n else np.zeros(0), above=above, below=below,
        kind=kind.astype(np.int64), band=band,
    )
