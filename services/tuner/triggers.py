"""When to tune a model (pure logic; the state is JSON, kept per model in the object store).

A study starts for a model on:

- its **first model version** trained (``model.trained``, accepted or not: the first
  model trains on the family's defaults, unhindered, and serves while the study runs), or,
  with ``first_after_model`` off, its first dataset version (no study yet);
- every ``every_versions`` dataset versions since the last study (0: never);
- an **accuracy drop**: the champion's holdout accuracy (from ``model.trained``:
  the challenger's when accepted, else the champion's, both on the newest
  holdout) fell more than ``accuracy_drop`` below what it was after the last
  study (the first ``model.trained`` after a study sets that mark);
- **drift** (``drift.detected`` for the model) raised after the last study ended;
- a **request** (``cdl tune MODEL``: a ``tuning.requested`` event).

One study at a time per model: the tuner handles a model's events one after
another (its loop runs one job at a time), and a trigger that arrives while
a study runs is judged after it: versions are counted from the study's
dataset version, and drift or a request raised before the study ended is
taken as answered by it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TriggerPolicy", "TuneState"]


@dataclass
class TuneState:
    """One model's tuning history (``cdl-models/<model>/tuning.json``)."""

    studies: int = 0
    last_dataset_version: int = 0
    """The dataset version the last study tuned on."""
    last_ended_at: float = 0.0
    """Wall time the last study ended (triggers raised before it are answered)."""
    accuracy_mark: float | None = None
    """The champion's holdout accuracy after the last study (the first model.trained since)."""
    last_study: str = ""
    last_cause: str = ""
    """The id of the event that started the last study (handled again: its result is sent again)."""
    running: dict[str, Any] | None = None
    """The study under way (name, dataset version, reason, cause), saved before it starts: a
    tuner restarted mid-study resumes exactly that one."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any] | None) -> TuneState:
        if not doc:
            return cls()
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})


@dataclass(frozen=True)
class TriggerPolicy:
    every_versions: int = 50
    accuracy_drop: float = 0.05
    first_after_model: bool = True

    def on_data_updated(self, state: TuneState, dataset_version: int) -> str | None:
        """The reason to tune on this dataset version, or None."""
        if state.studies == 0:
            return None if self.first_after_model else "first dataset version"
        if self.every_versions > 0 and dataset_version - state.last_dataset_version >= self.every_versions:
            return f"{dataset_version - state.last_dataset_version} dataset versions since the last study"
        return None

    def on_trained(self, state: TuneState, champion_accuracy: float) -> str | None:
        """A model version was trained and gated; ``champion_accuracy`` is the champion's (new or
        kept) holdout score. Sets the mark after a study; returns a reason when it dropped (or,
        before any study, that the first model version is trained)."""
        if state.studies == 0:
            return "first model version trained" if self.first_after_model else None
        if state.accuracy_mark is None:
            state.accuracy_mark = champion_accuracy
            return None
        if state.accuracy_mark - champion_accuracy > self.accuracy_drop:
            return (
                f"champion score {champion_accuracy:.4f} dropped more than {self.accuracy_drop} "
                f"below {state.accuracy_mark:.4f} (after the last study)"
            )
        return None

    def on_drift(self, state: TuneState, raised_at: float) -> str | None:
        if raised_at > state.last_ended_at:
            return "drift detected"
        return None

    def on_request(self, state: TuneState, requested_at: float) -> str | None:
        if requested_at > state.last_ended_at:
            return "requested"
        return None

    @staticmethod
    def studied(state: TuneState, study: str, dataset_version: int, ended_at: float, cause: str = "") -> None:
        """Record a finished study (or one that failed: its trigger is answered too)."""
        state.studies += 1
        state.last_dataset_version = dataset_version
        state.last_ended_at = ended_at
        state.accuracy_mark = None
        state.last_study = study
        state.last_cause = cause
        state.running = None
