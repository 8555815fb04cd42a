"""The peer of `marginflow simulate --out out`, in scipy alone: the RMSProp flow (eps 1e-5,
b 0.9) on the toy model v * sigma(<w, x>) (leaky slope 0.5) to t = 1e6 with LSODA at
rtol 1e-8, atol 1e-12, saved at the CLI's 200 times, then an npz, a PNG and a summary.
It imports neither JAX nor marginflow: `first_result.py` times it as a whole process.
Run: python peer_scipy_job.py DATA.npz OUT_DIR   (DATA holds X, y and the initial w0)
"""

import json
import sys

import numpy as np
from scipy.integrate import solve_ivp
from scipy.special import logsumexp

EPS, B, T1, N_SAVE = 1e-5, 0.9, 1e6, 200


def rmsprop_field(X, y):
    """(dp/dt, dm/dt) of the RMSProp flow on the toy model, params p = (v, w1, w2)."""

    def grad_and_log_loss(p):
        z = X @ p[1:]
        s, ds = np.where(z >= 0, z, 0.5 * z), np.where(z >= 0, 1.0, 0.5)
        q = y * p[0] * s
        log_l = logsumexp(-q)
        dq = np.concatenate([(y * s)[:, None], (y * p[0] * ds)[:, None] * X], axis=1)
        return -(np.exp(-q)[:, None] * dq).sum(0), log_l

    def f(t, state):
        g = grad_and_log_loss(state[:3])[0]
        return np.concatenate([-g / np.sqrt(EPS + state[3:]), (1 - B) * (g * g - state[3:])])

    return f, grad_and_log_loss


def main(data_path, out):
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.load(data_path)
    X, y, w0 = data["X"], data["y"], data["w0"]
    f, grad_and_log_loss = rmsprop_field(X, y)
    ts = np.concatenate([[0.0], np.geomspace(1e-2, T1, N_SAVE - 1)])
    sol = solve_ivp(f, (0.0, T1), np.concatenate([w0, np.zeros(3)]), method="LSODA",
                    t_eval=ts, rtol=1e-8, atol=1e-12)
    w = sol.y[:3].T
    log_loss = np.array([grad_and_log_loss(p)[1] for p in w])
    z = X @ w[-1, 1:]
    margin = np.min(y * w[-1, 0] * np.where(z >= 0, z, 0.5 * z)) / np.dot(w[-1], w[-1])
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "trajectory.npz"), ts=sol.t, w=w, m=sol.y[3:].T,
             log_loss=log_loss)
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].semilogx(sol.t[1:], log_loss[1:])
    ax[0].set(xlabel="t", ylabel="log L")
    ax[1].loglog(sol.t[1:], np.linalg.norm(w[1:], axis=1))
    ax[1].set(xlabel="t", ylabel="||w||")
    fig.savefig(os.path.join(out, "trajectory.png"), dpi=150)
    summary = {"log_loss": float(log_loss[-1]), "normalized_margin": float(margin),
               "evaluations": int(sol.nfev), "success": bool(sol.success)}
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
