"""Checkpointed discrete runs: `run(..., checkpoint=DIR)` computed chunk by chunk, each
chunk written atomically (marginflow/_checkpoint.py: lock, run id, hash chain), and
`resume_run(DIR)`, which continues one bitwise as the uninterrupted run."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .. import _checkpoint as ckpt
from .._precision import at_precision
from .._trajectory import Trajectory
from ._run import _fresh, _run_compiled, run


def _run_checkpointed(args, n_blocks, batch_size, batch, checkpoint, per_file, resume_segments,
                      header, data):
    """`run` chunk by chunk, each chunk written atomically to the checkpoint folder.

    Chunk c holds save blocks c * per_file .. (c + 1) * per_file - 1 and the carry
    (w, optimiser state, k, alive) after them; the last chunk also holds the final point.
    """
    folder = ckpt.checkpoint_folder(checkpoint)
    with folder.locked():  # one writer per folder (marginflow/_checkpoint.py)
        return _run_chunks(args, n_blocks, batch_size, batch, folder, per_file,
                           resume_segments, header, data)


def _run_chunks(args, n_blocks, batch_size, batch, folder, per_file, resume_segments, header,
                data):
    optimizer, w0 = args[0], args[2]
    if resume_segments is None:
        # The data as the user passed it (not a float32 run's copy), so that the resumed
        # run describes the same Dataset (its fingerprint) as the uninterrupted one.
        folder.write_run(dict(header, kind="discrete"), w0=np.asarray(w0),
                         X=np.asarray(data.X), y=np.asarray(data.y))
        resume_segments = []
    chunks = [(b, min(per_file, n_blocks - b)) for b in range(0, n_blocks, per_file)]
    parts, carry, last = [], None, None
    for k, (first, count) in enumerate(chunks):
        is_last = k == len(chunks) - 1
        if k < len(resume_segments):
            arrays = resume_segments[k][1]
            parts.append({name: arrays[name] for name in ("w", "m", "h", "log_loss")})
            carry = ckpt.load_tree(arrays, "carry", _carry_like(optimizer, w0, batch),
                                   "the optimiser or its state changed since it was written.")
            if is_last:
                last = {name: arrays["last_" + name] for name in ("w", "m", "h", "log_loss")}
                # "ok": whether the final point's loss and gradient were finite (checkpoints
                # written before it was recorded: its loss, as far as they can tell)
                last["ok"] = arrays.get("last_ok", np.isfinite(arrays["last_log_loss"]))
            continue
        folder.check_writable(f"chunk {k}")
        records, last, carry = jax.block_until_ready(_run_compiled(
            *args, count, batch_size, batch, carry0=carry,
            first_block=jnp.asarray(first, jnp.int32), finish=is_last))
        records = {name: np.asarray(v) for name, v in records.items()}
        parts.append(records)
        extra = {f"last_{name}": np.asarray(v) for name, v in last.items()} if is_last else {}
        folder.write_segment(
            k, {"first_block": first, "blocks": count},
            **records, **extra, **ckpt.save_tree("carry", carry),
        )
    axis = 1 if batch else 0
    records = {name: np.concatenate([p[name] for p in parts], axis=axis)
               for name in ("w", "m", "h", "log_loss")}
    return records, last, carry


def _carry_like(optimizer, w0, batch):
    """The shapes and dtypes of the carry (w, optimiser state, k, alive), for `load_tree`."""
    tx = optimizer.transformation()

    def fresh(w):
        return _fresh(tx, w)

    return jax.eval_shape(jax.vmap(fresh) if batch else fresh, w0)


def resume_run(checkpoint, *, throw: bool = True) -> Trajectory:
    """Continue a discrete run started with `run(..., checkpoint=DIR)`; return its Trajectory.

    The chunks already written are read back (saves and optimiser state); the rest are
    computed from the last chunk's state, still writing checkpoints. The result equals the
    uninterrupted run's. The folder's lock, hash chain and damage rules are `resume`'s
    (marginflow/_checkpoint.py).
    """
    folder = ckpt.checkpoint_folder(checkpoint)
    with folder.locked(create=False):  # held through the run call below
        return _resume_run(folder, throw)


def _resume_run(folder, throw: bool) -> Trajectory:
    from ..models import Dataset, from_spec, unflatten
    from ._optimizers import optimizer_from_meta

    header, arrays, segments = folder.read(repair=folder.writable())
    if header.get("kind") != "discrete":
        raise ValueError(
            f"resume_run: {folder.directory!r} holds a flow run; continue it with "
            "marginflow.flows.resume."
        )
    optimizer = optimizer_from_meta(header)
    skeleton = from_spec(header["model"])
    w0 = jnp.asarray(arrays["w0"])
    if header["batch"]:
        model = eqx.filter_vmap(lambda w: unflatten(skeleton, w))(w0)
    else:
        model = unflatten(skeleton, w0)
    dtype = jnp.float64 if header["dtype"] == "float64" else jnp.float32
    with at_precision(header.get("matmul_precision")):  # float32: the run's own precision
        return run(optimizer, model, Dataset(arrays["X"], arrays["y"]), header["steps"],
                   loss=header["loss"], save_every=header["save_every"],
                   batch=header["batch"], throw=throw, dtype=dtype, checkpoint=folder,
                   blocks_per_checkpoint=header["blocks_per_checkpoint"], _resume=segments)
