"""Figures of the README's "checking the theory" table (issue 4): RMSProp flow (eps 1e-5, b 0.9), Linear, soudry_dataset(0).

Usage: python benchmarks/soudry_kkt_figures.py 1e300   (prints the table and the fits)
Not a timing benchmark: a measurement script, kept here with the other scripts.
"""

import sys
import time
import warnings

warnings.filterwarnings("ignore")
import jax
import numpy as np
from marginflow.analysis import (
    angle,
    conditioner_limit,
    kkt_residual,
    max_margin_linear,
    monotone_quantity,
    rate_fit,
)
from marginflow.flows import RMSPropFlow, simulate
from marginflow.models import Linear, soudry_dataset

t1 = float(sys.argv[1]) if len(sys.argv) > 1 else 1e14
data = soudry_dataset(0)
model = Linear(2, key=jax.random.key(0))
dec = int(np.log10(t1))
ts = np.concatenate([[0.0], np.logspace(-2, dec, 4 * (dec + 2) + 1)])
start = time.time()
traj = simulate(RMSPropFlow(1e-5, 0.9), model, data, t1, ts=ts, throw=False)
print(
    f"simulate to {t1:.0e}: {time.time() - start:.1f} s, result {traj.result}, reached t = {traj.ts[-1]:.3g}, steps {traj.stats['num_steps']}"
)
u = np.ones(2) / np.sqrt(2)
ref = max_margin_linear(data.X, data.y)
print(
    "max_margin_linear direction",
    ref.direction,
    "margin",
    ref.margin,
    "(sqrt 2 =",
    np.sqrt(2),
    ")",
    "verified",
    ref.verified,
)
want = [1e5, 1e10, 1e12, 1e15, 1e20, 1e30, 1e50, 1e100, 1e200, 1e300]
rows = []
for t in want:
    i = int(np.argmin(np.abs(traj.ts - t)))
    if abs(traj.ts[i] / t - 1) > 1e-9:
        continue
    k = kkt_residual(model, data, traj.w[i])
    a = angle(traj.w[i], u)
    rows.append((traj.ts[i], a, k.residual_best, k.eps_paper_rel, k.delta_paper))
    print(
        f"t = {traj.ts[i]:.0e}: angle {a:.3e} rad, best KKT residual {k.residual_best:.3e} (eps {k.eps_best_rel:.2e}, delta {k.delta_best:.2e}), paper eps_rel {k.eps_paper_rel:.3e}, paper delta {k.delta_paper:.3e}"
    )
# Fits of the angle over t >= 1e4
# Fits over [1e4, the last save where the angle is above rounding (1e-13 rad)].
a_all = angle(traj.w, u)
last = np.nonzero(a_all > 1e-13)[0][-1]
sel = (traj.ts >= 1e4) & (np.arange(traj.ts.size) <= last)
t = traj.ts[sel]
a = a_all[sel]
X = np.stack([1 / np.log(t)], 1)
c, res, *_ = np.linalg.lstsq(X, a, rcond=None)
print(
    f"{sel.sum()} saves; fit angle = c / log t over [1e4, {t[-1]:.0e}]: c = {c[0]:.3e}, rel. rms misfit {np.sqrt(np.mean((X @ c - a) ** 2)) / np.sqrt(np.mean(a**2)):.2f}"
)
X2 = np.stack([1 / np.log(t), np.ones_like(t)], 1)
c2, *_ = np.linalg.lstsq(X2, a, rcond=None)
print(
    f"fit angle = c / log t + d: c = {c2[0]:.3e}, d = {c2[1]:.3e}, rel. rms misfit {np.sqrt(np.mean((X2 @ c2 - a) ** 2)) / np.sqrt(np.mean(a**2)):.2f}"
)
p = np.polyfit(np.log(t), np.log(a), 1)
print(
    f"power-law fit angle ~ C t^p: p = {p[0]:.4f}, C = {np.exp(p[1]):.3e}, rms misfit of log angle {np.sqrt(np.mean((np.polyval(p, np.log(t)) - np.log(a)) ** 2)):.3f}"
)
pl = np.polyfit(np.log(np.log(t)), np.log(a), 1)
print(
    f"fit angle ~ C (log t)^q: q = {pl[0]:.2f}, rms misfit of log angle {np.sqrt(np.mean((np.polyval(pl, np.log(np.log(t))) - np.log(a)) ** 2)):.3f}"
)
mq = monotone_quantity(traj, model, data)
print(
    "monotone quantity: t0",
    mq.t0,
    "max drop",
    mq.max_drop,
    "Q(end)",
    mq.Q[-1],
    "L*I",
    mq.penalty[-1],
)
print(rate_fit(traj))
cl = conditioner_limit(traj)
print(
    "h_inf sqrt(eps) - 1:",
    cl.h_inf * np.sqrt(1e-5) - 1,
    "last decade change",
    cl.last_decade_change,
)
for lo, hi in [(1e5, 1e10), (1e10, 1e15), (1e15, 1e20), (1e20, 1e30), (1e30, 1e45)]:
    s = (traj.ts >= lo) & (traj.ts <= hi) & (a_all > 1e-13)
    if s.sum() >= 3:
        print(
            f"local power-law slope of the angle over [{lo:.0e}, {hi:.0e}]: {np.polyfit(np.log(traj.ts[s]), np.log(a_all[s]), 1)[0]:.4f}"
        )
