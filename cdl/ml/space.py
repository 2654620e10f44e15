"""Search spaces (each model family declares its own: cdl.ml.family), what the tuner searches.

A space maps a hyperparameter to a range, as plain JSON-able data so that a
setting can override it per model:

- ``["log", low, high]``: a float, log-uniform;
- ``["float", low, high]``: a float, uniform;
- ``["int", low, high]``: an integer in [low, high];
- ``["choice", [a, b, ...]]``: one of the values.

The epoch budget is not searched: each trial may run up to the tuner's
``max_epochs`` and the pruner decides how many it gets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from cdl.errors import ConfigError
from cdl.ml.family import get_family

__all__ = ["Space", "space_for", "suggest", "validate_space"]

#: hyperparameter name -> its range (see the module docstring)
Space = Mapping[str, Sequence[Any]]


class _Trial(Protocol):
    """What :func:`suggest` needs of an ``optuna.Trial``."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = ...) -> float: ...

    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any: ...


def validate_space(space: Space) -> None:
    """Raise ConfigError unless every range is one of the forms above."""
    for name, spec in space.items():
        kind = spec[0] if spec else None
        ok = (kind in ("log", "float", "int") and len(spec) == 3 and float(spec[1]) <= float(spec[2])) or (
            kind == "choice" and len(spec) == 2 and isinstance(spec[1], (list, tuple)) and len(spec[1]) > 0
        )
        if not ok or (kind == "log" and float(spec[1]) <= 0):
            raise ConfigError("bad search range", name=name, range=list(spec))


def space_for(family: str, overrides: Mapping[str, Sequence[Any]] | None = None) -> dict[str, Sequence[Any]]:
    """The family's space with ``overrides`` (a range per name; an empty list drops the name)."""
    space: dict[str, Sequence[Any]] = dict(get_family(family).space)
    for name, spec in (overrides or {}).items():
        if not spec:
            space.pop(name, None)
        else:
            space[name] = spec
    validate_space(space)
    return space


def suggest(trial: _Trial, space: Space) -> dict[str, Any]:
    """One value per hyperparameter of ``space``, drawn through ``trial``."""
    out: dict[str, Any] = {}
    for name, spec in space.items():
        kind = spec[0]
        if kind == "log":
            out[name] = trial.suggest_float(name, float(spec[1]), float(spec[2]), log=True)
        elif kind == "float":
            out[name] = trial.suggest_float(name, float(spec[1]), float(spec[2]))
        elif kind == "int":
            out[name] = trial.suggest_int(name, int(spec[1]), int(spec[2]))
        else:
            out[name] = trial.suggest_categorical(name, list(spec[1]))
    return out
