"""The verification bank: a named, seeded table of flow problems with independently known answers.

Modelled on optimistix's banks of test problems. A row (`Problem`) names one integration: a
flow with its hyper-parameters, a loss, a model (class, shapes, seed), a data set (generator,
size, seed), a dtype, the horizon t1 and the solver tolerances, and whether it belongs to the
default slice or only to the full table (`slow`). tests/test_bank.py runs every row with
`marginflow.flows.simulate` and checks it against answers that do not come from marginflow:

- the NumPy/scipy oracle of tests/bank_oracle.py (the ODE written from the equations, with
  hand-derived gradients, integrated by LSODA) up to t = 1e5;
- the theory's late-time statements (Theorem 10's loss rate, Lemma 3's monotone quantity,
  Theorems 4/5's conditioner limits, and for linear models the exact max-margin direction).

Rows are plain frozen dataclasses; `ROWS` is the table, `DEFAULT` / `SLOW` its two slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from bank_oracle import FlowSpec
from bank_oracle import Problem as OracleProblem
from marginflow.flows import AdaGradFlow, AdamFlow, GradientFlow, RMSPropFlow
from marginflow.models import (
    MLP,
    Dataset,
    DeepLinear,
    Linear,
    ToyLeaky,
    flatten,
    separable_gaussians,
    toy_dataset,
)

# ----------------------------------------------------------------------- factories


def make_flow(spec: FlowSpec):
    """marginflow's flow for a FlowSpec (the oracle reads the same spec's numbers)."""
    if spec.kind == "gd":
        return GradientFlow()
    if spec.kind == "adagrad":
        return AdaGradFlow(spec.eps, eps_placement=spec.conditioner.removeprefix("eps_"))
    if spec.kind == "rmsprop":
        return RMSPropFlow(spec.eps, spec.b, eps_placement=spec.conditioner.removeprefix("eps_"))
    if spec.kind == "adam":
        return AdamFlow(spec.eps, spec.b, bias_correction=spec.correction,
                        eps_placement=spec.conditioner.removeprefix("eps_"))
    raise ValueError(spec.kind)


@dataclass(frozen=True)
class ModelSpec:
    """A model class, its shapes and the seed of its initialisation.

    kind "linear": dims (d, C) -> Linear(d, out_dim=C); "deep_linear": DeepLinear(dims);
    "mlp": dims (d, width, ..., C) -> MLP(d, width, depth, out_dim=C, activation=2) (the
    smooth activation max(z, 0)^2); "toy": ToyLeaky (dims (2, 1)).
    """

    kind: str
    dims: tuple[int, ...]
    seed: int

    def make(self):
        key = jax.random.key(self.seed)
        d, c = self.dims[0], self.dims[-1]
        if self.kind == "linear":
            return Linear(d, out_dim=c, key=key)
        if self.kind == "deep_linear":
            return DeepLinear(self.dims, key=key)
        if self.kind == "mlp":
            widths = set(self.dims[1:-1])
            assert len(widths) == 1, "MLP layers share one width"
            return MLP(d, widths.pop(), len(self.dims) - 1, out_dim=c, activation=2, key=key)
        if self.kind == "toy":
            return ToyLeaky(key=key)
        raise ValueError(self.kind)

    @property
    def tag(self) -> str:
        multi = "mc" if self.dims[-1] > 1 else ""
        return {"linear": "linear", "deep_linear": "deeplin", "mlp": "mlp", "toy": "toy"}[
            self.kind] + multi


def separable_blobs(n: int, dim: int, classes: int, *, gap: float = 0.5, seed: int) -> Dataset:
    """n points in R^dim, `classes` classes (integer labels), linearly separable through the
    origin: class c is centred at mu_c (norm 3, random direction) and a point x of class c
    is kept only if (mu_c - mu_j) . x >= gap for every j != c, so W = (mu_1; ...; mu_C)
    separates the data with multi-class margin >= gap."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(classes, dim))
    mu *= 3.0 / np.linalg.norm(mu, axis=1, keepdims=True)
    X, y = [], []
    while len(y) < n:
        c = len(y) % classes
        x = mu[c] + rng.normal(size=dim)
        if np.min(np.delete((mu[c] - mu) @ x, c)) >= gap:
            X.append(x)
            y.append(c)
    return Dataset(np.array(X), np.array(y, dtype=np.int32))


@dataclass(frozen=True)
class DataSpec:
    """A data generator, its size and seed: "gaussians" (separable_gaussians(n, dim), binary),
    "blobs" (separable_blobs(n, dim, classes)), "toy" (toy_dataset: 100 points in R^2)."""

    kind: str
    n: int
    dim: int
    seed: int
    classes: int = 2

    def make(self) -> Dataset:
        if self.kind == "gaussians":
            return separable_gaussians(self.n, self.dim, seed=self.seed)
        if self.kind == "blobs":
            return separable_blobs(self.n, self.dim, self.classes, seed=self.seed)
        if self.kind == "toy":
            return toy_dataset(self.seed)
        raise ValueError(self.kind)


# ------------------------------------------------------------------------ the rows

T1_F64 = 1e100
T1_F32 = 1e30  # simulate's float32 limit (t * grad L must stay below float32's max)
# rtol 1e-10 in float64 (the oracle comparison at 1e5 then has 4 decades of margin, see
# test_bank); float32 runs at the smallest rtol simulate accepts, 1e-6 (float32 resolves
# relative changes of 1.2e-7).
RTOL_F64 = 1e-10
RTOL_F32 = 1e-6


def save_times(t1: float) -> np.ndarray:
    """0, then 4 saves per decade from 1e-2 to t1, with 1, 1e5 and 1e10 exact save times."""
    quarters = np.arange(-8, 4 * round(np.log10(t1)) + 1)
    ts = [float(f"1e{k // 4}") if k % 4 == 0 else 10.0 ** (k / 4) for k in quarters]
    ts = np.array([0.0, *ts])
    ts[-1] = t1
    return ts


@dataclass(frozen=True)
class Problem:
    """One row of the bank (see the module docstring)."""

    name: str
    flow: FlowSpec
    loss: str
    model: ModelSpec
    data: DataSpec
    dtype: str = "float64"
    t1: float = T1_F64
    rtol: float = RTOL_F64
    atol: float = 1e-14
    slow: bool = True
    max_steps: int = 100_000  # simulate's limit per segment (a decade; ten after 1e10)

    @property
    def ts(self) -> np.ndarray:
        return save_times(self.t1)

    @property
    def jnp_dtype(self):
        return jnp.float64 if self.dtype == "float64" else jnp.float32

    @property
    def eps_dtype(self) -> float:
        """The unit roundoff of the run's dtype."""
        return float(np.finfo(self.dtype).eps)

    def make_flow(self):
        return make_flow(self.flow)

    def oracle(self) -> OracleProblem:
        data = self.data.make()
        return OracleProblem(self.model.kind, self.model.dims, np.asarray(data.X, np.float64),
                             np.asarray(data.y), self.loss)

    def w0(self) -> np.ndarray:
        return np.asarray(flatten(self.model.make()), np.float64)


# The flow variants: every flow, both eps placements, both Adam corrections; eps and b vary
# between them (they are traced values: no recompilation for a new eps or b).
FLOW_VARIANTS = {
    "gd": FlowSpec("gd"),
    "adagrad": FlowSpec("adagrad", eps=1e-5),
    "adagrad_out": FlowSpec("adagrad", eps=1e-3, conditioner="eps_outside"),
    "rmsprop": FlowSpec("rmsprop", eps=1e-5, b=0.9),
    "rmsprop_out": FlowSpec("rmsprop", eps=1e-4, b=0.5, conditioner="eps_outside"),
    "adam": FlowSpec("adam", eps=1e-5, b=0.9, correction="paper"),
    "adam_out": FlowSpec("adam", eps=1e-3, b=0.99, correction="paper",
                         conditioner="eps_outside"),
    "adam_ema": FlowSpec("adam", eps=1e-2, b=0.5, correction="ema"),
    "adam_ema_out": FlowSpec("adam", eps=1e-5, b=0.9, correction="ema",
                             conditioner="eps_outside"),
}

# (model, data, losses): the binary models with both binary losses, the multi-class ones
# with cross-entropy. Shapes are fixed per model (so rows share compiled programs); the
# seeds vary per row.
MODELS = {
    "linear": (ModelSpec("linear", (5, 1), 0), DataSpec("gaussians", 30, 5, 0)),
    "toy": (ModelSpec("toy", (2, 1), 0), DataSpec("toy", 100, 2, 0)),
    "deeplin": (ModelSpec("deep_linear", (4, 3, 3, 1), 0), DataSpec("gaussians", 20, 4, 0)),
    "mlp": (ModelSpec("mlp", (4, 6, 1), 0), DataSpec("gaussians", 20, 4, 0)),
    "linearmc": (ModelSpec("linear", (4, 3), 0), DataSpec("blobs", 30, 4, 0, classes=3)),
    "mlpmc": (ModelSpec("mlp", (4, 8, 3), 0), DataSpec("blobs", 30, 4, 0, classes=3)),
}
LOSSES = {
    "linear": ("exponential", "logistic"),
    "toy": ("exponential", "logistic"),
    "deeplin": ("exponential", "logistic"),
    "mlp": ("exponential", "logistic"),
    "linearmc": ("cross_entropy",),
    "mlpmc": ("cross_entropy",),
}
LOSS_TAGS = {"exponential": "exp", "logistic": "logistic", "cross_entropy": "ce"}

# The default slice: every flow variant, every loss, every model and float32 at least once,
# in under 3 minutes on 2 cores including compilation (one compilation per distinct
# (flow type and switches, model shapes, loss, dtype)).
DEFAULT_NAMES = {
    "linear-exp-gd",
    "linear-exp-adagrad",
    "linear-logistic-adagrad_out",
    "linear-exp-rmsprop_out",
    "linear-exp-adam_out",
    "toy-exp-adam",
    "deeplin-exp-adam_ema",
    "mlp-logistic-rmsprop",
    "linearmc-ce-adam_ema_out",
    "mlpmc-ce-gd",
    "linear-exp-rmsprop-f32",
}

# float32 rows (t1 = 1e30): every flow variant on the linear model, and each other model once.
F32_ROWS = [("linear", "exponential", v) for v in FLOW_VARIANTS] + [
    ("toy", "exponential", "rmsprop"),
    ("deeplin", "exponential", "gd"),
    ("mlp", "logistic", "adam"),
    ("linearmc", "cross_entropy", "adam_ema"),
    ("mlpmc", "cross_entropy", "rmsprop"),
]


def row_atol(flow: FlowSpec, rtol: float, f32: bool) -> float:
    """The absolute tolerance of a row: where a state component is near 0, it bounds the
    error. For w (O(1) and growing) 1e-14 (float64) or 1e-10 (float32, whose relative
    resolution is 1.2e-7). m acts through h: with eps inside the root dh/h = dm / (2 eps)
    near m = 0, so rtol eps keeps h to rtol; outside, dh/h ~ sqrt(dm) / eps, so rtol eps^2
    keeps it to sqrt(rtol). (The controller uses one atol for the whole state.)"""
    cap = 1e-10 if f32 else 1e-14
    if flow.kind == "gd":
        return cap
    scale = flow.eps if flow.conditioner == "eps_inside" else flow.eps**2
    return min(cap, rtol * scale)


# Rows with other seeds than their model's first one (same shapes and flow: they reuse the
# compiled programs): float32 AdaGrad problems whose late field is stiff (a coordinate with
# h near eps^(-1/2)). The implicit late solver AdaGrad had stalled on them (max_steps_reached
# at t = 3.7e19); the explicit Dopri8 it has now takes ~9e3 steps per ten decades there
# (measured 8982 and 8435 on s101), against < 1e3 on the other rows.
EXTRA_SEED_ROWS = [
    ("linear", "exponential", "adagrad", 101, "float32"),
    ("linear", "exponential", "adagrad_out", 102, "float32"),
]


def _row(model_tag: str, loss: str, variant: str, seed: int, dtype: str = "float64",
         suffix: str = "") -> Problem:
    mspec, dspec = MODELS[model_tag]
    name = (f"{model_tag}-{LOSS_TAGS[loss]}-{variant}" + ("-f32" if dtype == "float32" else "")
            + suffix)
    f32 = dtype == "float32"
    return Problem(
        name=name,
        flow=FLOW_VARIANTS[variant],
        loss=loss,
        model=ModelSpec(mspec.kind, mspec.dims, seed),
        data=DataSpec(dspec.kind, dspec.n, dspec.dim, seed, dspec.classes),
        dtype=dtype,
        t1=T1_F32 if f32 else T1_F64,
        rtol=RTOL_F32 if f32 else RTOL_F64,
        atol=row_atol(FLOW_VARIANTS[variant], RTOL_F32 if f32 else RTOL_F64, f32),
        slow=name not in DEFAULT_NAMES,
    )


def _build() -> list[Problem]:
    rows = []
    for i, model_tag in enumerate(MODELS):
        for loss in LOSSES[model_tag]:
            for j, variant in enumerate(FLOW_VARIANTS):
                rows.append(_row(model_tag, loss, variant, seed=10 * i + j))
    # A float32 row is the float64 row of the same name in float32 (same seeds).
    seeds = {r.name: r.model.seed for r in rows}
    for model_tag, loss, variant in F32_ROWS:
        seed = seeds[f"{model_tag}-{LOSS_TAGS[loss]}-{variant}"]
        rows.append(_row(model_tag, loss, variant, seed=seed, dtype="float32"))
    for model_tag, loss, variant, seed, dtype in EXTRA_SEED_ROWS:
        rows.append(_row(model_tag, loss, variant, seed=seed, dtype=dtype, suffix=f"-s{seed}"))
    names = [r.name for r in rows]
    assert len(set(names)) == len(names), "row names must be unique"
    assert DEFAULT_NAMES <= set(names), DEFAULT_NAMES - set(names)
    return rows


ROWS: list[Problem] = _build()
DEFAULT = [r for r in ROWS if not r.slow]
SLOW = [r for r in ROWS if r.slow]
