"""Settings of the monitor service (env prefix ``CDL_MONITOR_``)."""

from __future__ import annotations

from pydantic_settings import SettingsConfigDict

from cdl.events import Topics
from cdl.settings import ServiceSettings

__all__ = ["MonitorSettings"]


class MonitorSettings(ServiceSettings):
    """Monitor: a Faust app over inference.logged and data.feedback; publishes model.health and
    drift.detected, and labelled served requests to data.raw."""

    model_config = SettingsConfigDict(env_prefix="CDL_MONITOR_", extra="ignore", use_attribute_docstrings=True)

    group_id: str = "cdl-monitor"
    """The Faust app id: its consumer group and the prefix of its changelog topics."""
    logged_topic: str = Topics.INFERENCE_LOGGED
    """The gateway's inference log (keyed by model)."""
    feedback_topic: str = Topics.DATA_FEEDBACK
    """Late labels; those with a ``request_id`` are joined to logged requests."""
    health_topic: str = Topics.MODEL_HEALTH
    """Where closed health windows go (the gateway and the CLI read them)."""
    drift_topic: str = Topics.DRIFT_DETECTED
    """Where drift alerts go (ingest and the tuner act on them)."""
    raw_topic: str = Topics.DATA_RAW
    """Where labelled served requests go, as records of the model's dataset."""
    window_s: float = 10.0
    """Length of a health window (tumbling, processing time)."""
    grace_s: float = 2.0
    """A window is published this long after its end (windows are of processing time: this only
    delays the publication, what arrives meanwhile counts in the next window)."""
    join_ttl_s: float = 600.0
    """How long a logged request waits for its label (and a label for its request)."""
    join_max_entries: int = 200_000
    """Most logged requests (and, apart, labels) waiting to be joined: past it the oldest are
    dropped as expired, which bounds the monitor's memory whatever the request rate."""
    training_records: bool = True
    """Send labelled served requests to ``raw_topic`` (production traffic grows the training set)."""
    drift_window: int = 100
    """Served inputs per drift test."""
    drift_alpha: float = 0.01
    """False-alarm rate of one test (the threshold is the null's 1 - alpha quantile)."""
    drift_persist: int = 3
    """Tests in a row over the threshold before drift.detected (false alarms ~ alpha ** persist)."""
    drift_draws: int = 1000
    """Windows drawn from the reference to calibrate a version's threshold."""
    session_timeout_s: float = 10.0
    """Kafka consumer-group session: how soon a monitor that died (kill -9) hands its partitions to
    the one that replaces it (faust's default is a minute)."""
    batch_max: int = 1000
    """Most logged requests handled as one batch (their health counts, table writes and drift
    rows together): the per-event cost is what limits a monitor at a gateway's full rate."""
    batch_within_s: float = 0.05
    """How long a batch waits for more requests before it is handled (a trickle is handled at
    once; at a high rate batches fill up)."""
    seed: int = 0
    """Seed of the calibration (a restarted monitor computes the same thresholds)."""
