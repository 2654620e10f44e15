"""Settings of the tuner service (env prefix ``CDL_TUNER_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic_settings import SettingsConfigDict

from cdl.events import Topics
from cdl.settings import ServiceSettings, known_default

__all__ = ["TunerSettings"]


class TunerSettings(ServiceSettings):
    """Tuner: studies on policy (data.updated, model.trained, drift.detected) or on request
    (tuning.requested); publishes tuning.completed."""

    model_config = SettingsConfigDict(env_prefix="CDL_TUNER_", extra="ignore", use_attribute_docstrings=True)

    group_id: str = "cdl-tuner"
    """Consumer group over the trigger topics."""
    instance: str = ""
    """Instance name, unique among the group's live instances; the transactional id is
    ``<group_id>-<instance>``. Empty: the host's name (a pod's name; keep it stable across
    restarts, as a StatefulSet's is)."""
    updated_topic: str = Topics.DATA_UPDATED
    """Dataset versions (first version, every K versions)."""
    trained_topic: str = Topics.MODEL_TRAINED
    """Gate verdicts (the champion's accuracy: an accuracy drop)."""
    drift_topic: str = Topics.DRIFT_DETECTED
    """Drift alerts of the monitor."""
    requested_topic: str = Topics.TUNING_REQUESTED
    """Requests to tune now (``cdl tune MODEL``)."""
    completed_topic: str = Topics.TUNING_COMPLETED
    """Where results go (the trainer reads them)."""
    deadletter_topic: str = Topics.DATA_DEADLETTER
    """Topic for events that cannot be handled."""
    storage_url: str = ""
    """Optuna storage (SQLAlchemy URL): ``postgresql+psycopg2://…`` for workers on several hosts;
    empty: SQLite at ``<state_dir>/tuner/optuna.db`` (the local stack gives its PostgreSQL's URL)."""
    workers: int = 1
    """Worker processes per study, sharing its storage (0: trials in the service's process)."""
    worker_nice: int = 10
    """Niceness of the study's worker processes: on shared cores the trainer (whose next version
    serves) gets the CPU first and a study never holds back a model; 0: the same priority."""
    n_trials: int = 20
    """Budget: finished trials (complete or pruned) per study, over all workers."""
    max_epochs: int = 15
    """Most epochs one trial may train (the pruner stops most trials sooner)."""
    trial_time_budget_s: float = 150.0
    """Most seconds one trial trains (0: no limit): the trainer's ``time_budget_s``, so the best
    trial is the parameters that do best in the time a version gets to train. Without it a
    study picked slow parameters (batch 32, 64 channels on Fashion-MNIST) whose version then
    trained 3 epochs in the trainer's budget and lost to the defaults (docs/benchmarks.md)."""
    pruner: str = "hyperband"
    """Single-objective pruner: hyperband, asha (successive halving), median or none."""
    objectives: list[str] = ["accuracy"]
    """accuracy, optionally with params (parameter count) or latency (CPU ms, batch 1)."""
    objectives_by_model: dict[str, list[str]] = {}
    """Per-model objectives overriding ``objectives`` (JSON: {"digits": ["accuracy", "params"]})."""
    spaces: dict[str, dict[str, list[Any]]] = {}
    """Per-model search-range overrides (JSON: {"digits": {"channels": ["choice", [8, 16]]}});
    an empty range drops the hyperparameter from the search."""
    first_after_model: bool = True
    """Start a model's first study when its first version has been trained (on the family's
    defaults), not with its first dataset version: the first model is never held back by a
    study sharing its cores, and is served while the study runs."""
    every_versions: int = 50
    """Tune every this many dataset versions after the last study (0: never)."""
    accuracy_drop: float = 0.05
    """Tune when the champion's holdout accuracy fell this much below its mark after the last study."""
    window_records: int = 20_000
    """Trials train on the newest shards holding at least this many records (0: all)."""
    val_fraction: float = 0.15
    """Part of the train split the trials are validated on (the holdout is never read)."""
    seed: int = 0
    """Seed of every trial (the same for all: trials differ only by their parameters)."""
    device: str = "cpu"
    """Device of the trials ("cpu", "cuda" or "auto")."""
    prune_margin: float = 0.02
    """Multi-objective pruning rule: stop below the median of finished trials at that epoch by this."""
    prune_min_epochs: int = 2
    """No trial is pruned before this epoch."""
    pick_tolerance: float = 0.01
    """Multi-objective: the point used has the smallest second objective within this of the best accuracy."""
    heartbeat_s: int = 5
    """Trial heartbeat; a trial silent for ``grace_s`` is failed (its worker died)."""
    grace_s: int = 15
    """See ``heartbeat_s``."""

    def storage(self) -> str:
        """``storage_url``, else SQLite under the state dir."""
        if self.storage_url:
            return self.storage_url
        path = Path(self.state_dir) / "tuner" / "optuna.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"

    def security_problems(self) -> list[str]:
        problems = super().security_problems()
        url = urlsplit(self.storage_url)
        if url.scheme.startswith("postgresql"):
            password = unquote(url.password or "")
            loopback = url.hostname in (None, "", "localhost", "127.0.0.1", "::1")
            if (password or not loopback) and known_default(password):  # loopback may trust, not a network
                problems.append("the Optuna storage's password is empty or a published default (storage_url)")
        return problems
