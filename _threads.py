"""Batches on CPU: one chunk of the initialisations per core, run from threads.

One vmapped XLA:CPU call keeps one core busy. Concurrent calls from several Python threads
run in parallel on XLA's thread pool (measured on the toy sweep: 1.45-1.65x on 2 cores), so
`simulate` and `run` cut a batch into equal chunks and call their compiled function once per
chunk. Members do not interact, so the results equal those of one call.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np

from ._checks import check_int


def n_workers(workers, n_batch: int, where: str) -> int:
    """The number of chunks: `workers`, or the cores this process may use; 1 off CPU."""
    if workers is not None:
        check_int(workers, "workers", where, 1,
                  "pass the number of threads, or None for one per core")
    if jax.default_backend() != "cpu" or n_batch < 2 or workers == 1:
        return 1  # one call fills an accelerator
    if _scoped_settings() != _in_new_thread(_scoped_settings):
        # A `with jax.debug_nans(True):` (or default_device, ...) block is thread-local:
        # worker threads would not see it, so honour it with one call on this thread.
        return 1
    if workers is None:
        workers = usable_cores()
    return max(1, min(int(workers), n_batch))


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (a
    container limited to 2 CPUs on a 64-core host gets 2 threads, not 64)."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda t: t.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):
        try:
            with open(path) as f:
                text = f.read()
            if parse is not None:
                quota, period = parse(text)[:2]
            else:
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                    quota, period = text.strip(), f.read().strip()
            if quota not in ("max", "-1") and float(quota) > 0:
                cores = min(cores, max(1, math.floor(float(quota) / float(period))))
            break
        except (OSError, ValueError):
            continue
    return cores


# JAX settings that context managers set per thread (jax.debug_nans(True) etc.). Not the
# matmul precision: `map_chunks` makes each call under the caller's, and a float32 run (or
# its resume) sets one, which must not cost the batch its chunking.
_SCOPED = ("jax_debug_nans", "jax_debug_infs", "jax_default_device", "jax_disable_jit",
           "jax_numpy_dtype_promotion", "jax_enable_x64")


def _scoped_settings():
    return tuple(str(getattr(jax.config, name, None)) for name in _SCOPED)


def _in_new_thread(fn):
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def map_chunks(call, trees, workers: int, *, size: int | None = None):
    """call(*chunk) for `workers` equal chunks of the leading axis of `trees`, concatenated.

    The members are padded (copies of the last one, dropped afterwards) to `workers`
    chunks of `size` (default ceil(B / workers)) so every chunk has one shape: one
    compilation, made once even when the threads call at the same time (measured).
    Host-side numpy: the arrays live on the CPU (this is used off CPU with workers = 1 only).
    """
    leaves = [x for x in jax.tree.leaves(trees) if np.ndim(x) > 0]
    n = leaves[0].shape[0]
    size = size or math.ceil(n / workers)
    extra = size * workers - n

    def pad(x):  # unbatched (0-d) leaves are passed to every chunk as they are
        if np.ndim(x) == 0:
            return x
        x = np.asarray(x)
        return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x

    padded = jax.tree.map(pad, trees)
    # The run's matmul precision (marginflow/_precision.py) is a thread-local setting that
    # worker threads would not see: each call is made under the caller's.
    precision = jax.config.jax_default_matmul_precision

    def one(i):
        part = jax.tree.map(
            lambda x: x if np.ndim(x) == 0 else x[i * size:(i + 1) * size], padded)
        with jax.default_matmul_precision(precision):
            return jax.block_until_ready(call(*part))

    if workers == 1:
        outs = [one(0)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            outs = list(pool.map(one, range(workers)))
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:n], *outs)
