"""Settings of the trainer service (env prefix ``CDL_TRAINER_``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from cdl.events import Topics
from cdl.settings import ServiceSettings

__all__ = ["TrainerSettings"]


class TrainerSettings(ServiceSettings):
    """Trainer: consumes data.updated and tuning.completed, publishes model.trained."""

    model_config = SettingsConfigDict(env_prefix="CDL_TRAINER_", extra="ignore", use_attribute_docstrings=True)

    group_id: str = "cdl-trainer"
    """Consumer group over data.updated and tuning.completed."""
    instance: str = ""
    """Instance name, unique among the group's live instances; the transactional id is
    ``<group_id>-<instance>``. Empty: the host's name (a pod's name; keep it stable across
    restarts, as a StatefulSet's is)."""
    updated_topic: str = Topics.DATA_UPDATED
    """Topic announcing dataset versions."""
    tuning_topic: str = Topics.TUNING_COMPLETED
    """Topic announcing tuned hyperparameters."""
    trained_topic: str = Topics.MODEL_TRAINED
    """Topic the verdicts go to."""
    deadletter_topic: str = Topics.DATA_DEADLETTER
    """Topic for events that cannot be handled."""
    device: str = "auto"
    """"auto" (CUDA with bf16 autocast when present), "cpu" or "cuda"."""
    tolerance: float = 0.005
    """A challenger is accepted when its holdout score (accuracy, or R² for a regression) >=
    the champion's - tolerance."""
    min_accuracy_over_chance: float = 0.1
    """Without a champion, accept when the holdout score >= chance + this (chance: 1/classes;
    for a regression R² 0, predicting the mean)."""
    train_on_tuning: bool = True
    """When a study finishes, train a version with its best hyperparameters on the data it tuned
    on (off: they only apply from the next dataset version)."""
    val_fraction: float = 0.1
    """Part of the train split held out for early stopping (the holdout is kept for the gate)."""
    seed: int = 0
    """Seed of every training (deterministic runs)."""
    window_records: int = 50_000
    """Train on the newest shards of a version holding at least this many records (0: the
    whole version). Continuous data grows without end; a window keeps each training's
    memory and time bounded and follows what the data is now. Lineage names its offsets."""
    reference_rows: int = 2000
    """Training inputs kept with each model version as its drift reference (``reference.npy``;
    the monitor tests served inputs against it); 0: none."""
    max_epochs: int = 0
    """Cap on epochs whatever the hyperparameters say (0: no cap)."""
    time_budget_s: float = 150.0
    """A training stops before an epoch that would end past this many seconds (at least one
    epoch runs; 0: no limit). A large version serves within minutes instead of after every
    epoch its hyperparameters ask for; the next versions warm-start from it and train on."""
    processes: int = 1
    """Processes one training runs on. Above 1: data-parallel (DistributedDataParallel) through
    torchrun on this machine — gloo on CPU, NCCL with one GPU per process on CUDA; the batch size
    stays the batch over all processes, so the model is the one a single process trains, to
    rounding (docs/trainer.md, distributed training)."""
    distributed_timeout_s: float = 1800.0
    """Deadline of a distributed training, start-up included: past it its processes are stopped
    and the training fails (retried as any transient failure); 0: none."""
    memory_cap_mb: float = 2048.0
    """A version (its window) whose shards total more than this many MiB is streamed from the
    object store instead of loaded: a sample of its newest shards (a quarter of the cap) fits the
    preprocessing and gives the validation part and the gate's holdout, and the training records
    stream through a shuffle pool of whole shards (half the cap). 0: always load whole."""
    patience: int = 6
    """Early stopping: epochs without a better validation loss before stopping (0: never stop early)."""
    code_version: str = ""
    """Recorded in lineage; default: git commit of the checkout, else the package version."""
