"""Why a run did not separate the data: the verdict `simulate` adds to a stuck run.

Separation (the paper's Assumption 1.III) is g(log 1/L) > 0, i.e. L < ell(0) = e^{-f(0)} (L < 1 for
the exponential loss, L < log 2 for logistic / cross-entropy): each sample contributes
ell(q_i) <= L, so below that level every margin is positive. If no w separates the data,
some sample keeps q_i <= 0 and L >= ell(0) for ever; a flow then converges to a finite
minimiser or stalls, its field turns stiff in log time, and the solver runs out of steps
(`max_steps_reached`), which no step budget fixes.

The verdict is taken once, on the saved log L, when a run has finished: only a run that
failed or ended with L >= ell(0) (not separated) is examined, so a separated run pays
nothing. Linear and DeepLinear models get an exact answer (an LP, `linearly_separable`):
if it is infeasible the result becomes "not_separable". Other models have no exact check;
if log L has stopped falling over the last saved decade (a drop within the tolerance of
the integration) the message gets a note that the data may not be separable, and the
result code stays what the solver said (a slow saddle looks the same).
"""

from __future__ import annotations

import numpy as np

from .._stored import StoredProgram

NOT_SEPARABLE = "not_separable"


def _last_finite(ts: np.ndarray, log_loss: np.ndarray):
    """(index, t, log L) of each member's last finite save; index -1 where there is none."""
    rows = np.atleast_2d(log_loss)
    out = []
    for row in rows:
        ok = np.nonzero(np.isfinite(row) & np.isfinite(ts))[0]
        out.append(
            (-1, np.nan, np.nan)
            if ok.size == 0
            else (int(ok[-1]), float(ts[ok[-1]]), float(row[ok[-1]]))
        )
    return rows, out


def _is_linear(model) -> bool:
    from ..models import DeepLinear, Linear

    return isinstance(model, (Linear, DeepLinear))


def _log_ell_at_zero_traced(loss):
    """log ell(0) = -f(0), as one program: evaluated eagerly, f's dozen array operations
    compiled one small program each, 0.8 s of a fresh process's first `simulate`."""
    return -loss.f(0.0)


_log_ell_at_zero = StoredProgram("log_ell_at_zero", _log_ell_at_zero_traced)


def separation_verdict(
    objective, ts, log_loss, result: str, message: str, rtol: float, t1: float
) -> tuple[str, str]:
    """(result, message) of a finished run, with the separability verdict added if needed.

    objective: the run's Objective; ts (n,), log_loss (n,) or (B, n): its saves (a failed
    run's last save is where the solver stopped); rtol: the run's tolerance, which sets
    what counts as "log L stopped falling" (a drop over the last decade of at most
    100 rtol max(1, |log L|)).
    """
    ts = np.asarray(ts, np.float64)
    log_loss = np.asarray(log_loss, np.float64)
    if ts.size == 0:
        return result, message
    level = float(_log_ell_at_zero(objective.loss))  # separated iff log L < log ell(0)
    rows, last = _last_finite(ts, log_loss)
    # Rounding of logsumexp at exactly L = ell(0): a margin-0 sample must count as not
    # separated, so the test is generous by far more than rounding.
    stuck = [b for b, (e, _, v) in enumerate(last) if e >= 0 and v >= level - 1e-9]
    if not stuck:
        return result, message  # separated (or nothing finite saved): nothing to add
    failed = result != "successful"
    b0 = stuck[0]
    _, t_end, v_end = last[b0]
    model = objective.model
    if _is_linear(model):
        from ..analysis._separability import linearly_separable

        data = objective.data
        try:
            separable = linearly_separable(
                data, n_classes=None if data.binary else int(model.out_dim)
            )
        except RuntimeError:  # the LP solver gave no answer: say nothing
            return result, message
        if separable:
            return result, message  # separable: the run was stopped before separating
        # The solver's own words would ask for more steps: name its code only (the saves
        # up to where it stopped are kept, as for any failure).
        how = (
            f"The solver stopped at t = {t_end:.6g} (solver result {result!r}), a symptom of this."
            if failed
            else f"The integration itself reached t1 = {t1:.6g}; the trajectory is exact."
        )
        return NOT_SEPARABLE, (
            "this model does not separate the data (an LP feasibility check found no w "
            "with all margins > 0); the flow's loss cannot go to 0 and no step budget fixes "
            f"that: log L = {v_end:.6g} at t = {t_end:.6g}, and it stays >= log ell(0) = "
            f"{level + 0.0:.4g}, the level below which all margins are positive. "
            + how
            + " Fix: check the labels, or use a model that can separate the data; the "
            "implicit-bias analyses and max_margin_linear need separable data."
        )
    # No exact check: a note if log L has stopped falling over the last saved decade.
    stalled = []
    for b in stuck:
        e, t_e, v_e = last[b]
        row = rows[b]
        before = np.nonzero((ts > 0) & (ts <= t_e / 10.0) & np.isfinite(row))[0]
        before = before[before < e]
        if before.size == 0:
            continue  # less than a decade saved: no basis for a verdict
        s = int(before[-1])
        drop = float(row[s] - v_e)
        if drop <= 100.0 * rtol * max(1.0, abs(v_e)):
            stalled.append((b, float(ts[s]), t_e, v_e, drop))
    if not stalled:
        return result, message
    b, t_s, t_e, v_e, drop = stalled[0]
    who = "" if log_loss.ndim == 1 else f" ({len(stalled)} of {rows.shape[0]} runs; run {b}:)"
    note = (
        f"Note{who}: the loss stopped falling at log L = {v_e:.6g} (it fell by {drop:.2g} "
        f"from t = {t_s:.3g} to t = {t_e:.3g}, within the solver's tolerance) above "
        f"log ell(0) = {level + 0.0:.4g}, the level below which all margins are positive: the "
        "data may not be separable by this model, and then the loss cannot go to 0 and no "
        "step budget fixes that."
    )
    return result, (f"{message} {note}" if message else note)
