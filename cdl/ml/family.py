"""Model families as plugins: one interface, found through Python entry points.

A family is the code of a model: how to build its ``nn.Module`` from a
:class:`~cdl.ml.models.ModelConfig`, its default hyperparameters and the tuner's
search space, the preprocessing fitted on the training part and carried into
serving, and which compressions apply to its graph. The training core, the
trainer, the tuner and the compressor ask a family; none of them knows a
family by name. cdl's own families (``mlp``, ``cnn``, ``text``) are plugins
like a user's.

Families are found only in the installed environment: the entry points of the
group ``cdl.families`` (``[project.entry-points."cdl.families"]`` in a package's
``pyproject.toml``, ``name = "package.module:OBJECT"``, where ``OBJECT`` is a
:class:`ModelFamily` instance or a class that builds one with no arguments).
A name in a message or a registration only selects one of them; nothing is
ever imported from a message. An unknown name is a :class:`~cdl.errors.ConfigError`.
A family whose package fails to import (a broken or half-removed install) is logged
and left out: the other families keep working, and asking for the broken one is a
``ConfigError`` that carries the import error.

Each family's provenance (its package, version and the SHA-256 of the module
that defines it) goes into every model version's lineage (:func:`provenance`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from cdl.datasets import DatasetSpec, Task
from cdl.errors import ConfigError
from cdl.logging import get_logger

if TYPE_CHECKING:
    import numpy.typing as npt
    from torch import nn

    from cdl.ml.models import ModelConfig
    from cdl.ml.preprocess import Preprocessor

__all__ = [
    "COMPRESSIONS",
    "ENTRY_POINT_GROUP",
    "ModelFamily",
    "default_family",
    "family_names",
    "family_of",
    "get_family",
    "installed_families",
    "provenance",
]

ENTRY_POINT_GROUP = "cdl.families"

log = get_logger(__name__)

#: the compressions a family may allow (beside the plain FP32 export, which every family gets)
COMPRESSIONS = frozenset({"int8-dynamic", "int8-static", "fp16", "pruned"})


class ModelFamily(ABC):
    """What cdl needs of a model family (subclass it; see the module docstring and the README)."""

    #: the name datasets and models select it by (lowercase letters, digits, ``-`` and ``_``)
    name: str = ""
    #: the tasks it can train; registering a dataset of another task with it is refused
    tasks: frozenset[Task] = frozenset()
    #: tasks for which it is the family when a dataset names none (cdl's built-ins only, as a rule)
    default_for: frozenset[Task] = frozenset()
    #: default hyperparameters: ``lr``, ``weight_decay``, ``batch_size``, ``epochs`` and the family's own
    defaults: Mapping[str, Any] = {}
    #: the tuner's search space (cdl.ml.space's forms); a setting may override it per model
    space: Mapping[str, Sequence[Any]] = {}
    #: hyperparameters that shape the weights: a warm start needs them equal
    architecture_keys: frozenset[str] = frozenset()
    #: the family reads text (tokenized by a tokenizer versioned with the model), not tensors
    text_input: bool = False
    #: which of :data:`COMPRESSIONS` the compressor tries for its graph
    compressions: frozenset[str] = COMPRESSIONS

    @abstractmethod
    def build(self, config: ModelConfig) -> nn.Module:
        """A freshly initialised module for ``config`` (input shape, classes, hyperparameters)."""

    def preprocessor(self, task: Task, x: npt.NDArray[Any], hparams: Mapping[str, Any]) -> Preprocessor:
        """The preprocessing fitted on the training part ``x`` (carried into serving): by default a
        standardisation, per feature for tabular data (and a regression's flat inputs), over all
        values for images. (A regression's target standardisation is the core's, not a family's.)"""
        from cdl.ml.preprocess import Preprocessor

        per_feature = task is Task.TABULAR or (task is Task.REGRESSION and x.ndim == 2)
        return Preprocessor.fit_tensor(x, per_feature=per_feature)


def _load(ep: EntryPoint) -> ModelFamily:
    obj = ep.load()
    fam = obj() if isinstance(obj, type) and issubclass(obj, ModelFamily) else obj
    if not isinstance(fam, ModelFamily):
        raise ConfigError("a cdl.families entry point is not a ModelFamily", entry_point=ep.value)
    if fam.name != ep.name:
        raise ConfigError("a model family's name differs from its entry point's", entry_point=ep.name, name=fam.name)
    unknown = set(fam.compressions) - COMPRESSIONS
    if unknown:
        raise ConfigError("a model family names unknown compressions", family=fam.name, unknown=sorted(unknown))
    return fam


@functools.cache
def _installed() -> tuple[dict[str, tuple[ModelFamily, EntryPoint]], dict[str, str]]:
    """The families that load, and the error of each that does not."""
    found: dict[str, tuple[ModelFamily, EntryPoint]] = {}
    broken: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found or ep.name in broken:
            raise ConfigError("two installed packages name the same model family", family=ep.name)
        try:
            found[ep.name] = (_load(ep), ep)
        except Exception as e:  # noqa: BLE001 (a plugin's import may raise anything; one never breaks the others)
            broken[ep.name] = f"{type(e).__name__}: {e}"[:300]
            log.error("model family failed to load", family=ep.name, entry_point=ep.value, error=broken[ep.name])
    return found, broken


def _registry() -> dict[str, tuple[ModelFamily, EntryPoint]]:
    return _installed()[0]


def installed_families() -> dict[str, ModelFamily]:
    """Every family the installed environment declares, by name."""
    return {name: fam for name, (fam, _) in _registry().items()}


def get_family(name: str) -> ModelFamily:
    """The installed family ``name`` (a ConfigError naming the installed ones otherwise)."""
    found = _registry().get(name)
    if found is None:
        error = _installed()[1].get(name)
        if error is not None:
            raise ConfigError(f"model family {name!r} is installed but failed to load: {error}", family=name)
        raise ConfigError(
            f"unknown model family {name[:100]!r}; installed: {', '.join(sorted(_registry())) or 'none'}",
            family=name[:100],
        )
    return found[0]


def family_names() -> list[str]:
    """The installed families' names, read from the environment's metadata without importing
    any family's code (ingest checks a registration's family with it)."""
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def family_of(spec: DatasetSpec) -> str:
    """The family a dataset's models are built with: the one it names, else its task's default."""
    return spec.family or default_family(spec.task)


def default_family(task: Task) -> str:
    """The family of a dataset of ``task`` that names none."""
    for name, (fam, _) in sorted(_registry().items()):
        if task in fam.default_for:
            return name
    raise ConfigError("no installed model family is the default for this task", task=task.value)


def provenance(name: str) -> dict[str, str]:
    """Where family ``name``'s code comes from, for lineage: package, version, source hash."""
    fam = get_family(name)
    _, ep = _registry()[name]
    dist = ep.dist
    try:
        source = inspect.getsource(inspect.getmodule(type(fam)) or type(fam)).encode()
    except (OSError, TypeError):
        source = b""
    return {
        "family": name,
        "entry_point": ep.value,
        "package": dist.name if dist is not None else "",
        "version": dist.version if dist is not None else "",
        "source_sha256": hashlib.sha256(source).hexdigest(),
    }
