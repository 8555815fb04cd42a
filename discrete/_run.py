"""`run`: a discrete optimiser on a model and data set, saved as a flow-time Trajectory.

The whole run is one `eqx.filter_jit` call: a `lax.scan` over save blocks, each block a
`fori_loop` of steps whose length is a traced integer (so changing `steps` or
`save_every` with the same number of saves does not recompile). Many initialisations
run in one call under `vmap`.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._cache import use_cache
from .._checks import check_finite_params, check_int, is_model, require_x64
from .._precision import matmul_precision, precision_of
from .._threads import n_workers as n_threads
from .._trajectory import Trajectory, raise_if_failed
from .._xla import FusionPinned
from ..models import Objective
from ..models._homogeneity import check_homogeneous
from ..models._objective import initial_point
from ._optimizers import AbstractOptimizer

_HINT_NONFINITE = (
    "lower `lr` (the discrete rules need lr * h * curvature of L below ~2), raise `eps` "
    "(h <= eps^{-1/2}), or rescale the data / initialisation"
)


class Minibatches(NamedTuple):
    """How a minibatch run draws its batches (static: part of the compiled program).
    independent=False: epochs of a fresh permutation, the partial last batch dropped;
    True: B of the N samples without replacement, drawn afresh at every step."""

    size: int
    independent: bool = False


_SAMPLINGS = ("epochs", "independent")


def _check_run_args(optimizer, steps, save_every, batch_size, key, n_data, sampling="epochs",
                    n_batch=None):
    if not isinstance(optimizer, AbstractOptimizer):
        raise TypeError(
            "run: `optimizer` must be a marginflow.discrete optimiser (GD(lr), AdaGrad(lr, "
            "eps=...), RMSProp(lr, b=..., eps=...), Adam(lr, b2=..., eps=...), "
            "SGDMomentum(lr, momentum=...)), got "
            f"{type(optimizer).__name__}; optax transformations are wrapped by these classes."
        )
    steps = check_int(steps, "steps", "run", 1, "pass the number of optimiser steps, e.g. 5000")
    if save_every is None:
        save_every = max(1, math.ceil(steps / 200))
    save_every = check_int(save_every, "save_every", "run", 1,
                            "pass how many steps lie between two saves, e.g. 10")
    if batch_size is None:
        if sampling != "epochs":
            raise ValueError(
                f"run: `sampling` chooses how minibatches are drawn, got sampling = "
                f"{sampling!r} but batch_size = None (full batch); pass batch_size too.")
        if key is not None:
            raise ValueError(
                "run: `key` is only used for minibatches, got a key but batch_size = None; "
                "pass batch_size for minibatch steps, or drop key for full-batch steps."
            )
    else:
        batch_size = check_int(batch_size, "batch_size", "run", 1,
                                "pass the minibatch size, or None for full batch")
        if batch_size > n_data:
            raise ValueError(
                f"run: `batch_size` must be at most the number of samples, {n_data}, got "
                f"{batch_size}; pass batch_size=None for full-batch steps."
            )
        if key is None:
            raise TypeError(
                "run: minibatches (batch_size given) need a PRNG key for the shuffling: "
                "pass key=jax.random.key(0)."
            )
        if sampling not in _SAMPLINGS:
            raise ValueError(f"run: `sampling` must be one of {_SAMPLINGS}, got {sampling!r}.")
        n_keys = _key_batch(key)
        if n_keys is not None and n_keys != n_batch:
            raise ValueError(
                f"run: a batch of keys gives each member its own minibatches, so it needs "
                f"batch=True and one key per member ({n_batch} here), got "
                f"{n_keys} keys; pass one key to share the minibatches.")
        batch_size = Minibatches(batch_size, sampling == "independent")
    return steps, save_every, batch_size


def _key_batch(key) -> int | None:
    """The number of keys in a batch of PRNG keys (one per member), or None for one key."""
    shape = jnp.shape(key)
    typed = jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key)
    if (typed and len(shape) == 1) or (not typed and len(shape) == 2):
        return int(shape[0])
    return None


def _check_batched(model):
    """batch=True: every parameter array is (B, *its unbatched shape), one B for all."""
    from ..models import from_spec

    fix = ("build the models with eqx.filter_vmap(lambda k: Model(..., key=k))(keys), or pass "
           "batch=False for one initialisation")
    if not is_model(model):
        raise TypeError(f"run: `model` must be a marginflow model, got {type(model).__name__}.")
    want = [x.shape for x in jax.tree.leaves(eqx.filter(from_spec(model.spec()),
                                                         eqx.is_inexact_array))]
    got = [x.shape for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))]
    sizes = {g[0] for g in got if len(g) >= 1}
    if len(want) != len(got) or any(g[1:] != w or len(g) != len(w) + 1
                                     for g, w in zip(got, want, strict=True)) or len(sizes) != 1:
        raise ValueError(
            f"run: batch=True needs parameters with a leading batch axis, got shapes {got} for "
            f"a model whose parameters have shapes {want}; {fix}."
        )


def _minibatch(objective: Objective, key, k, batches: Minibatches) -> Objective:
    """The objective on minibatch k: epochs of a fresh permutation, the last partial
    batch of each epoch dropped (torch DataLoader(shuffle=True, drop_last=True)); or, with
    independent sampling, B samples without replacement drawn afresh for step k."""
    n = objective.data.X.shape[0]
    size = batches.size
    # Independent sampling is an "epoch" of one batch: a fresh permutation at every step.
    per_epoch = 1 if batches.independent else n // size
    perm = jax.random.permutation(jax.random.fold_in(key, k // per_epoch), n)
    idx = jax.lax.dynamic_slice(perm, ((k % per_epoch) * size,), (size,))
    return eqx.tree_at(lambda o: (o.data.X, o.data.y), objective,
                       (objective.data.X[idx], objective.data.y[idx]))


def _run_traced(optimizer, objective, w0, steps, save_every, key, n_blocks, batch_size,
                batched, carry0=None, first_block=0, finish=True, count=None):
    """Saves at k = 0, s, 2s, ..., (n_blocks - 1) s (all < steps) and at the end, k = steps.

    A checkpointed run calls this chunk by chunk: blocks first_block .. first_block +
    n_blocks - 1 from the carry (w, optimiser state, k, alive) where the last chunk ended;
    `finish` adds the final point k = steps. With `count` (a traced integer <= n_blocks)
    only the blocks first_block .. first_block + count - 1 run, into the first `count` rows
    of the n_blocks saved (the others are zeros): calls that differ only in how many blocks
    they run share one compiled program (`_run_batch`'s two stages).
    """
    tx = optimizer.transformation()

    def step(carry, key):
        w, state, k, alive = carry
        obj = objective if batch_size is None else _minibatch(objective, key, k, batch_size)
        log_l, g = obj.log_loss_and_grad(w)
        log_l, g = log_l.astype(w.dtype), g.astype(w.dtype)
        updates, new_state = tx.update(g, state, w)
        ok = alive & jnp.isfinite(log_l) & jnp.all(jnp.isfinite(g))
        # After a non-finite loss or gradient the run freezes at the failing iterate:
        # k stops counting and the saved records after it are discarded on the host.
        w_next = jnp.where(ok, optax.apply_updates(w, updates), w)
        state_next = jax.tree.map(lambda a, b: jnp.where(ok, a, b), new_state, state)
        record = {
            "w": w,
            "m": optimizer.second_moment(new_state, w),
            "h": optimizer.conditioner(new_state, w),
            "log_loss": log_l if batch_size is None else objective.log_loss(w),
        }
        return (w_next, state_next, k + ok.astype(k.dtype), ok), record

    def one(w_init, carry, key):
        def advance(n, carry):
            return jax.lax.fori_loop(0, n, lambda _, c: step(c, key)[0], carry)

        def block(carry, j):
            carry, record = step(carry, key)
            # the last block may be shorter: it ends at k = steps
            return advance(jnp.minimum(save_every, steps - j * save_every) - 1, carry), record

        if carry is None:
            carry = _fresh(tx, w_init)
        if count is None:
            blocks = first_block + jnp.arange(n_blocks, dtype=jnp.int32)
            carry, records = jax.lax.scan(block, carry, blocks)
        else:
            shapes = jax.eval_shape(lambda c: block(c, first_block)[1], carry)
            rows = jax.tree.map(lambda s: jnp.zeros((n_blocks, *s.shape), s.dtype), shapes)

            def into_row(i, state):
                carry, rows = state
                carry, record = block(carry, first_block + i)
                return carry, jax.tree.map(lambda r, x: r.at[i].set(x), rows, record)

            carry, records = jax.lax.fori_loop(0, count, into_row, (carry, rows))
        # The last point: w at k = steps (or at the failing step), with the h_k and n_k its
        # step would use; the state it would move to is not needed, but whether its loss
        # and gradient were finite is ("ok"): k cannot count a step that is not taken.
        last = None
        if finish:
            after, last = step(carry, key)
            last = dict(last, ok=after[3])
        return records, last, carry

    if batched:  # a batch of keys (one per member) is mapped with the members
        keyed = key is not None and _key_batch(key) is not None
        return jax.vmap(one, in_axes=(0, 0, 0 if keyed else None))(w0, carry0, key)
    return one(w0, carry0, key)


def _fresh(tx, w):
    """The carry (w, optimiser state, k = 0, alive) at the start of one run."""
    return (w, tx.init(w), jnp.zeros((), jnp.int32), jnp.array(True))


@eqx.filter_jit
def _fresh_carry(optimizer, w0):
    """`_fresh` for each member of a batched run."""
    tx = optimizer.transformation()
    return jax.vmap(lambda w: _fresh(tx, w))(w0)


# The trace counter (eqx.debug.get_num_traces(_run_counted)) lets the tests check that
# new hyper-parameters or step counts do not recompile.
_run_counted = eqx.debug.assert_max_traces(_run_traced, max_traces=None)
# Compiled with XLA's fusion emitters, as before marginflow's process default became the
# classic ones (`_xla`): the results stay the same bit for bit, and large runs fast.
_run_compiled = FusionPinned(_run_counted)


def run(
    optimizer: AbstractOptimizer,
    model,
    data,
    steps: int,
    *,
    loss=None,
    save_every: int | None = None,
    batch_size: int | None = None,
    key=None,
    sampling: str = "epochs",
    batch: bool = False,
    throw: bool = True,
    dtype=jnp.float64,
    checkpoint=None,
    blocks_per_checkpoint: int = 20,
    workers: int | None = None,
    _resume=None,
) -> Trajectory:
    """Run a discrete optimiser for `steps` steps and save it on the flow-time axis.

    w_{k+1} = w_k - lr * h_k * g_k (see the optimiser's docstring), g_k = grad L(w_k) with
    L(w) = sum_i exp(-f(q_i(w))) (the full data set, or a minibatch), w_0 = the model's
    parameters. The Trajectory has the type `simulate` returns, with
    - ts = k * eta, eta = the step of the matching flow (docs/math.md section 5: lr, AdaGrad
      lr^2), so it shares a time axis with `simulate(matching_flow(optimizer), ...)`;
    - w = w_k; conditioner = h_k and m = the optimiser's second moment after step k
      (AdaGrad: S_k = sum_{s<=k} g_s^2, so the flow's m is about lr^2 S_k and its h is
      h_k / lr; RMSProp / Adam: n_k, not bias-corrected; GD / SGDMomentum: h = 1, m = 0);
    - log_loss = log L(w_k) on the full data set; I = NaN (no flow integral);
    - stats {"num_steps"}: steps taken (per member when batched);
    - result "successful" or "nonfinite_loss": a non-finite loss or gradient stops the run,
      which keeps every save before it and, last, the failing iterate;
    - meta: "kind": "discrete", "optimizer", "optimizer_hyper", "eps_placement", "eta",
      "steps", "save_every", "batch_size", the model / data / loss keys `simulate`
      writes, and "flow" / "hyper" / "eps_placement" of the matching flow (None where
      there is none), so `traj.flow()` and `traj.model_at(i)` work.

    Args:
        optimizer: GD, AdaGrad, RMSProp, Adam or SGDMomentum.
        model: a marginflow model; with batch=True every parameter array has a leading
            axis B of initialisations (eqx.filter_vmap(lambda k: ToyLeaky(key=k))(keys)).
        data: a Dataset. loss: "exponential" (default, binary), "logistic",
            "cross_entropy" (default, multi-class).
        steps: number of steps (>= 1). save_every: steps between saves (default
            ceil(steps / 200)); k = steps is always saved.
        batch_size: minibatch size (a fresh permutation per epoch, partial last batch
            dropped; the loss is the SUM over the minibatch); None: full batch.
        key: PRNG key for the minibatches (required with batch_size; every member of a
            batched run sees the same minibatches), or with batch=True one key per member
            (`jax.random.split(key, B)`): independent runs, e.g. to estimate the statistics
            a stochastic flow (`flows.simulate_sde`) predicts.
        sampling: "epochs" (default: a fresh permutation per epoch, as PyTorch's
            DataLoader) or "independent" (B of the N samples without replacement, drawn
            afresh at every step: the sampling `simulate_sde`'s noise models).
        batch: many initialisations in one call (vmap).
        throw: raise SimulationError (holding the partial Trajectory) on a non-finite loss;
            with throw=False the Trajectory is returned and `result` / `message` say why.
        dtype: jnp.float64 (default) or jnp.float32 (traced at JAX's matmul precision
            "highest" unless you set one: GPUs round float32 products to TF32 by default).
        checkpoint: a folder; the run is computed in chunks of `blocks_per_checkpoint`
            save blocks and each chunk is written there atomically (its saves and the
            optimiser's state), so `resume_run(folder)` continues a killed run, losing at
            most the chunk in progress.
        workers: with batch=True on CPU, the batch is cut into this many equal chunks run
            concurrently from as many threads (XLA:CPU runs concurrent calls on its thread
            pool: one vmapped call keeps one core busy). Default: the cores this process may
            use (CPU affinity, capped by a cgroup quota), at most the batch size; 1 = one
            vmapped call. Not used on GPU (one call fills the device) or with
            `checkpoint`. Members do not interact, so the chunking changes no result beyond
            float rounding of the batched kernels (measured: identical to 1e-15 relative).
            Batched runs of >= 8 save blocks also drop members whose loss overflowed in
            the first block from the rest of the run (their results are unchanged).

    Example:
        >>> import jax
        >>> from marginflow.discrete import RMSProp, run
        >>> from marginflow.models import ToyLeaky, toy_dataset
        >>> traj = run(RMSProp(0.1, b=0.9, eps=1e-5), ToyLeaky(key=jax.random.key(0)),
        ...            toy_dataset(0), 5000, save_every=50)
    """
    if dtype not in (jnp.float64, jnp.float32):
        raise ValueError(f"run: `dtype` must be jnp.float64 or jnp.float32, got {dtype!r}.")
    require_x64(dtype, "run")
    if checkpoint is not None:
        check_int(blocks_per_checkpoint, "blocks_per_checkpoint", "run", 1,
                   "pass how many save blocks one checkpoint file holds, e.g. 20")
        if key is not None:
            raise ValueError(
                "run: `checkpoint` is for full-batch runs (batch_size=None, key=None); "
                "minibatch runs are not checkpointed."
            )
    if batch:
        _check_batched(model)
    template, w0 = initial_point(model, batch)
    objective = Objective(template, data, loss, where="run")
    n_data = int(objective.data.X.shape[0])
    steps, save_every, batch_size = _check_run_args(
        optimizer, steps, save_every, batch_size, key, n_data, sampling,
        int(w0.shape[0]) if batch and w0.ndim == 2 else None)
    if batch and w0.ndim != 2:
        raise ValueError("run: batch=True needs parameters with a leading batch axis.")
    check_finite_params(w0, "run")
    use_cache()  # compiled programs persist across processes (marginflow._cache)
    check_homogeneous(objective, w0, "run")  # compiled: run is called in sweeps

    w0 = jnp.asarray(w0, dtype=dtype)
    # The metadata describes the data as given: the analysis functions match the Dataset a
    # user passes by its fingerprint, which the float32 copy below would change.
    described = objective
    if dtype == jnp.float32:  # the data too, or every step would promote back to float64
        objective = objective.in_dtype(dtype)
    given = optimizer  # metadata and the time axis from the hyper-parameters as given
    optimizer = jax.tree.map(
        lambda x: jnp.asarray(x, dtype) if eqx.is_inexact_array(x) else x, optimizer
    )
    n_blocks = -(-steps // save_every)
    start = time.perf_counter()
    args = (optimizer, objective, w0, jnp.asarray(steps, jnp.int32),
            jnp.asarray(save_every, jnp.int32), key)
    n_workers = n_threads(workers, int(w0.shape[0]) if batch else 1, "run")
    with matmul_precision(dtype):  # float32: no TF32 on GPUs (_precision.py)
        if checkpoint is None and batch and jax.default_backend() == "cpu":
            from ._batch import _run_batch  # it calls _run_compiled per chunk

            records, last, carry = _run_batch(args, n_blocks, batch_size, n_workers)
        elif checkpoint is None:
            records, last, carry = jax.block_until_ready(
                _run_compiled(*args, n_blocks, batch_size, batch)
            )
        else:
            from ._resume import _run_checkpointed  # the checkpointed run calls _run_compiled

            records, last, carry = _run_checkpointed(
                args, n_blocks, batch_size, batch, checkpoint, blocks_per_checkpoint, _resume,
                header={
                    "optimizer": given.name, "optimizer_hyper": given.hyperparameters(),
                    "eps_placement": given.eps_placement, "model": objective.model.spec(),
                    "loss": objective.loss.name, "steps": steps, "save_every": save_every,
                    "batch_size": None if batch_size is None else batch_size.size,
                    "batch": bool(batch),
                    "dtype": jnp.dtype(dtype).name,
                    "matmul_precision": precision_of(dtype),  # resume continues at it
                    "blocks_per_checkpoint": blocks_per_checkpoint,
                },
                data=described.data,
            )
    k_end = carry[2]
    wall = time.perf_counter() - start

    eta = float(given.eta)
    k_saved = np.arange(n_blocks) * save_every
    k_end = np.asarray(k_end)
    arrays = {}
    for name in ("w", "m", "h", "log_loss"):
        rec, fin = np.asarray(records[name]), np.asarray(last[name])
        arrays[name] = np.concatenate([rec, fin[:, None] if batch else fin[None]],
                                      axis=1 if batch else 0)
    # The final point's step is evaluated but never taken, so k_end alone cannot tell that
    # its loss or gradient overflowed: its `ok` does (False too for a run that failed).
    failed = (k_end < steps) | ~np.asarray(last["ok"], bool)
    if not batch:
        # Keep the saves strictly before the failing step, then the failing iterate.
        keep = np.concatenate([k_saved < k_end, [True]])
        ks = np.concatenate([k_saved, [int(k_end)]])[keep]
        arrays = {name: a[keep] for name, a in arrays.items()}
    else:
        ks = np.concatenate([k_saved, [steps]])
        # A member that failed keeps its saves before the failure; later ones are NaN (a
        # batch shares one time axis).
        dead = (ks[None, :] >= k_end[:, None]) & failed[:, None]
        for name, a in arrays.items():
            mask = dead if a.ndim == 2 else dead[:, :, None]
            arrays[name] = np.where(mask, np.nan, a)
    ts = ks.astype(np.float64) * eta

    result, message = "successful", ""
    if np.any(failed):
        result = "nonfinite_loss"
        first = int(np.min(k_end))
        where = (f"{int(np.sum(failed))} of {failed.size} runs" if batch else "the run")
        message = (
            f"{where} met a non-finite loss or gradient (first at step {first}, t = "
            f"{first * eta:.6g}) and stopped there. Fix: {_HINT_NONFINITE}."
        )

    meta = _meta(given, described, steps, save_every, batch_size, dtype, batch)
    meta["wall_time_s"] = wall  # includes compilation on a first call
    traj = Trajectory(
        ts=ts,
        w=arrays["w"],
        m=arrays["m"],
        conditioner=arrays["h"],
        log_loss=arrays["log_loss"],
        I=np.full(arrays["log_loss"].shape, np.nan),
        # A tuple, not an array: Trajectory.stats is a static field (JSON-like values).
        stats={"num_steps": tuple(int(k) for k in k_end) if batch else int(k_end)},
        result=result,
        message=message,
        meta=meta,
    )
    return raise_if_failed(traj, "run", throw)


def _meta(optimizer, objective, steps, save_every, batch_size, dtype, batch) -> dict:
    from ._dictionary import matching_flow

    try:
        flow = matching_flow(optimizer)
        flow_meta = {"flow": flow.name, "hyper": flow.hyperparameters(),
                     "eps_placement": flow.eps_placement}
    except (NotImplementedError, ValueError):
        flow_meta = {"flow": None, "hyper": None}
    return {
        "kind": "discrete",
        "optimizer": optimizer.name,
        "optimizer_hyper": optimizer.hyperparameters(),
        "eps_placement": optimizer.eps_placement,
        "eta": float(optimizer.eta),
        **flow_meta,
        **objective.describe(),
        "t0": 0.0,
        "t1": float(steps * optimizer.eta),
        "steps": int(steps),
        "save_every": int(save_every),
        "batch_size": None if batch_size is None else batch_size.size,
        "sampling": None if batch_size is None else (
            "independent" if batch_size.independent else "epochs"),
        "dtype": jnp.dtype(dtype).name,
        "batch": bool(batch),
    }
