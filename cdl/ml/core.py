"""The one training core: the trainer, the tuner's trials and the compressor's fine-tune
all train through :func:`fit`.

What it owns (none of it lives in a service): the train/validation split
carved from a version's *train* split (seeded; the holdout is never touched:
:func:`split_version` returns it apart, for the trainer's gate only), the
hyperparameters (a family's defaults under whatever was tuned), the
preprocessing fitted on the training part, the model built with seeded
initial weights, and the :class:`~cdl.ml.train.TrainConfig` the loop runs
with. Seeds are explicit: the same data, parameters and seed give the same
model whichever service asks.

Randomness: the initial weights come from ``torch.manual_seed(seed)`` taken
under a lock (two builds in threads never interleave), the batch order from
a ``torch.Generator`` of its own; dropout draws from torch's global generator,
which :func:`~cdl.ml.train.train` seeds at its start, so runs are
reproducible one training per process at a time (the tuner's workers are
processes for that reason).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from cdl.datasets import DatasetSpec, DatasetVersion, Task
from cdl.errors import InvalidInputError
from cdl.ml import objective
from cdl.ml.family import family_of, get_family
from cdl.ml.models import ModelConfig, build_model
from cdl.ml.preprocess import Preprocessor
from cdl.ml.train import EpochCallback, TrainConfig, TrainResult, pick_device, predict, train, train_batches

if TYPE_CHECKING:
    from cdl.ml.streaming import ShardStream

__all__ = [
    "Assessed",
    "Fitted",
    "SharedSplit",
    "TrainSplit",
    "assess",
    "build_seeded",
    "epochs_to_run",
    "fit",
    "fit_preprocessor",
    "hyperparameters",
    "split_version",
]

_INIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class TrainSplit:
    """Raw (unpreprocessed) features: training part, validation part (both from the version's
    train split) and the holdout (the version's holdout split; only the trainer's gate reads it)."""

    x_train: npt.NDArray[Any]
    y_train: npt.NDArray[Any]
    x_val: npt.NDArray[Any]
    y_val: npt.NDArray[Any]
    x_hold: npt.NDArray[Any]
    y_hold: npt.NDArray[Any]

    def save(self, folder: Path) -> SharedSplit:
        """Write the arrays as ``.npy`` files in ``folder`` for processes that map them (a study's
        workers read one copy of a version through the page cache instead of each its own).
        Texts (Python strings) cannot be mapped: those travel with the handle."""
        folder.mkdir(parents=True, exist_ok=True)
        kept: dict[str, npt.NDArray[Any]] = {}
        for name in _SPLIT_FIELDS:
            arr = getattr(self, name)
            if arr.dtype == object:
                kept[name] = arr
            else:
                np.save(folder / f"{name}.npy", np.ascontiguousarray(arr), allow_pickle=False)
        return SharedSplit(str(folder), kept)


_SPLIT_FIELDS = ("x_train", "y_train", "x_val", "y_val", "x_hold", "y_hold")


@dataclass(frozen=True)
class SharedSplit:
    """A :class:`TrainSplit` saved by :meth:`TrainSplit.save`: cheap to send to a process."""

    folder: str
    inline: dict[str, npt.NDArray[Any]]

    def load(self) -> TrainSplit:
        """The split, its arrays memory-mapped read-only (shared by every process that maps them)."""
        arrays = {
            name: self.inline[name]
            if name in self.inline
            else np.load(Path(self.folder) / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in _SPLIT_FIELDS
        }
        return TrainSplit(**arrays)


@dataclass
class Fitted:
    module: nn.Module
    config: ModelConfig
    preprocessor: Preprocessor
    result: TrainResult
    hyperparameters: dict[str, Any]


def split_version(data: DatasetVersion, val_fraction: float, seed: int) -> TrainSplit:
    """The version's train split, ``val_fraction`` of it (at least one record) carved out for
    validation by a seeded permutation; its holdout split apart."""
    source = data.x if data.x is not None else data.text
    assert source is not None
    train_mask, hold_mask = data.split == 0, data.split == 1
    x_all, y_all = source[train_mask], data.labels[train_mask]
    order = np.random.default_rng(seed).permutation(len(x_all))
    n_val = max(1, int(len(order) * val_fraction))
    val_idx, tr_idx = order[:n_val], order[n_val:]
    return TrainSplit(
        x_train=x_all[tr_idx],
        y_train=y_all[tr_idx],
        x_val=x_all[val_idx],
        y_val=y_all[val_idx],
        x_hold=source[hold_mask],
        y_hold=data.labels[hold_mask],
    )


def hyperparameters(family: str, tuned: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The family's defaults, with whatever was tuned over them."""
    return {**get_family(family).defaults, **(tuned or {})}


def fit_preprocessor(family: str, task: Task, x: npt.NDArray[Any], hparams: Mapping[str, Any]) -> Preprocessor:
    """The family's preprocessing, fitted on the training part ``x``."""
    return get_family(family).preprocessor(task, x, hparams)


def epochs_to_run(hparams: Mapping[str, Any], max_epochs: int = 0) -> int:
    """The epochs a training runs: what the hyperparameters ask for, capped by ``max_epochs`` (0: no cap)."""
    epochs = int(hparams["epochs"])
    return min(epochs, max_epochs) if max_epochs else epochs


def build_seeded(config: ModelConfig, seed: int) -> nn.Module:
    """The model with initial weights drawn from ``seed`` (the same seed, the same weights)."""
    with _INIT_LOCK:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            return build_model(config)
        finally:
            torch.random.set_rng_state(state)


def fit(
    spec: DatasetSpec,
    split: TrainSplit,
    hparams: Mapping[str, Any],
    *,
    seed: int = 0,
    device: str = "auto",
    patience: int = 6,
    max_epochs: int = 0,
    time_budget_s: float = 0.0,
    callback: EpochCallback | None = None,
    warm_start: Callable[[ModelConfig, nn.Module], object] | None = None,
    module: nn.Module | None = None,
    preprocessor: Preprocessor | None = None,
    stream: ShardStream | None = None,
    processes: int = 1,
    timeout_s: float = 0.0,
) -> Fitted:
    """Train a model of ``spec``'s family on ``split`` (its training and validation parts).

    ``max_epochs`` caps the epochs the hyperparameters ask for (0: no cap), ``time_budget_s`` the
    seconds of training (the epochs that fit in it; 0: no limit). ``warm_start``
    may load a parent's weights into the freshly built module (the trainer's warm start).
    ``module``: a given model to train further (the compressor's pruned model, which no config
    describes) instead of one built from the hyperparameters; ``preprocessor``: the one its
    weights were trained with (a fine-tune), instead of one fitted on ``split``.

    ``stream``: the training records streamed from the version's shards (a version larger than
    memory, :mod:`cdl.ml.streaming`); ``split.x_train`` is then a sample the preprocessing is
    fitted on. ``processes`` > 1: one training on that many processes (DDP through torchrun,
    :mod:`cdl.ml.distributed`), stopped and failed past ``timeout_s`` (0: no deadline).
    """
    family = family_of(spec)
    if spec.task not in get_family(family).tasks:
        raise InvalidInputError("the model family does not train this task", family=family, task=spec.task.value)
    hp = dict(hparams)
    regression = spec.task.regression
    config = ModelConfig(family, spec.input_shape, len(spec.labels), hp)
    pre = preprocessor or fit_preprocessor(family, spec.task, split.x_train, hp)
    if regression and preprocessor is None:
        pre = pre.with_target(split.y_train)
    if module is None:
        module = build_seeded(config, seed)
    set_idf = getattr(module, "set_idf", None) if preprocessor is None else None
    # streamed, the sample is only transformed where a text model fits its idf table on it
    xt = pre.transform(split.x_train) if stream is None or set_idf is not None else None
    xv = pre.transform(split.x_val)
    yt, yv = (pre.scale(split.y_train), pre.scale(split.y_val)) if regression else (split.y_train, split.y_val)
    if warm_start is not None:
        warm_start(config, module)
    if set_idf is not None:  # TF-IDF pooling: fitted on this training part
        set_idf(xt)
    epochs = epochs_to_run(hp, max_epochs)
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=int(hp["batch_size"]),
        lr=float(hp["lr"]),
        weight_decay=float(hp["weight_decay"]),
        seed=seed,
        device=device,
        patience=patience,
        regression=regression,
        time_budget_s=time_budget_s,
    )
    if processes > 1:
        from cdl.ml.distributed import train_distributed

        result = train_distributed(
            module,
            cfg,
            xt if stream is None else None,
            yt if stream is None else None,
            xv,
            yv,
            processes=processes,
            callback=callback,
            stream=stream,
            preprocessor=pre,
            timeout_s=timeout_s,
        )
    elif stream is not None:
        batches = stream.batches(pre, cfg.batch_size, pick_device(device))
        result = train_batches(module, batches, xv, yv, cfg, callback)
    else:
        assert xt is not None
        result = train(module, xt, yt, xv, yv, cfg, callback)
    return Fitted(module=module, config=config, preprocessor=pre, result=result, hyperparameters=hp)


@dataclass(frozen=True)
class Assessed:
    """A model's quality on a labelled set, in the task's terms (:mod:`cdl.ml.objective`)."""

    score: float
    """accuracy, or R²: higher is better"""
    loss: float
    """mean cross-entropy, or mean squared error in the target's units"""
    metrics: dict[str, float]
    """the score under its name (``accuracy`` / ``r2``), and for regression ``rmse`` and ``mae``"""


def assess(
    module: nn.Module,
    preprocessor: Preprocessor,
    x: npt.NDArray[Any],
    y: npt.NDArray[Any],
    regression: bool,
    device: str | torch.device = "cpu",
) -> Assessed:
    """Score ``module`` on raw inputs ``x`` against ``y``, as it would answer when served (its
    preprocessing applied, a regression's output in the target's units)."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    if len(x) == 0:
        return Assessed(float("nan"), float("nan"), {})
    out = preprocessor.unscale(predict(module, preprocessor.transform(x), dev))
    target = objective.target_tensor(y, torch.device("cpu"), regression)
    loss = float(objective.loss(torch.from_numpy(np.asarray(out, np.float32)), target, regression))
    metrics = objective.details(out, y, regression)
    return Assessed(metrics[objective.metric_name(regression)], loss, metrics)
