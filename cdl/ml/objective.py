"""What a task's models are trained for and judged by: the loss, the metric, and chance.

One rule for every service, so that the trainer's gate, the tuner's objective, the
compressor's accuracy gate, the monitor's health on feedback and the report all
speak of the same number, the task's **score** (higher is better):

============== ============= ===================================================== ========
task           loss          score                                                 chance
============== ============= ===================================================== ========
classification cross-entropy accuracy                                              1/classes
regression     mean squared  R² = 1 - SSE / SST (the share of the target's variance 0
               error         explained; 0 is predicting the mean, 1 is exact)
============== ============= ===================================================== ========

A regression model trains on a standardised target (:class:`~cdl.ml.preprocess.Preprocessor`
keeps the target's mean and standard deviation, fitted on the training part) and is served
in the target's own units: the exported graph scales its output back. R² does not depend on
the scale, so a score measured on the standardised target equals the served one's. For
people, regression also reports RMSE and MAE in the target's units (:func:`details`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # torch is imported where a tensor is made: the monitor scores without it
    import torch

__all__ = [
    "chance",
    "details",
    "loss",
    "metric_name",
    "r2",
    "score",
    "score_sums",
    "sums_score",
    "target_tensor",
]


def metric_name(regression: bool) -> str:
    """The score's name: ``accuracy`` or ``r2``."""
    return "r2" if regression else "accuracy"


def chance(regression: bool, outputs: int) -> float:
    """The score of knowing nothing: guessing a class (1/classes), or predicting the mean (R² 0)."""
    return 0.0 if regression else 1.0 / max(outputs, 1)


def target_tensor(y: npt.NDArray[Any], device: torch.device, regression: bool) -> torch.Tensor:
    """The targets as the loss takes them: float32 values, or int64 class indices."""
    import torch

    dtype = np.float32 if regression else np.int64
    return torch.from_numpy(np.array(y, dtype=dtype)).to(device)  # a copy: y may be a read-only map


def loss(out: torch.Tensor, y: torch.Tensor, regression: bool, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error of the first output, or cross-entropy of the logits."""
    from torch import nn

    if regression:
        return nn.functional.mse_loss(out[:, 0].float(), y, reduction=reduction)
    return nn.functional.cross_entropy(out.float(), y, reduction=reduction)


def score_sums(out: torch.Tensor, y: torch.Tensor, regression: bool) -> torch.Tensor:
    """What the score of a batch adds to the score of a whole set (on the device, no sync):
    ``[correct]`` or ``[SSE, sum y, sum y²]``; :func:`sums_score` turns the total into the score."""
    import torch

    if regression:
        err = out[:, 0].float() - y
        return torch.stack([(err * err).sum(), y.sum(), (y * y).sum()])
    return (out.argmax(1) == y).sum().reshape(1).float()


def sums_score(sums: torch.Tensor | npt.NDArray[Any], n: int, regression: bool) -> float:
    """The score of ``n`` rows from their :func:`score_sums` added up (NaN for none)."""
    if n == 0:
        return math.nan
    s = [float(v) for v in (sums.tolist() if hasattr(sums, "tolist") else list(sums))]
    if not regression:
        return s[0] / n
    sse, sum_y, sum_y2 = s
    return r2(sse, sum_y, sum_y2, n)


def r2(sse: float, sum_y: float, sum_y2: float, n: int) -> float:
    """R² from running sums: the squared errors, the targets and the targets squared of ``n`` rows."""
    return _r2(sse, sum_y2 - sum_y * sum_y / n) if n else math.nan


def _r2(sse: float, sst: float) -> float:
    if sst <= 1e-12 * max(1.0, abs(sse)):  # a constant target: exact or not at all
        return 1.0 if sse <= 1e-12 else 0.0
    return 1.0 - sse / sst


def score(out: npt.NDArray[Any], y: npt.NDArray[Any], regression: bool) -> float:
    """The task's score of outputs ``out`` (``[n, outputs]``) against targets ``y``."""
    if len(y) == 0:
        return math.nan
    if regression:
        pred = np.asarray(out, np.float64).reshape(len(y), -1)[:, 0]
        target = np.asarray(y, np.float64)
        return _r2(float(((pred - target) ** 2).sum()), float(((target - target.mean()) ** 2).sum()))
    return float((np.asarray(out).argmax(1) == np.asarray(y)).mean())


def details(out: npt.NDArray[Any], y: npt.NDArray[Any], regression: bool) -> dict[str, float]:
    """The score under its name, and for regression RMSE and MAE in the target's units."""
    doc = {metric_name(regression): score(out, y, regression)}
    if regression and len(y):
        err = np.asarray(out, np.float64).reshape(len(y), -1)[:, 0] - np.asarray(y, np.float64)
        doc |= {"rmse": float(np.sqrt((err**2).mean())), "mae": float(np.abs(err).mean())}
    return doc
