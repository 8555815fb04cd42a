"""`soudry`: GD, RMSProp and Adam (w/m) flows on Soudry et al.'s 2-D data (linear model).

Theorem 6 with a linear model: w(t)/||w(t)|| -> the L2 max-margin direction u* = (1,1)/sqrt 2
of `soudry_dataset` (proved in its docstring; checked against max_margin_linear). Theorem
10 with L = 1: L(w(t)) = Theta(1/t) and ||w(t)|| = Theta(log t); the direction converges
only like 1/log t (Soudry et al. 2018). For RMSProp/Adam h -> eps^{-1/2} (Theorem 5), so
late in training they are gradient flow with time scaled by eps^{-1/2}.
"""

from __future__ import annotations

import jax
import numpy as np

from ._common import LONG_HORIZON, at_time, loglog_slope, make_flow, pyplot, run_flow
from ._results import Claim, ExperimentResult, quick_from_env
from ._results import progress as progress_bar

FLOWS = ("GD", "RMSProp", "Adam (w/m)")
_KEYS = ("t_end", "angle_deg", "gap", "loss_slope", "angle_logt_early", "angle_logt_end",
         "angle_early_deg", "angle_slope")


def soudry(*, quick: bool | None = None, progress: bool = False, seed: int = 0,
           t1: float | None = None) -> ExperimentResult:
    """Angle to (1,1)/sqrt 2, margin gap gamma* - gamma(t) and loss against t.

    Full: t1 = 1e30, 200 saves. Quick: t1 = 1e10, 60
    saves (the cost is mostly compilation: ~3 flows x 5 s).

    Numbers per flow: final angle (degrees), final margin gap, the log-log slope of L(t)
    over the last three decades (Theorem 10: -1), and angle * log t at t1/1e4 and t1 (a
    1/log t rate keeps it roughly constant).
    """
    from ..analysis import angle, max_margin_linear, normalized_margin, rate_fit
    from ..models import Linear, soudry_dataset

    quick = quick_from_env(quick)
    t1 = float(t1 if t1 is not None else (1e10 if quick else LONG_HORIZON))
    n_save = 60 if quick else 200
    data = soudry_dataset(seed)
    ref = max_margin_linear(np.asarray(data.X), np.asarray(data.y))
    u_star = np.array([1.0, 1.0]) / np.sqrt(2.0)
    model = Linear(2, key=jax.random.PRNGKey(seed))

    out: dict[str, np.ndarray] = {"gamma_star": np.asarray(ref.margin),
                                  "u_star": u_star, "ref_direction": ref.direction}
    numbers: dict = {"gamma_star": ref.margin,
                     "angle_ref_vs_(1,1)_deg": float(np.degrees(angle(ref.direction, u_star)))}
    results = {}
    for name in progress_bar(FLOWS, enabled=progress, desc="soudry flows"):
        traj = run_flow(make_flow(name), model, data, t1, n_save=n_save)
        keep = traj.ts > 0
        ts, W = traj.ts[keep], traj.w[keep]
        if len(ts) < 2:
            # The solver stopped before the first save: nothing to measure (claims undecided).
            results[name] = dict.fromkeys(_KEYS, float("nan")) | {"result": traj.result}
            numbers[f"{name}: result"] = traj.result
            continue
        ang = np.degrees(angle(W, u_star))
        gap = ref.margin - normalized_margin(model, data, W)
        loss = np.exp(traj.log_loss[keep])
        key = name.split()[0]
        out[f"{key}_t"], out[f"{key}_angle_deg"] = ts, ang
        out[f"{key}_gap"], out[f"{key}_loss"] = gap, loss
        t_end = float(ts[-1])
        early = t_end / 1e4
        r = {
            "result": traj.result,
            "t_end": t_end,
            "angle_deg": float(ang[-1]),
            "gap": float(gap[-1]),
            "loss_slope": rate_fit(traj, t_min=t_end / 1e3).loss_t_exponent,
            "angle_logt_early": float(at_time(ts, ang, early) * np.log(early)),
            "angle_logt_end": float(ang[-1] * np.log(t_end)),
            "angle_early_deg": float(at_time(ts, ang, early)),
            "angle_slope": loglog_slope(ts, ang, early),
        }
        results[name] = r
        for k, v in r.items():
            numbers[f"{name}: {k}"] = v

    claims = []
    for name, r in results.items():
        done = r["result"] == "successful"
        with np.errstate(invalid="ignore"):
            ratio = r["angle_logt_end"] / r["angle_logt_early"]
        # Converging at least like C/log t (Soudry et al.'s worst case): the angle shrinks
        # and angle * log t does not grow (30% slack for log log t corrections). On this
        # data the support vectors are symmetric about u*, so the residual of w - u* log t
        # has no component across u* and the angle falls faster (see angle_slope).
        ok = r["angle_deg"] < r["angle_early_deg"] and ratio < 1.3
        claims.append(Claim(
            claim=f"{name} flow: w/||w|| -> L2 max-margin (1,1)/sqrt2, at least as fast as "
            "1/log t (Thm 6, Soudry et al.)",
            paper="direction converges to the L2 max-margin direction (KKT of (P))",
            measured=(f"angle {r['angle_early_deg']:.3g} deg at t={r['t_end'] / 1e4:.0e} -> "
                      f"{r['angle_deg']:.3g} deg at t={r['t_end']:.0e}; angle*log t "
                      f"{r['angle_logt_early']:.3g} -> {r['angle_logt_end']:.3g}; log-log "
                      f"slope of the angle {r['angle_slope']:.3g}"),
            reproduced=ok if done else None,
        ))
        slope = r["loss_slope"]
        claims.append(Claim(
            claim=f"{name} flow: L(w(t)) = Theta(1/t) for L = 1 (Thm 10)",
            paper="log-log slope of the loss -1",
            measured=f"slope {slope:.4f} over the last 3 decades",
            # 0.05: the (log t)^{2-2/L} factor is absent for L = 1; what is left over three
            # decades is the transient of the non-support vectors, a few percent at most.
            reproduced=(abs(slope + 1.0) < 0.05) if done else None,
        ))
    return ExperimentResult(
        name="soudry", quick=quick,
        settings={"t1": t1, "n_save": n_save, "seed": seed, "eps": 1e-5, "b": 0.9,
                  "model": "Linear(2)", "data": f"soudry_dataset({seed})",
                  "flows": list(FLOWS)},
        numbers=numbers, claims=claims, data=out, plot=_plot,
    )


def _plot(result: ExperimentResult):
    plt = pyplot()
    d = result.data
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for name in FLOWS:
        k = name.split()[0]
        if f"{k}_t" not in d:
            continue
        t = d[f"{k}_t"]
        axes[0].loglog(t, d[f"{k}_angle_deg"], label=name)
        axes[1].loglog(t, np.maximum(d[f"{k}_gap"], 1e-16), label=name)
        axes[2].loglog(t, d[f"{k}_loss"], label=name)
    if "GD_t" in d:
        t = d["GD_t"]
        late = t >= 10
        anchor_a = d["GD_angle_deg"][-1] * np.log(t[-1])
        axes[0].loglog(t[late], anchor_a / np.log(t[late]), "k--", lw=0.8, label="~ 1/log t")
        axes[2].loglog(t[late], d["GD_loss"][-1] * t[-1] / t[late], "k:", lw=0.8,
                       label="slope -1 (Thm 10: L ~ 1/t)")
    axes[0].set_title("direction: angle to the L2 max margin")
    axes[0].set_ylabel("angle of w(t) to (1,1)/sqrt2 [deg]")
    axes[1].set_title(f"margin gap to gamma* = {float(d['gamma_star']):.4g} (exact SVM)")
    axes[1].set_ylabel("gamma* - q_min / ||w(t)||")
    axes[2].set_title("loss")
    axes[2].set_ylabel("L(w(t))")
    for a in axes:
        a.set_xlabel("t")
        a.legend(fontsize=8)
    fig.tight_layout()
    return {"rates": fig}
