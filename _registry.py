"""One table of names to classes for everything a run's metadata or a user's string names:
models, flows, losses and optimisers. Each class enters it where it is defined
(`@register(kind)`), so no base module imports its subclasses, and `lookup` is the one
place that turns a name back into a class (rebuilding a run from a checkpoint or a saved
Trajectory, `loss="logistic"`)."""

from __future__ import annotations

from typing import TypeVar

_KINDS = ("model", "flow", "loss", "optimizer")
_TABLES: dict[str, dict[str, type]] = {kind: {} for kind in _KINDS}
T = TypeVar("T", bound=type)


def register(kind: str, name: str | None = None):
    """Class decorator: enter the class in `kind`'s table under `name` (default: its `name`
    class attribute, else its class name)."""
    if kind not in _TABLES:
        raise ValueError(f"register: `kind` must be one of {_KINDS}, got {kind!r}.")

    def enter(cls: T) -> T:
        key = name or getattr(cls, "name", None) or cls.__name__
        _TABLES[kind][key] = cls
        return cls

    return enter


def known(kind: str) -> list[str]:
    """The registered names of `kind`, sorted."""
    return sorted(_TABLES[kind])


def lookup(kind: str, name, what: str | None = None) -> type:
    """The class registered as `name`; ValueError naming the known ones otherwise."""
    table = _TABLES[kind]
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"unknown {what or kind} {name!r}; known: {known(kind)}.")
    return table[name]
