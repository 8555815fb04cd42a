"""Compiled programs: no retrace for new numbers, a persistent cache across processes, lazy
imports (issue "time to first result")."""

import json
import os
import subprocess
import sys
import textwrap
import time

import equinox as eqx
import jax
import marginflow  # noqa: F401
import numpy as np
import pytest
from marginflow.flows import RMSPropFlow, simulate
from marginflow.flows._kernels import _segment_counted
from marginflow.flows._plan import save_slots
from marginflow.models import ToyLeaky, toy_dataset


def test_no_retrace_for_new_t1_n_save_eps_b_or_data():
    """eps and b are array leaves, the save times are traced and padded to a fixed number
    of slots, the data are arrays, and so are the tolerances rtol, atol and kink_tol: a new
    value of any of them reuses the compiled segment."""
    model = ToyLeaky(key=jax.random.PRNGKey(3))
    simulate(RMSPropFlow(eps=1e-5, b=0.9), model, toy_dataset(seed=0), t1=1e3, n_save=20)
    n0 = eqx.debug.get_num_traces(_segment_counted)
    simulate(RMSPropFlow(eps=1e-3, b=0.5), model, toy_dataset(seed=0), t1=1e6, n_save=50)
    simulate(RMSPropFlow(eps=1e-5, b=0.9), model, toy_dataset(seed=1), t1=1e2, n_save=7)
    # More saves in a segment than one call has slots: the segment runs in pieces.
    simulate(RMSPropFlow(eps=1e-4, b=0.99), model, toy_dataset(seed=2), t1=10.0, n_save=300)
    # A convergence study: other tolerances, the same program.
    simulate(RMSPropFlow(eps=1e-5, b=0.9), model, toy_dataset(seed=0), t1=1e3, n_save=20,
             rtol=1e-10, atol=1e-14, kink_tol=1e-4)
    assert eqx.debug.get_num_traces(_segment_counted) == n0


def test_a_segment_in_pieces_equals_one_call():
    """Saves beyond one call's slots split a segment at a save time; the solution does not
    depend on that beyond the solver's error. Both runs at rtol 1e-10 take ~1e3 accepted
    steps to t = 10; each step's local error is below rtol |y|, so they agree to ~1e3 rtol =
    1e-7 relative on this contracting flow; 1e-6 allows a 10x amplification."""
    model = ToyLeaky(key=jax.random.PRNGKey(4))
    data = toy_dataset(seed=0)
    flow = RMSPropFlow(eps=1e-5, b=0.9)
    slots = save_slots(3)
    many = np.linspace(0.0, 10.0, 3 * slots + 5)
    few = many[:: slots // 4]
    few = np.append(few, 10.0) if few[-1] < 10.0 else few
    pieces = simulate(flow, model, data, t1=10.0, ts=many, rtol=1e-10, atol=1e-14)
    one = simulate(flow, model, data, t1=10.0, ts=few, rtol=1e-10, atol=1e-14)
    np.testing.assert_array_equal(pieces.ts, many)
    common = np.isin(many, few)
    for name in ("w", "m", "I", "log_loss"):
        a, b = getattr(pieces, name)[common], getattr(one, name)
        scale = np.max(np.abs(b)) + 1e-300
        assert np.max(np.abs(a - b)) <= 1e-6 * scale, name


_RUN = textwrap.dedent(
    """
    import json, os, sys
    import jax
    counts = {"hits": 0}
    def listen(event, **kw):
        if event == "/jax/compilation_cache/cache_hits":
            counts["hits"] += 1
    jax.monitoring.register_event_listener(listen)
    import marginflow
    from marginflow.flows import RMSPropFlow, simulate
    from marginflow.models import ToyLeaky, toy_dataset
    simulate(RMSPropFlow(eps=1e-5, b=0.9), ToyLeaky(key=jax.random.PRNGKey(0)),
             toy_dataset(seed=0), t1=1e4, n_save=30)
    print(json.dumps({"dir": marginflow.cache_dir(), **counts}))
    """
)


def _run(script, **env):
    out = subprocess.run(
        [sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True,
        text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _segments(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("jit__segment"))


def test_the_clock_says_when_a_program_is_made():
    """`CompileClock(on_compiled=...)` is called once per program, after XLA compiled (or
    loaded) it: what the progress meter turns from "compiling" to "integrating" on."""
    from marginflow._cache import CompileClock

    made = []
    clock = CompileClock(on_compiled=lambda: made.append(clock.seconds))
    fresh = jax.jit(lambda x: x * 3.0 + 1.0)  # a new function: traced and compiled here
    with clock:
        fresh(np.ones(3))
        fresh(np.ones(3))  # compiled already: nothing more
    assert len(made) == 1 and 0 < made[0] == clock.seconds


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "jax-cache"])
def test_compiled_segment_persists_across_processes(tmp_path, stored):
    """The segment holds no host callback, so it persists: as marginflow's stored
    executable (`_stored`), or with MARGINFLOW_EXPORT=0 in JAX's cache; a second process
    loads it (and every other program of the run) instead of compiling anything anew."""
    folder = tmp_path / "cache"
    env = {"MARGINFLOW_CACHE_DIR": str(folder), "MARGINFLOW_EXPORT": "1" if stored else "0"}

    def listing():  # a stored program compiled anew would be written again: mtime
        return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns)
                      for p in folder.rglob("*") if p.is_file())

    first = _run(_RUN, **env)
    assert first["dir"] == str(folder)
    assert oct(folder.stat().st_mode & 0o777) == oct(0o700)  # JAX runs what it loads
    written = listing()
    if stored:
        assert any(p.startswith("marginflow-export/") for p, _ in written), written
        assert not _segments(folder)  # JAX keeps no second copy of a stored program
    else:
        assert _segments(folder), f"no compiled segment in the cache: {written}"
    second = _run(_RUN, **env)
    assert listing() == written  # loaded, nothing compiled anew
    assert second["hits"] >= 1  # the model's eager programs, at least, from JAX's cache


def test_cache_opt_out_and_a_users_jax_configuration_are_kept(tmp_path):
    report = "print(json.dumps({'dir': marginflow.cache_dir()}))"
    off = f"import json, marginflow; marginflow.use_cache(); {report}"
    assert _run(off, MARGINFLOW_CACHE_DIR="off")["dir"] is None
    own = tmp_path / "mine"
    users = (
        f"import json, jax; jax.config.update('jax_compilation_cache_dir', {str(own)!r})\n"
        f"import marginflow; marginflow.use_cache()\n{report}"
    )
    assert _run(users, MARGINFLOW_CACHE_DIR=str(tmp_path / "ours"))["dir"] == str(own)
    assert not (tmp_path / "ours").exists()


def test_a_read_only_cache_folder_is_said_once(tmp_path):
    """A cache folder that exists but cannot be written (a shared cache mounted read-only):
    one marginflow warning, and JAX's warning per program it fails to store (26 lines for
    the CLI's main job) silenced. os.access is patched: as root, chmod does not stop writes."""
    script = (
        "import json, os, warnings\n"
        f"folder = {str(tmp_path)!r}\n"
        "real = os.access\n"
        "os.access = lambda p, mode: False if os.path.abspath(p) == folder else real(p, mode)\n"
        "import marginflow\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    marginflow.use_cache()\n"
        "    warnings.warn(\"Error writing persistent compilation cache entry for 'x': boom\")\n"
        "print(json.dumps({'dir': marginflow.cache_dir(), 'seen': [str(w.message) for w in seen]}))"
    )
    out = _run(script, MARGINFLOW_CACHE_DIR=str(tmp_path))
    assert out["dir"] == str(tmp_path)  # still read: what is stored there loads
    assert len(out["seen"]) == 1 and "read-only" in out["seen"][0], out["seen"]


def test_importing_the_flows_does_not_import_plotting_scipy_or_experiments():
    script = (
        "import json, sys; import marginflow.flows, marginflow.models\n"
        "heavy = ('matplotlib', 'scipy', 'marginflow.experiments', 'pandas')\n"
        "print(json.dumps({'loaded': [m for m in heavy if m in sys.modules]}))"
    )
    assert _run(script)["loaded"] == []


def test_small_problems_compile_with_the_classic_emitters_bit_for_bit(monkeypatch):
    """`segment_program` gives small problems on CPU the segment compiled with XLA's classic
    loop emitters (faster to compile) and large ones the fusion emitters. It is a choice of
    code generator only: a run through each program is the same bit for bit (the second
    run counts the toy as large)."""
    from marginflow.flows import _kernels
    from marginflow.models import MLP, Objective, separable_gaussians

    toy = Objective(ToyLeaky(key=jax.random.PRNGKey(5)), toy_dataset(seed=0))
    w_toy = toy.w0()
    assert _kernels.segment_program(toy, w_toy, "cpu") is _kernels._segment_classic
    assert _kernels.segment_program(toy, w_toy, "gpu") is _kernels._segment
    big = Objective(MLP(20, 64, 2, key=jax.random.PRNGKey(0)), separable_gaussians(200, 20))
    assert big.w0().size * 200 > _kernels.CLASSIC_EMITTERS_MAX_WORK
    assert _kernels.segment_program(big, big.w0(), "cpu") is _kernels._segment_fusion
    # a batch counts each member's work
    batch = np.zeros((_kernels.CLASSIC_EMITTERS_MAX_WORK // (w_toy.size * 100) + 1, w_toy.size))
    assert _kernels.segment_program(toy, batch, "cpu") is _kernels._segment_fusion
    with monkeypatch.context() as m:
        m.setenv("MARGINFLOW_XLA_DEFAULTS", "0")
        assert _kernels.segment_program(toy, w_toy, "cpu") is _kernels._segment

    flow, model, data = RMSPropFlow(eps=1e-5, b=0.9), ToyLeaky(key=jax.random.PRNGKey(5)), \
        toy_dataset(seed=0)
    classic = simulate(flow, model, data, t1=1e4, n_save=11)
    monkeypatch.setattr(_kernels, "CLASSIC_EMITTERS_MAX_WORK", 0)  # the toy counts as large
    assert _kernels.segment_program(toy, w_toy, "cpu") is _kernels._segment_fusion
    fusion = simulate(flow, model, data, t1=1e4, n_save=11)
    assert classic.success and fusion.success
    assert classic.stats["num_steps"] == fusion.stats["num_steps"]
    for name in ("w", "m", "I", "log_loss"):
        np.testing.assert_array_equal(getattr(classic, name), getattr(fusion, name))


_BOTH = """
import hashlib, json, jax, numpy as np, marginflow
from marginflow.discrete import RMSProp, run
from marginflow.flows import AdamFlow, RMSPropFlow, simulate
from marginflow.models import MLP, ToyLeaky, separable_gaussians, toy_dataset
model, data = ToyLeaky(key=jax.random.PRNGKey(5)), toy_dataset(seed=0)
flow = simulate(RMSPropFlow(eps=1e-5, b=0.9), model, data, t1=1e4, n_save=11)
steps = run(RMSProp(0.05, eps=1e-5, b=0.9), model, data, 300, save_every=30)
minibatch = run(RMSProp(0.05, eps=1e-5, b=0.9), model, data, 300, save_every=30,
                batch_size=10, key=jax.random.PRNGKey(2))
big = simulate(AdamFlow(1e-5, 0.9, b1=0.5), MLP(20, 64, 2, activation=2,
               key=jax.random.PRNGKey(0)), separable_gaussians(200, 20, seed=0), t1=10.0,
               n_save=5)
print(json.dumps({k: hashlib.sha256(np.asarray(a).tobytes()).hexdigest() for k, a in
                  (("flow", flow.w), ("flow_I", flow.I), ("run", steps.w),
                   ("minibatch", minibatch.w), ("big", big.w), ("big_m", big.m))}))
"""


def test_results_do_not_depend_on_the_process_default_code_generator():
    """marginflow makes XLA's classic emitters the process default (`_xla`), for the small
    programs; a flow's programs give the same bits under either default (a small problem,
    whose segment is classic, and a large one with momentum, whose segment is pinned to
    the fusion emitters, crossing the clock's switch at t = 1), and a discrete run pins the
    fusion emitters, so all equal a process that keeps XLA's default code generator
    (MARGINFLOW_XLA_DEFAULTS=0; the vector width kept, which changes results by itself).
    Without the discrete run's pin its bits differ (checked when this test was written)."""
    from marginflow import _xla

    if "--xla_cpu_use_fusion_emitters=false" not in os.environ.get("XLA_FLAGS", "").split():
        pytest.skip("this process does not run with marginflow's XLA defaults")
    namespace = {}
    exec(compile(_BOTH.replace("print(", "result = ("), "<both>", "exec"), namespace)
    here = json.loads(namespace["result"])
    kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if _xla.EMITTERS not in f]
    plain = _run(_BOTH, MARGINFLOW_XLA_DEFAULTS="0", MARGINFLOW_XLA_ADDED="",
                 XLA_FLAGS=" ".join(kept))
    assert here == plain


def test_fusion_pinned_programs_follow_the_choice(monkeypatch):
    """`FusionPinned` compiles with the fusion emitters where the choice is marginflow's
    and hands the plain program back where it is the user's."""
    import jax.numpy as jnp
    from marginflow import _xla

    pinned = _xla.FusionPinned(lambda x: x + 1)
    np.testing.assert_array_equal(pinned(jnp.arange(3.0)), [1.0, 2.0, 3.0])
    calls = []
    monkeypatch.setattr(_xla, "option_ours", lambda option: True)
    monkeypatch.setattr(pinned, "fusion", lambda *a: calls.append("fusion"))
    monkeypatch.setattr(pinned, "default", lambda *a: calls.append("default"))
    pinned(1)
    monkeypatch.setattr(_xla, "option_ours", lambda option: False)
    pinned(1)
    assert calls == ["fusion", "default"]


def test_a_stored_segment_runs_bit_for_bit_like_a_traced_one(monkeypatch, tmp_path):
    """The segment compiled and stored (`_stored.py`), then loaded as a later process
    loads it (here: the in-process copies dropped), runs without being traced and gives the
    trajectory of the traced segment bit for bit; a damaged stored file is compiled and
    stored anew, and that copy loads and runs too (JAX's persistent cache holds the program
    by then: a copy of the executable JAX loaded from it would lack its kernels)."""
    from marginflow import _stored

    monkeypatch.setitem(_stored.__dict__, "_folder",
                        lambda: os.path.join(str(tmp_path), "marginflow-export"))

    def fresh():
        for program in _stored.PROGRAMS:
            program._loaded.clear()

    flow, model, data = (RMSPropFlow(eps=1e-5, b=0.9), ToyLeaky(key=jax.random.PRNGKey(6)),
                         toy_dataset(seed=0))
    fresh()
    stored = simulate(flow, model, data, t1=1e4, n_save=11)  # compiled and stored
    folder = tmp_path / "marginflow-export"
    files = os.listdir(folder)  # the segment's, and the run's small programs'
    assert files and all(f.endswith(".pkl") for f in files)
    fresh()
    n0 = eqx.debug.get_num_traces(_segment_counted)
    loaded = simulate(flow, model, data, t1=1e4, n_save=11)
    assert eqx.debug.get_num_traces(_segment_counted) == n0  # loaded, not traced
    for name in files:
        (folder / name).write_bytes(b"not a program")
    fresh()
    again = simulate(flow, model, data, t1=1e4, n_save=11)
    assert eqx.debug.get_num_traces(_segment_counted) == n0 + 1  # compiled anew
    fresh()
    reloaded = simulate(flow, model, data, t1=1e4, n_save=11)
    assert eqx.debug.get_num_traces(_segment_counted) == n0 + 1  # loaded, not traced
    monkeypatch.setenv("MARGINFLOW_EXPORT", "0")
    traced = simulate(flow, model, data, t1=1e4, n_save=11)
    for run in (stored, loaded, again, reloaded, traced):
        assert run.success and run.stats["num_steps"] == traced.stats["num_steps"]
        for name in ("w", "m", "I", "log_loss"):
            np.testing.assert_array_equal(getattr(run, name), getattr(traced, name))


_LAPACK = textwrap.dedent(
    """
    import json, os
    import jax.numpy as jnp
    import numpy as np
    import marginflow
    from marginflow._stored import StoredProgram
    marginflow.use_cache()
    qr = StoredProgram("test_lapack_qr", lambda a: jnp.linalg.qr(a)[1])
    r = np.asarray(qr(jnp.asarray(np.arange(16.0).reshape(4, 4) + 5 * np.eye(4))))
    folder = os.path.join(marginflow.cache_dir(), "marginflow-export")
    print(json.dumps({"r": r.tolist(), "stored": sorted(
        (os.path.join(d, f), os.stat(os.path.join(d, f)).st_mtime_ns)
        for d, _, files in os.walk(folder) for f in files)}))
    """
)


def test_a_stored_program_calling_lapack_runs_in_a_new_process(tmp_path):
    """A process that loads a stored program calling LAPACK (a QR: `newton_solver`'s GMRES)
    without lowering any linear algebra itself must set up JAX's LAPACK kernels first: it
    crashed on a null function pointer before. R is compared with numpy's (up to signs)."""
    env = {"MARGINFLOW_CACHE_DIR": str(tmp_path), "MARGINFLOW_EXPORT": "1"}
    first = _run(_LAPACK, **env)
    second = _run(_LAPACK, **env)  # loads the stored program: nothing written again
    assert first["stored"] and second["stored"] == first["stored"]
    expected = np.abs(np.linalg.qr(np.arange(16.0).reshape(4, 4) + 5 * np.eye(4))[1])
    for run in (first, second):  # Householder QR in float64: rounding of order 1e-15 |R|
        np.testing.assert_allclose(np.abs(run["r"]), expected, rtol=0,
                                   atol=1e-12 * np.max(expected))


def _stored_in(monkeypatch, folder):
    """marginflow's stored programs in `folder` for this test (as a new process sees it)."""
    from marginflow import _stored

    monkeypatch.setitem(_stored.__dict__, "_folder", lambda: str(folder))
    monkeypatch.setitem(_stored._state, "unwritable", False)


def _stored_files(folder):
    return sorted(p.name for p in folder.glob("*.pkl")) if folder.exists() else []


def test_stored_programs_in_unusual_places(monkeypatch, tmp_path):
    """The stored path steps aside where it cannot be right: a read-only folder (the
    program is traced, as JAX's cache can still serve it, instead of compiled afresh in
    every process), a call staged inside another program's trace, a mesh or compute_on
    context (not in the key); a stored file that does not take the call is deleted; and
    two programs may not share a name (the key holds the name, not the function)."""
    import jax.numpy as jnp
    from marginflow import _stored

    folder = tmp_path / "stored"
    _stored_in(monkeypatch, folder)
    monkeypatch.setattr(_stored, "PROGRAMS", list(_stored.PROGRAMS))  # this test's names
    plus = _stored.StoredProgram("test_plus_one", lambda x: x + 1.0)
    x = jnp.arange(3.0)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if str(
        tmp_path) in str(path) else real_access(path, mode, **kw))
    np.testing.assert_array_equal(plus(x), [1.0, 2.0, 3.0])
    assert _stored_files(folder) == [] and list(plus._loaded.values()) == [None]
    monkeypatch.setattr(os, "access", real_access)

    plus._loaded.clear()
    traced = jax.jit(lambda y: plus(x) * y)(2.0)  # x is concrete, but the call is staged
    np.testing.assert_array_equal(traced, [2.0, 4.0, 6.0])
    assert plus._loaded == {} and _stored_files(folder) == []
    with jax.set_mesh(jax.make_mesh((1,), ("b",))):
        assert _stored.program_key("test_plus_one", (x,), {}, "cpu") is None
    from jax.experimental.compute_on import compute_on

    with compute_on("device_host"):
        assert _stored.program_key("test_plus_one", (x,), {}, "cpu") is None

    np.testing.assert_array_equal(plus(x), [1.0, 2.0, 3.0])  # compiled and stored
    (stored,) = _stored_files(folder)
    two = _stored.StoredProgram("test_two_args", lambda a, b: a * b)
    key = _stored.program_key("test_two_args", (x, x), {}, "cpu")
    (folder / stored).rename(folder / f"{key}.pkl")  # a file that does not take (x, x)
    np.testing.assert_array_equal(two(x, x), [0.0, 1.0, 4.0])
    assert _stored_files(folder) == []  # deleted, and the call traced
    with pytest.raises(ValueError, match="is taken"):
        _stored.StoredProgram("test_plus_one", lambda x: x)


def test_stored_programs_of_other_environments_are_pruned_when_unused(tmp_path):
    """One folder per environment (marginflow's source, the libraries' versions): the
    folders of other environments not used for _UNUSED_DAYS days are deleted, used ones
    and this environment's are kept."""
    from marginflow import _stored

    parent = tmp_path / "marginflow-export"
    mine, recent, stale = parent / "mine", parent / "recent", parent / "stale"
    for folder in (mine, recent, stale):
        folder.mkdir(parents=True)
        (folder / "x.pkl").write_bytes(b"")
    (parent / "older-release.pkl").write_bytes(b"")  # the layout before folders
    old = time.time() - (_stored._UNUSED_DAYS + 1) * 86400
    for path in (stale, mine, parent / "older-release.pkl"):
        os.utime(path, (old, old))  # this process's own folder is never deleted
    _stored._prune(str(mine))
    assert sorted(p.name for p in parent.iterdir()) == ["mine", "recent"]


def test_stored_programs_are_keyed_by_exact_values_only():
    """The key changes with any static value, shape, dtype or compiler option and not with
    array values; a call holding a lambda or a class defined outside marginflow and its
    libraries has no key (it is traced: two notebooks may define different functions under
    one name)."""
    import jax.numpy as jnp
    from marginflow._stored import program_key

    def key(*args, options=None):
        return program_key("segment", args, options or {}, "cpu")

    base = key(RMSPropFlow(1e-5, 0.9), jnp.zeros(3), 1e-8, 100)
    assert base is not None
    assert key(RMSPropFlow(1e-3, 0.5), jnp.ones(3), 1e-8, 100) == base  # arrays' values
    assert key(RMSPropFlow(1e-5, 0.9, eps_placement="outside"), jnp.zeros(3), 1e-8,
               100) != base
    assert key(RMSPropFlow(1e-5, 0.9), jnp.zeros(4), 1e-8, 100) != base
    assert key(RMSPropFlow(1e-5, 0.9), jnp.zeros(3, jnp.float32), 1e-8, 100) != base
    assert key(RMSPropFlow(1e-5, 0.9), jnp.zeros(3), 1e-8 * (1 + 2**-52), 100) != base
    assert key(RMSPropFlow(1e-5, 0.9), jnp.zeros(3), 1e-8, 101) != base
    assert key(RMSPropFlow(1e-5, 0.9), jnp.zeros(3), 1e-8, 100,
               options={"xla_cpu_use_fusion_emitters": False}) != base
    assert key(RMSPropFlow(1e-5, 0.9), jnp.zeros(3), lambda x: x) is None

    class Local(eqx.Module):
        a: jax.Array

    assert key(Local(jnp.zeros(3))) is None
    relu, gelu = key(jax.nn.relu), key(jax.nn.gelu)  # library functions: by name
    assert relu is not None and gelu is not None and relu != gelu
    # a wrapper that copies a library function's name is not that function
    assert key(jax.grad(jax.nn.softplus)) is None
    assert key(True) != key(1) and key(0.0) != key(-0.0)


def test_stored_programs_stop_when_the_source_changes(monkeypatch):
    """A file of marginflow changed after the process imported it (an edit, a checkout in
    a running kernel): the process's traces are of the old code, so nothing is stored or
    loaded any more."""
    import jax.numpy as jnp
    from marginflow import _stored

    args = (RMSPropFlow(1e-5, 0.9), jnp.zeros(3))
    assert _stored.program_key("segment", args, {}, "cpu") is not None
    path, mtime, size = _stored._SOURCE_STAMPS[0]
    monkeypatch.setattr(_stored, "_SOURCE_STAMPS",
                        [(path, mtime - 1, size), *_stored._SOURCE_STAMPS[1:]])
    assert _stored.program_key("segment", args, {}, "cpu") is None
