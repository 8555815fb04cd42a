"""Progress meters for `simulate`, passed in as objects (as diffrax's `progress_meter`):
`progress=True` is `TqdmProgressMeter()`, `False` is `NoProgressMeter()`, and any
`AbstractProgressMeter` can be given instead (to log to a file, or feed a dashboard).

A meter hears about segments (decades of t up to 1e10, ten decades after), the unit the
theory's log scale makes natural: `start(total)`, `calling(first)` before each compiled
call (the first one traces and compiles, or loads the program from the cache),
`compiled()` when a program is made (the call then integrates), `done(t, steps,
compile_seconds, count)` after each segment, and `close()`."""

from __future__ import annotations

import numpy as np


class AbstractProgressMeter:
    """The interface; every method does nothing here."""

    def start(self, total: int) -> None:
        """The run has `total` segments."""

    def calling(self, first: bool) -> None:
        """A compiled segment call is about to run (`first`: the run's first)."""

    def compiled(self) -> None:
        """A program was compiled or loaded from the cache; the call goes on integrating."""

    def done(self, t: float, steps: int, compile_seconds: float, count: int = 1) -> None:
        """`count` more segments are done (several at once for a resumed run's restored
        ones); the run is at time t after `steps` solver steps in all."""

    def close(self) -> None:
        """The run ended (or stopped)."""


class NoProgressMeter(AbstractProgressMeter):
    """No output (the default)."""


class TqdmProgressMeter(AbstractProgressMeter):
    """A tqdm bar over the segments; it says "compiling" from the first segment call until
    its program is made, then "integrating", and shows t, the steps and the compile time
    so far."""

    def __init__(self):
        self.bar = None
        self.compiling = False  # between the first segment call and its program

    def start(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="segment", desc="simulate")

    def calling(self, first: bool) -> None:
        self.compiling = first
        self.bar.set_description("simulate (compiling)" if first else "simulate")
        self.bar.refresh()

    def compiled(self) -> None:
        # Programs made before the first segment call (the homogeneity check, the start
        # state) are not the segment's: the bar reads "integrating" only after that call.
        if self.bar is not None and self.compiling:
            self.compiling = False
            self.bar.set_description("simulate (integrating)")
            self.bar.refresh()

    def done(self, t: float, steps: int, compile_seconds: float, count: int = 1) -> None:
        self.bar.set_description("simulate")
        self.bar.set_postfix_str(f"t = {t:.3g}, steps = {steps}, "
                                 f"compile {compile_seconds:.1f} s")
        self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_meter(progress) -> AbstractProgressMeter:
    """The meter for `simulate(progress=...)`: a bool, or a meter object."""
    if isinstance(progress, AbstractProgressMeter):
        return progress
    if progress is None or isinstance(progress, (bool, int, np.bool_, np.integer)):
        return TqdmProgressMeter() if progress else NoProgressMeter()
    raise TypeError(f"simulate: `progress` must be True, False or a progress meter "
                    f"(marginflow.flows.TqdmProgressMeter(), ...), got {progress!r}.")
