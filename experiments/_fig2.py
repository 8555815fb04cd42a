"""`fig2`: the paper's toy experiment (Sec. 6.2, Fig. 2 and App. F.3, Fig. 6).

Phi(v, w; x) = v sigma(<w, x>) (leaky ReLU of slope 1/2, degree 2) on `toy_dataset`,
many random initialisations, GD / AdaGrad / RMSProp / Adam (w/m), both as flows and as the
paper's discrete runs (lr 0.1, b 0.9, eps 1e-5, 5000 steps; GD: lr 0.1 on the mean loss,
i.e. 0.1 / N on our sum loss). Per run: the unit vector
u = h^{-1/2} / ||h^{-1/2}|| of the final conditioner (Theorem 4: AdaGrad's h_inf depends
on the run; Theorem 5: RMSProp/Adam's is eps^{-1/2} 1, so u = (1,1,1)/sqrt 3), the final
normalised margin q_min / ||theta||^2 against the exact gamma* of the branch of sign(v)
(docs/math.md section 6), and the training accuracy.
"""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np

from ._common import LONG_HORIZON, PAPER_B, PAPER_EPS, make_flow, pyplot, run_flow
from ._results import Claim, ExperimentResult, quick_from_env
from ._results import progress as progress_bar

OPTIMISERS = ("GD", "AdaGrad", "RMSProp", "Adam (w/m)")
KINDS = ("flow", "discrete")
PAPER_LR = 0.1
PAPER_STEPS = 5000


def _optimizer(name: str, n: int):
    from ..discrete import GD, AdaGrad, Adam, RMSProp

    return {
        # Our loss is a sum over the n samples, PyTorch's (the paper's code) a mean: GD with
        # lr 0.1 on the mean is GD with lr 0.1 / n on the sum. lr 0.1 on the sum diverges
        # for some initialisations (measured: a non-finite loss at step 2). The adaptive
        # rules are run as the brief states them (sum loss, lr 0.1, eps 1e-5): their step
        # is bounded by lr * eps^{-1/2} whatever the scale of the loss.
        "GD": lambda: GD(PAPER_LR / n),
        "AdaGrad": lambda: AdaGrad(PAPER_LR, eps=PAPER_EPS),
        "RMSProp": lambda: RMSProp(PAPER_LR, b=PAPER_B, eps=PAPER_EPS),
        "Adam (w/m)": lambda: Adam(PAPER_LR, b2=PAPER_B, eps=PAPER_EPS),
    }[name]()


def _key(kind: str, name: str) -> str:
    return f"{kind}_{name.split()[0]}"


def fig2(*, quick: bool | None = None, progress: bool = False, seed: int = 0,
         n_init: int | None = None, t1: float | None = None,
         steps: int | None = None) -> ExperimentResult:
    """Run the toy experiment; see the module docstring.

    Full: 100 initialisations, flows to t1 = 1e30,
    discrete runs of 5000 steps (the paper's). Quick: 8 initialisations, t1 = 1e8, 5000
    steps (a discrete step of this 3-parameter model costs microseconds).
    """
    from ..analysis import angle, h_direction, normalized_margin, toy_max_margin
    from ..discrete import run
    from ..models import Objective, ToyLeaky, toy_dataset

    quick = quick_from_env(quick)
    n_init = int(n_init if n_init is not None else (8 if quick else 100))
    t1 = float(t1 if t1 is not None else (1e8 if quick else LONG_HORIZON))
    steps = int(steps if steps is not None else PAPER_STEPS)
    data = toy_dataset(seed)
    ref = toy_max_margin(data)
    keys = jax.random.split(jax.random.PRNGKey(seed), n_init)
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(keys)
    template = ToyLeaky(key=keys[0])
    objective = Objective(template, data)
    margins_of = jax.jit(jax.vmap(jax.vmap(objective.margins)))
    iso = np.ones(3) / np.sqrt(3.0)

    out: dict[str, np.ndarray] = {"X": np.asarray(data.X), "y": np.asarray(data.y),
                                  "gamma_plus": np.asarray(ref.gamma_plus),
                                  "gamma_minus": np.asarray(ref.gamma_minus)}
    numbers: dict = {"gamma*_+ (v > 0)": ref.gamma_plus, "gamma*_- (v < 0)": ref.gamma_minus}
    stats: dict[tuple[str, str], dict] = {}
    jobs = [(kind, name) for kind in KINDS for name in OPTIMISERS]
    for kind, name in progress_bar(jobs, enabled=progress, desc="fig2 runs"):
        if kind == "flow":
            traj = run_flow(make_flow(name), models, data, t1, batch=True, n_save=40)
        else:
            traj = run(_optimizer(name, len(data)), models, data, steps, batch=True,
                       save_every=max(1, steps // 50), throw=False)
        k = _key(kind, name)
        if len(traj) < 2:
            stats[kind, name] = {"result": traj.result}
            numbers[f"{kind} {name}: result"] = traj.result
            continue
        # A member that met a non-finite loss (a discrete run from a large initialisation)
        # is left out and counted; the rest are analysed.
        ok = np.all(np.isfinite(traj.w[:, -1]), axis=-1) & np.all(
            np.isfinite(traj.conditioner[:, -1]), axis=-1)
        n_failed = int(np.sum(~ok))
        if n_failed:
            traj = _members(traj, ok)
        W = np.asarray(traj.w)  # (B, n, p)
        u = h_direction(traj)  # (B, 3)
        ang = np.degrees(angle(u, iso))
        w_end = W[:, -1]
        gamma = np.asarray(normalized_margin(template, data, w_end))
        gstar = np.array([ref.gamma_for(w) for w in w_end])
        acc = np.mean(np.asarray(margins_of(W)) > 0, axis=-1)  # (B, n)
        out[f"{k}_t"], out[f"{k}_direction"], out[f"{k}_angle_deg"] = traj.ts, u, ang
        out[f"{k}_margin"], out[f"{k}_gamma_star"] = gamma, gstar
        out[f"{k}_accuracy"] = acc
        s = {
            "result": traj.result,
            "t_end": float(traj.ts[-1]),
            "max_angle_deg": float(np.max(ang)),
            "margin_mean": float(np.mean(gamma)),
            "margin_std": float(np.std(gamma)),
            "relative_gap_mean": float(np.mean((gstar - gamma) / gstar)),
            "margin_over_gamma_star_mean": float(np.mean(gamma / gstar)),
            "final_accuracy_min": float(np.min(acc[:, -1])),
            "runs_v_positive": int(np.sum(w_end[:, 0] > 0)),
            "runs_failed": n_failed,
        }
        stats[kind, name] = s
        for key, v in s.items():
            numbers[f"{kind} {name}: {key}"] = v

    claims = _claims(stats, steps, t1)
    return ExperimentResult(
        name="fig2", quick=quick,
        settings={"n_init": n_init, "t1": t1, "steps": steps, "lr": PAPER_LR, "b": PAPER_B,
                  "eps": PAPER_EPS, "seed": seed, "data": f"toy_dataset({seed})",
                  "model": "ToyLeaky", "flow_b": PAPER_B, "flow_eps": PAPER_EPS},
        numbers=numbers, claims=claims, data=out, plot=_plot,
    )


def _members(traj, keep):
    """The batched trajectory restricted to the members where `keep` is True."""
    from .._trajectory import Trajectory

    return Trajectory(
        ts=traj.ts, w=traj.w[keep], m=traj.m[keep], conditioner=traj.conditioner[keep],
        log_loss=traj.log_loss[keep], I=traj.I[keep],
        stats={k: _kept(k, v, keep) for k, v in traj.stats.items()},
        result=traj.result, message=traj.message, meta=traj.meta,
    )


def _kept(key: str, value, keep):
    """A batched run's statistic restricted to the kept members: per-member values (B,)
    and the per-segment counts (segments, B); shared ones (segment_ends) as they are."""
    if key == "segment_ends" or np.ndim(value) == 0:
        return value
    if key == "num_steps_per_segment":
        return tuple(tuple(np.asarray(row)[keep].tolist()) for row in value)
    return tuple(np.asarray(value)[keep].tolist())


def _claims(stats, steps, t1) -> list[Claim]:
    claims = []
    for kind in KINDS:
        got = {n: stats[kind, n] for n in OPTIMISERS if "max_angle_deg" in stats[kind, n]}
        where = f"{kind} (t = {t1:.0e})" if kind == "flow" else f"discrete ({steps} steps)"
        a = got.get("AdaGrad")
        # 1 degree: RMSProp/Adam's directions sit within far less than that of the
        # isotropic one (m -> 0), so a spread above it is a real dependence on the run.
        claims.append(Claim(
            claim=f"{where}: AdaGrad's h_inf^-1/2 direction varies with the initialisation",
            paper="AdaGrad's directions spread (Fig. 2/6d)",
            measured=(f"largest angle to (1,1,1)/sqrt3: {a['max_angle_deg']:.3g} deg"
                      if a else "run failed"),
            reproduced=(a["max_angle_deg"] > 1.0) if a else None,
        ))
        for name in ("RMSProp", "Adam (w/m)"):
            s = got.get(name)
            claims.append(Claim(
                claim=f"{where}: {name}'s h_inf^-1/2 direction is the isotropic one",
                paper="all runs on (1,1,1)/sqrt3 (Fig. 2/6e-f)",
                measured=(f"largest angle {s['max_angle_deg']:.3g} deg" if s else "run failed"),
                # 0.5 degree: indistinguishable from the isotropic arrow in the paper's plot.
                reproduced=(s["max_angle_deg"] < 0.5) if s else None,
            ))
        if len(got) == len(OPTIMISERS):
            # Runs end on two branches (sign v) with different gamma*: compare the margin
            # relative to its own branch's gamma*, so that the branch mix does not decide.
            means = {n: s["margin_over_gamma_star_mean"] for n, s in got.items()}
            lowest = min(means, key=means.get)
            claims.append(Claim(
                claim=f"{where}: AdaGrad's final normalised margin is the lowest",
                paper="AdaGrad lowest (Fig. 2c / 6b)",
                measured="mean of gamma / gamma*(branch) " + ", ".join(
                    f"{n} {v:.4g}" for n, v in means.items()),
                reproduced=lowest == "AdaGrad",
            ))
            acc = min(s["final_accuracy_min"] for s in got.values())
            failed = {n: s["runs_failed"] for n, s in got.items() if s["runs_failed"]}
            claims.append(Claim(
                claim=f"{where}: every run reaches 100% training accuracy",
                paper="100% (Fig. 6c)",
                measured=f"lowest final accuracy over runs and optimisers {acc:.3f}" + (
                    "; diverged (non-finite loss, left out): " + ", ".join(
                        f"{n} {k} run(s)" for n, k in failed.items()) if failed else ""),
                reproduced=acc == 1.0 and not failed,
            ))
            gaps = {n: got[n]["relative_gap_mean"] for n in ("GD", "RMSProp", "Adam (w/m)")}
            claims.append(Claim(
                claim=f"{where}: GD/RMSProp/Adam margins approach the exact gamma* of their "
                "branch (Thm 6)",
                paper="KKT point of (P): gamma*",
                measured="mean relative gap " + ", ".join(f"{n} {v:.2g}"
                                                          for n, v in gaps.items()),
                # 5%: docs/math.md section 6 measured 1-4% at t = 1e5 for the flow; the margin
                # converges like 1/log t, so only a loose bound is honest at finite t.
                reproduced=max(gaps.values()) < 0.05,
            ))
    return claims


# An orthonormal basis of the plane orthogonal to (1,1,1)/sqrt3 in the coordinates
# (v, w1, w2): a unit vector u near the isotropic direction is drawn as (u.E1, u.E2), the
# isotropic direction itself at the origin, and the distance from the origin is sin(angle).
E1 = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)
E2 = np.array([1.0, 1.0, -2.0]) / np.sqrt(6.0)


def _plot(result: ExperimentResult):
    """Two figures: "directions", the h^{-1/2} direction of every run projected on the
    plane orthogonal to (1,1,1)/sqrt3 (the origin is Theorem 5's limit h = eps^{-1/2} 1);
    "margins", the final normalised margins against gamma* and the training accuracy."""
    plt = pyplot()
    d = result.data
    figs = {}
    names = ("AdaGrad", "RMSProp", "Adam (w/m)")
    coords = {}
    for kind in KINDS:
        for name in names:
            k = _key(kind, name)
            if f"{k}_direction" in d:
                u = np.asarray(d[f"{k}_direction"])
                coords[kind, name] = (u @ E1, u @ E2)
    # One scale for all panels, so that the spreads compare at a glance.
    span = max([0.02] + [float(np.max(np.abs(np.concatenate(c)))) for c in coords.values()])
    lim = 1.15 * span
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), layout="constrained")
    for ax, name in zip(axes, names, strict=True):
        angles = []
        for kind, marker in zip(KINDS, ("o", "x"), strict=True):
            if (kind, name) in coords:
                x, y = coords[kind, name]
                ax.plot(x, y, marker, ls="none", ms=5, alpha=0.7, label=f"{kind} runs")
                angles.append(f"{kind} {np.max(d[f'{_key(kind, name)}_angle_deg']):.2g} deg")
        ax.plot([0.0], [0.0], "k+", ms=14, mew=2, label="(1,1,1)/sqrt3: h = eps^-1/2 (Thm 5)")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("u . (1,-1,0)/sqrt2")
        ax.set_ylabel("u . (1,1,-2)/sqrt6")
        ax.set_title(f"{name}: largest angle to (1,1,1)/sqrt3\n" + ", ".join(angles),
                     fontsize=10)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle("direction u = h^-1/2 / ||h^-1/2|| at the end of each run, coordinates "
                 "(v, w1, w2), seen along (1,1,1)/sqrt3", fontsize=10)
    figs["directions"] = fig

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, kind in enumerate(KINDS):
        ax = axes[i]
        for j, name in enumerate(OPTIMISERS):
            k = _key(kind, name)
            if f"{k}_margin" in d:
                m = d[f"{k}_margin"]
                ax.plot(np.full(len(m), j) + np.linspace(-0.2, 0.2, len(m)), m, ".", ms=4)
        ax.axhline(float(d["gamma_plus"]), color="k", ls="--", lw=0.8,
                   label=f"gamma*_+ (v > 0) = {float(d['gamma_plus']):.4g}")
        ax.axhline(float(d["gamma_minus"]), color="gray", ls=":", lw=0.8,
                   label=f"gamma*_- (v < 0) = {float(d['gamma_minus']):.4g}")
        ax.set_xticks(range(len(OPTIMISERS)), OPTIMISERS)
        ax.set_xlabel("optimiser (one dot per run)")
        ax.set_ylabel("final q_min / ||theta||^2")
        ax.set_title(f"final normalised margin ({kind})", fontsize=10)
        ax.legend(fontsize=8)
    ax = axes[2]
    for name in OPTIMISERS:
        k = _key("discrete", name)
        if f"{k}_accuracy" in d:
            ax.plot(d[f"{k}_t"], d[f"{k}_accuracy"].mean(axis=0), label=name)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("t = k * eta (discrete)")
    ax.set_ylabel("training accuracy (mean over runs)")
    ax.set_title("training accuracy (discrete runs)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    figs["margins"] = fig
    return figs
