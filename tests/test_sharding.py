"""Batches of initialisations (one vmapped call), sharded over devices, and float32 (issue 5)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import marginflow  # noqa: F401  (float64)
import numpy as np
import pytest
from marginflow.flows import RMSPropFlow, simulate
from marginflow.models import ToyLeaky, toy_dataset

FLOW = RMSPropFlow(1e-5, 0.9)


@pytest.mark.slow
def test_batch_of_100_matches_single_runs():
    keys = jax.random.split(jax.random.key(3), 100)
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(keys)
    data = toy_dataset(0)
    batch = simulate(FLOW, models, data, 1e10, batch=True, n_save=11)
    assert batch.success and batch.w.shape == (100, 11, 3)
    assert np.all(np.isfinite(batch.w))
    for b in (0, 57):
        single = simulate(FLOW, ToyLeaky(key=keys[b]), data, 1e10, n_save=11)
        # Every member takes its own steps under vmap, so member and single run agree to
        # the solver's accuracy, not bitwise: 1e-5 relative is 1000 x rtol, room for the
        # global error over 30 decades (the toy's kinks make it step-sequence dependent).
        # Relative to |w| per save: a component near 0 has no relative accuracy of its own.
        diff = np.linalg.norm(batch.w[b] - single.w, axis=-1)
        assert np.max(diff / np.linalg.norm(single.w, axis=-1)) < 1e-5


_SHARD_SCRIPT = textwrap.dedent(
    """
    import equinox as eqx, jax, numpy as np
    import marginflow
    from marginflow.flows import RMSPropFlow, simulate
    from marginflow.models import ToyLeaky, toy_dataset
    assert jax.local_device_count() == 4, jax.local_devices()
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(jax.random.split(jax.random.key(1), 6))
    flow, data = RMSPropFlow(1e-5, 0.9), toy_dataset(0)
    a = simulate(flow, models, data, 1e5, batch=True, n_save=12)
    b = simulate(flow, models, data, 1e5, batch=True, n_save=12, shard=False)
    assert a.meta["devices"] == 4 and b.meta["devices"] == 1, (a.meta, b.meta)
    assert a.w.shape == b.w.shape == (6, 12, 3)
    assert a.success and b.success
    # Same members, same tolerance; different SPMD programs round differently, which the
    # step-size control turns into differences at the tolerance level (rtol 1e-8), grown by
    # the toy's kinks (measured up to 3.6e-7 of |w|). Relative to |w| per save: a component
    # near 0 has no relative accuracy of its own.
    rel = np.linalg.norm(a.w - b.w, axis=-1) / np.linalg.norm(b.w, axis=-1)
    assert rel.max() < 1e-5, rel.max()
    print("OK")
    """
)



# A subprocess with 8 host devices (40 s of the default run on 2 cores): -m slow.
@pytest.mark.slow
def test_batch_is_sharded_over_all_local_devices():
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", _SHARD_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.slow  # 20 s; the verification bank's default float32 row checks float32 runs
def test_float32_agrees_with_float64_where_it_resolves_the_answer():
    model, data = ToyLeaky(key=jax.random.key(0)), toy_dataset(0)
    kw = dict(n_save=9, rtol=1e-5, atol=1e-8)
    ref = simulate(FLOW, model, data, 1e6, n_save=9, rtol=1e-10, atol=1e-14)
    a = simulate(FLOW, model, data, 1e6, dtype=jnp.float64, **kw)
    b = simulate(FLOW, model, data, 1e6, dtype=jnp.float32, **kw)
    assert b.w.dtype == np.float32 and a.success and b.success and ref.success
    # At the same tolerance float32 must be as accurate as float64 up to its rounding: its
    # error against a tight float64 reference is at most 3x the float64 run's (tolerance-
    # driven; the toy's kinks amplify it to ~2e-4 early on) plus the worst-case linear
    # accumulation of float32 rounding, steps x 1.2e-7 x max|w| (~3e-3 here). A broken
    # float32 path (t lost in e^u, overflow, float64 promotion) is off by O(1) or raises.
    rounding = b.stats["num_steps"] * np.finfo(np.float32).eps * np.max(np.abs(ref.w))
    err64 = np.max(np.abs(a.w - ref.w))
    err32 = np.max(np.abs(b.w - ref.w))
    assert err32 <= 3 * err64 + rounding, (err32, err64, rounding)
    # log L to the same standard (|log L| <= 25 here).
    rounding = b.stats["num_steps"] * np.finfo(np.float32).eps * np.max(np.abs(ref.log_loss))
    err64 = np.max(np.abs(a.log_loss - ref.log_loss))
    err32 = np.max(np.abs(b.log_loss - ref.log_loss))
    assert err32 <= 3 * err64 + rounding, (err32, err64, rounding)


def test_shard_needs_batch():
    with pytest.raises(ValueError, match="shard=True.*batch=True"):
        simulate(FLOW, ToyLeaky(key=jax.random.key(0)), toy_dataset(0), 10.0, shard=True)


def _flags_after_import(env_extra):
    """XLA_FLAGS in a fresh process after `import marginflow`, and whether the code
    generator is still marginflow's choice there (`_xla.option_ours`)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "MARGINFLOW_XLA_DEFAULTS", "MARGINFLOW_XLA_ADDED")}
    env.update(env_extra)
    code = ("import os, marginflow, marginflow._xla as x\n"
            "print(os.environ.get('XLA_FLAGS', '')); print(x.option_ours(x.EMITTERS))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True)
    flags, ours = out.stdout.split("\n")[:2]
    return flags.strip(), ours == "True"


def _flags_applied(monkeypatch, env_extra):
    """What `_xla.apply_defaults` (the import's step) makes of an environment, run here as
    if JAX's backend had not started (this process's backend has read its flags already,
    so nothing here changes it; monkeypatch restores the environment)."""
    import os

    from jax._src import xla_bridge
    from marginflow import _xla

    with monkeypatch.context() as m:
        for name in ("XLA_FLAGS", "MARGINFLOW_XLA_DEFAULTS", "MARGINFLOW_XLA_ADDED"):
            m.delenv(name, raising=False)
        for name, value in env_extra.items():
            m.setenv(name, value)
        m.setattr(xla_bridge, "_backends", {})
        _xla.apply_defaults()
        return os.environ.get("XLA_FLAGS", ""), _xla.option_ours(_xla.EMITTERS)


def test_import_sets_marginflows_xla_defaults_only_where_they_are_its_to_set(monkeypatch):
    """marginflow's import adds --xla_cpu_prefer_vector_width=512 iff the CPU has AVX-512
    (read here from /proc/cpuinfo independently) and the classic emitters, never overrides
    a user's choice, and a subprocess that inherits the flags it added still counts them as
    marginflow's (so its programs pin their emitters as the parent's do). The import itself
    in a fresh process, the other cases on the function it calls."""
    try:
        with open("/proc/cpuinfo") as f:
            avx512 = any(line.startswith("flags") and "avx512f" in line.split() for line in f)
    except OSError:
        avx512 = False
    vector, classic = "--xla_cpu_prefer_vector_width=512", "--xla_cpu_use_fusion_emitters=false"
    ours = f"{vector} {classic}" if avx512 else classic
    assert _flags_after_import({}) == (ours, True)

    def applied(**env):
        return _flags_applied(monkeypatch, env)

    assert applied() == (ours, True)
    assert applied(MARGINFLOW_XLA_DEFAULTS="0") == ("", False)
    mine = "--xla_cpu_prefer_vector_width=256"
    assert applied(XLA_FLAGS=mine) == (f"{mine} {classic}", True)
    other = "--xla_cpu_enable_fast_math=false"
    assert applied(XLA_FLAGS=other) == (f"{other} {ours}", True)
    fusion = "--xla_cpu_use_fusion_emitters=true"  # the user's choice: left, and not pinned
    assert applied(XLA_FLAGS=fusion) == (f"{fusion} {vector}" if avx512 else fusion, False)
    inherited = {"XLA_FLAGS": ours, "MARGINFLOW_XLA_ADDED": ours}
    assert applied(**inherited) == (ours, True)  # not added twice, still ours
    # declined in a subprocess: the flags its parent added are taken back
    assert applied(**inherited, MARGINFLOW_XLA_DEFAULTS="0") == ("", False)
    # a second copy, appended to what was inherited, is the user's choice
    assert applied(**{**inherited, "XLA_FLAGS": f"{ours} {classic}"}) == (f"{ours} {classic}",
                                                                         False)


def test_batch_in_threads_matches_one_call():
    """simulate(batch=True, workers=k) integrates k chunks from threads; every member is
    the same initial value problem, so results agree to the solver's accuracy (the same
    1e-5 relative as the sharded test above: another batch width rounds differently).
    kink_tol=0: every kink resolved at rtol; a kink step taken in one chunking and not in
    the other would move a member by up to kink_tol instead. 5 members in 2 chunks: the
    second is padded with a copy of the last member, dropped afterwards (each further
    worker count would compile one more chunk width)."""
    models = eqx.filter_vmap(lambda k: ToyLeaky(key=k))(jax.random.split(jax.random.key(4), 5))
    data = toy_dataset(0)
    one = simulate(FLOW, models, data, 1e4, batch=True, n_save=9, workers=1, kink_tol=0)
    many = simulate(FLOW, models, data, 1e4, batch=True, n_save=9, workers=2, kink_tol=0)
    assert many.success and many.w.shape == one.w.shape == (5, 9, 3)
    np.testing.assert_allclose(many.w, one.w, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(many.log_loss, one.log_loss, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="`workers` must be an integer >= 1"):
        simulate(FLOW, models, data, 1e2, batch=True, workers=0)


def test_thread_chunks_honour_thread_local_settings_and_scalars():
    """Worker threads do not see `with jax.debug_nans(True):` (thread-local), so a batch
    runs as one call on the caller's thread then; 0-d leaves go to every chunk unchanged."""
    from marginflow._threads import map_chunks, n_workers, usable_cores

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert 1 <= usable_cores() <= cores
    assert n_workers(None, 10, "t") == min(usable_cores(), 10)
    assert n_workers(3, 10, "t") == 3 and n_workers(3, 2, "t") == 2
    with jax.debug_nans(True):
        assert n_workers(3, 10, "t") == 1
    # The matmul precision is passed to the threads (map_chunks): a float32 run, which sets
    # one, and its resume keep their chunking.
    with jax.default_matmul_precision("highest"):
        assert n_workers(3, 10, "t") == 3
    out = map_chunks(lambda a, s: (a * s, s + 0 * a), (np.arange(5.0), 3.0), 2)
    np.testing.assert_array_equal(out[0], 3.0 * np.arange(5.0))
    np.testing.assert_array_equal(out[1], np.full(5, 3.0))


def test_float64_at_import_can_be_declined():
    """Importing marginflow turns on jax_enable_x64 (documented in docs/errors.md); with
    MARGINFLOW_X64=0 it leaves the setting alone, and a float64 run then refuses to start
    with the way to turn float64 on, instead of computing in float32 (JAX's silent
    truncation)."""
    import os
    import subprocess
    import sys

    code = (
        "import jax, marginflow\n"
        "from marginflow.flows import RMSPropFlow, simulate\n"
        "from marginflow.discrete import RMSProp, run\n"
        "from marginflow.models import Linear, soudry_dataset\n"
        "print(jax.config.jax_enable_x64)\n"
        "model, data = Linear(2, key=jax.random.key(0)), soudry_dataset(0)\n"
        "for call in (lambda: simulate(RMSPropFlow(), model, data, 10.0),\n"
        "             lambda: run(RMSProp(0.1), model, data, 10)):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as err:\n"
        "        print(str(err).split(':')[0], 'refused:', 'jax_enable_x64' in str(err))\n"
    )
    outputs = {}
    for value in ("1", "0"):
        env = {k: v for k, v in os.environ.items() if k not in ("JAX_ENABLE_X64",)}
        env["MARGINFLOW_X64"] = value
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], env=env,
                             capture_output=True, text=True, check=True)
        outputs[value] = out.stdout.split("\n")
    assert outputs["1"][0] == "True" and len([x for x in outputs["1"] if x]) == 1
    assert outputs["0"][:3] == ["False", "simulate refused: True", "run refused: True"]
