"""Batched discrete runs on CPU: one chunk of the batch per thread, and members that
overflowed in the first save block dropped from the rest of the run."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .._threads import map_chunks
from ._run import _fresh_carry, _key_batch, _run_compiled

# Batched runs of at least this many save blocks are run in two stages (`_run_batch`).
_STAGE_MIN_BLOCKS = 8


def _run_batch(args, n_blocks, batch_size, n_workers):
    """A batched full-batch run on CPU, one chunk of the batch per thread (marginflow._threads).

    (Also minibatch runs: the carry holds the step count that picks the minibatch.)
    Members whose loss overflowed stop moving but would still cost a full step each
    (vmap computes them all): with n_blocks >= _STAGE_MIN_BLOCKS the first save block is
    run alone, the members that failed in it are dropped, and only the others run the
    remaining blocks. Measured on the paper's toy sweep: 47 of 100 GD runs (lr 0.1)
    overflow within the first block. The results are those of one vmapped call.
    """
    optimizer, objective, w0, steps, save_every, key = args
    w0 = np.asarray(w0)
    # One key per member (run(key=split keys, batch=True)) goes with the members.
    # Chunked as raw key data (numpy cannot hold typed keys), wrapped again per chunk.
    keys = key if key is not None and _key_batch(key) is not None else None
    typed = keys is not None and jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
    impl = jax.random.key_impl(keys) if typed else None
    if typed:
        keys = np.asarray(jax.random.key_data(keys))
    full = math.ceil(w0.shape[0] / n_workers)

    def chunked(w, carry, first_block, count, keys=keys, staged=True):
        # Chunk sizes of a smaller (surviving) batch are rounded up to a multiple of 1/8 of
        # a full chunk: dropping members compiles at most 8 more shapes.
        quantum = max(1, math.ceil(full / 8))
        size = min(full, math.ceil(math.ceil(w.shape[0] / n_workers) / quantum) * quantum)

        def call(w_part, carry_part, key_part):
            return _run_compiled(
                optimizer, objective, w_part, steps, save_every,
                key if keys is None else (jax.random.wrap_key_data(key_part, impl=impl)
                                          if typed else key_part),
                n_blocks if staged else count, batch_size, True, carry0=carry_part,
                first_block=jnp.asarray(first_block, jnp.int32), finish=True,
                count=jnp.asarray(count, jnp.int32) if staged else None)

        records, last, carry = map_chunks(call, (w, carry, keys), n_workers, size=size)
        return jax.tree.map(lambda r: r[:, :count], records), last, carry

    if n_blocks < _STAGE_MIN_BLOCKS:
        return chunked(w0, None, 0, n_blocks, staged=False)
    # Both stages run the n_blocks-row program, with the number of blocks as a traced
    # argument and the first stage starting from an explicit fresh carry: one compilation
    # when nobody fails, instead of one per stage (measured: about 1.5 s each on 2 cores).
    rec_a, last_a, carry_a = chunked(w0, _fresh_carry(optimizer, w0), 0, 1)
    live = np.flatnonzero(carry_a[3])
    if live.size == w0.shape[0]:  # nobody failed: everyone continues
        rec_b, last, carry = chunked(w0, carry_a, 1, n_blocks - 1)
    else:
        # Dead members' later saves: NaN (masked on the host anyway); their last point is
        # their failing iterate, where the first stage left them.
        rec_b = jax.tree.map(
            lambda x: np.full((x.shape[0], n_blocks - 1) + x.shape[2:], np.nan, x.dtype),
            rec_a)
        last, carry = jax.tree.map(np.array, (last_a, carry_a))
        if live.size:
            parts = chunked(w0[live], jax.tree.map(lambda x: x[live], carry_a), 1,
                            n_blocks - 1, None if keys is None else keys[live])
            for whole, part in zip((rec_b, last, carry), parts, strict=True):
                for f, q in zip(jax.tree.leaves(whole), jax.tree.leaves(part), strict=True):
                    f[live] = q
    records = jax.tree.map(lambda a, b: np.concatenate([a, b], axis=1), rec_a, rec_b)
    return records, last, carry


