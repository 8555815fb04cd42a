"""The figure of `marginflow simulate`: the loss, the normalised margin with its exact
reference where one is known (gamma*), the norm, and the conditioner with its limit."""

from __future__ import annotations


def reference_margin(traj, data) -> tuple[float, str] | None:
    """(gamma*, label) when the exact max normalised margin of the run's model is known:
    `Linear` (the L2 max-margin classifier, max_margin_linear) and `ToyLeaky` (the branch of
    sign(v) at the last save, toy_max_margin); None otherwise or if the data is not
    separable."""
    import numpy as np

    from ..analysis import max_margin_linear, toy_max_margin

    cls = traj.meta.get("model", {}).get("class")
    try:
        if cls == "Linear":
            X = np.asarray(data.X, np.float64).reshape(len(data), -1)
            return max_margin_linear(X, np.asarray(data.y)).margin, "gamma* (L2 max margin)"
        if cls == "ToyLeaky" and not traj.batched:
            ref = toy_max_margin(data)
            w_end = np.asarray(traj.w[-1])
            if w_end[0] == 0:
                return None
            gamma = ref.gamma_for(w_end)
            branch = "v > 0" if w_end[0] > 0 else "v < 0"
            return (gamma, f"gamma* ({branch} branch)") if np.isfinite(gamma) else None
    except (ValueError, RuntimeError):  # not separable (no max-margin solution), LP failure
        return None
    return None


def conditioner_limit_value(traj) -> tuple[float, str] | None:
    """(h_inf, label) where Theorem 5 gives the conditioner's limit: RMSProp and Adam (w/m)
    flows and their discrete runs, h -> eps^{-1/2} (eps outside the root: 1/eps); None
    otherwise."""
    meta = traj.meta
    if meta.get("flow") not in ("rmsprop", "adam"):
        return None
    eps = float(meta["hyper"]["eps"])
    if meta.get("eps_placement", meta.get("conditioner")) in ("outside", "eps_outside"):
        return 1.0 / eps, "1/eps (Thm 5)"
    return eps**-0.5, "eps^-1/2 (Thm 5)"


def trajectory_figure(traj, model, data):
    """The figure `marginflow simulate` writes: log L, the normalised margin and the range of
    the conditioner h against t (log axes; the save at t = 0 is left out), with the
    theory's reference lines: slope -1 for log L against log t (Theorem 10), gamma* where
    `reference_margin` knows it, and h's limit where `conditioner_limit_value` gives one.
    Returns the matplotlib Figure (unbatched trajectories)."""
    import numpy as np

    from ..analysis import normalized_margin
    from ._common import pyplot

    plt = pyplot()
    keep = traj.ts > 0
    t = np.asarray(traj.ts[keep], np.float64)
    log10_l = np.asarray(traj.log_loss[keep], np.float64) / np.log(10)
    gamma = normalized_margin(model, data, traj.w[keep], loss=traj.meta["loss"])
    h = np.asarray(traj.h()[keep], np.float64)
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))

    a.plot(t, log10_l, label="log10 L(w(t))")
    late = (t >= t[-1] / 1e3) & (t > 1.0) if t.size else t > 0
    if np.count_nonzero(late) >= 2 and np.isfinite(log10_l[-1]):
        # A line of slope -1 on (log t, log L) through the last save: L ~ 1/t.
        a.plot(t[late], log10_l[-1] - np.log10(t[late] / t[-1]), "k--", lw=0.9,
               label="slope -1 (Thm 10: L ~ 1/t)")
    a.set_xscale("log")
    a.set_xlabel("t")
    a.set_ylabel("log10 L(w(t))")
    a.set_title("training loss")
    a.legend(fontsize=8)

    b.plot(t, gamma, label="q_min / ||w||^L")
    ref = reference_margin(traj, data)
    if ref is not None:
        b.axhline(ref[0], color="k", ls="--", lw=0.9, label=f"{ref[1]} = {ref[0]:.4g}")
    b.set_xscale("log")
    b.set_xlabel("t")
    b.set_ylabel("q_min / ||w||^L")
    b.set_title("normalised margin")
    # Early margins are very negative (before separation): show the range down to -|top|.
    finite = np.asarray(gamma)[np.isfinite(gamma)]
    top = max([*finite.tolist(), *([ref[0]] if ref is not None else [])], default=np.nan)
    bottom = max(float(np.min(finite)), -abs(top)) if finite.size else np.nan
    if np.isfinite(top) and top > bottom:
        b.set_ylim(bottom=bottom, top=top + 0.05 * (top - bottom))
    b.legend(fontsize=8)

    c.plot(t, np.max(h, axis=-1), label="max_i h_i(t)")
    c.plot(t, np.min(h, axis=-1), label="min_i h_i(t)")
    lim = conditioner_limit_value(traj)
    if lim is not None:
        c.axhline(lim[0], color="k", ls="--", lw=0.9, label=f"{lim[1]} = {lim[0]:.4g}")
    c.set_xscale("log")
    c.set_yscale("log")
    c.set_xlabel("t")
    c.set_ylabel("conditioner h_i(t)")
    c.set_title("conditioner range over the parameters")
    c.legend(fontsize=8)

    fig.suptitle(f"{traj.meta['flow']} flow, {traj.meta['model']['class']}")
    # Fixed margins, wide enough for the tick labels these axes get (log10 L down to -1e3,
    # margins with four digits, h on a log axis): `tight_layout` measured every text
    # extent for them, 0.35 s of a 2.5 s warm `marginflow simulate`.
    fig.subplots_adjust(left=0.06, right=0.985, bottom=0.14, top=0.84, wspace=0.3)
    return fig


def plot_trajectory(traj, model, data, path: str) -> None:
    """Write `trajectory_figure` to `path` as a PNG at DPI (150) dots per inch."""
    import matplotlib.pyplot as plt

    from ._results import DPI

    fig = trajectory_figure(traj, model, data)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
