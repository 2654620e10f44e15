"""Health windows of one serving version (no Kafka, no Faust).

Tumbling windows of ``window_s`` seconds of processing time per (model,
version): requests, errors, latency (a :class:`~cdl.latency.LatencyHistogram`),
the task's score on the feedback joined in the window (accuracy; for a regression R²,
RMSE and MAE from running sums), the latest drift statistic. The
monitor keeps each open window in a Faust table (its JSON form, below) and
publishes a ``model.health`` event when the window closes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cdl.latency import LatencyHistogram
from cdl.ml.objective import metric_name, r2
from cdl.v1 import events_pb2

__all__ = ["HealthWindow", "window_key", "window_model", "window_start"]

_SEP = "\x1f"


def window_start(t: float, window_s: float) -> float:
    """Start of the tumbling window holding time ``t``."""
    return math.floor(t / window_s) * window_s


def window_key(model: str, version: int, start: float) -> str:
    return f"{model}{_SEP}{version}{_SEP}{int(start * 1000)}"


def window_model(key: str) -> str:
    """The model of a :func:`window_key`."""
    return key.split(_SEP, 1)[0]


@dataclass
class HealthWindow:
    model: str
    version: int
    start: float
    requests: int = 0
    errors: int = 0
    correct: int = 0
    feedback: int = 0
    regression: bool = False
    #: regression: squared and absolute errors, targets and targets squared, summed
    sse: float = 0.0
    sae: float = 0.0
    sum_y: float = 0.0
    sum_y2: float = 0.0
    drift_statistic: float = 0.0
    drift_threshold: float = 0.0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    @property
    def key(self) -> str:
        return window_key(self.model, self.version, self.start)

    def served(self, ok: bool, latency_ms: float) -> None:
        self.requests += 1
        if ok:
            self.latency.add(latency_ms / 1000.0)
        else:
            self.errors += 1

    def labelled(self, correct: bool) -> None:
        self.feedback += 1
        self.correct += correct

    def labelled_value(self, predicted: float, target: float) -> None:
        """A regression's answer ``predicted`` and its label ``target``."""
        self.regression = True
        err = predicted - target
        self.feedback += 1
        self.sse += err * err
        self.sae += abs(err)
        self.sum_y += target
        self.sum_y2 += target * target

    def drift(self, statistic: float, threshold: float) -> None:
        self.drift_statistic, self.drift_threshold = statistic, threshold

    @property
    def score(self) -> float | None:
        """Accuracy, or a regression's R², on the window's feedback (None without any)."""
        if not self.feedback:
            return None
        if self.regression:
            return r2(self.sse, self.sum_y, self.sum_y2, self.feedback)
        return self.correct / self.feedback

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "start": self.start,
            "requests": self.requests,
            "errors": self.errors,
            "correct": self.correct,
            "feedback": self.feedback,
            "regression": [self.sse, self.sae, self.sum_y, self.sum_y2] if self.regression else None,
            "drift": [self.drift_statistic, self.drift_threshold],
            "latency": self.latency.to_json(),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> HealthWindow:
        stat, thr = doc.get("drift", [0.0, 0.0])
        reg = doc.get("regression")
        sse, sae, sum_y, sum_y2 = (float(v) for v in reg) if reg else (0.0, 0.0, 0.0, 0.0)
        return cls(
            model=str(doc["model"]),
            version=int(doc["version"]),
            start=float(doc["start"]),
            requests=int(doc["requests"]),
            errors=int(doc["errors"]),
            correct=int(doc["correct"]),
            feedback=int(doc["feedback"]),
            regression=bool(reg),
            sse=sse,
            sae=sae,
            sum_y=sum_y,
            sum_y2=sum_y2,
            drift_statistic=float(stat),
            drift_threshold=float(thr),
            latency=LatencyHistogram.from_json(doc.get("latency", {})),
        )

    def event(self, window_s: float) -> events_pb2.ModelHealth:
        """The ``model.health`` payload of this window once closed."""
        msg = events_pb2.ModelHealth(
            model=self.model,
            version=self.version,
            requests=self.requests,
            errors=self.errors,
            latency_p50_ms=(self.latency.quantile(0.5) or 0.0) * 1000.0,
            latency_p99_ms=(self.latency.quantile(0.99) or 0.0) * 1000.0,
            score=self.score or 0.0,
            feedback=self.feedback,
            drift_statistic=self.drift_statistic,
            drift_threshold=self.drift_threshold,
            metric=metric_name(self.regression),
        )
        if self.regression and self.feedback:
            msg.rmse = math.sqrt(self.sse / self.feedback)
            msg.mae = self.sae / self.feedback
        msg.window_start.FromNanoseconds(int(self.start * 1e9))
        msg.window_end.FromNanoseconds(int((self.start + window_s) * 1e9))
        return msg
