"""Input checks that `simulate` and `run` share (the model, the initial parameters)."""

from __future__ import annotations

import numpy as np


def is_model(model) -> bool:
    """Whether `model` is one of marginflow's homogeneous models (else: a flat parameter
    vector or a user's model, which `Objective` wraps)."""
    from .models import AbstractModel

    return isinstance(model, AbstractModel)


def check_finite_params(w0, where: str) -> None:
    """ValueError if the initial parameters hold NaN or inf."""
    w = np.asarray(w0)
    if not np.all(np.isfinite(w)):
        raise ValueError(
            f"{where}: the initial parameters must be finite, found "
            f"{int(np.sum(~np.isfinite(w)))} NaN/inf entries; re-initialise the model."
        )
