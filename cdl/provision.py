"""Provisioning, the one step every process that needs it takes: cdl's buckets in the object
store and the Kafka topics it uses, created when missing (idempotent, so concurrent starts of
several services are fine). The local stack provisions every cdl topic before any service
starts; each service provisions what it uses, so it also starts against bare servers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cdl.events import Topics
from cdl.kafka import ensure_topics
from cdl.logging import get_logger
from cdl.store import BUCKETS, ObjectStore

__all__ = ["provision"]

log = get_logger(__name__)


def provision(
    bootstrap: str,
    store: ObjectStore | None,
    topics: Mapping[str, int] | None = None,
    configs: Mapping[str, Mapping[str, str]] | None = None,
    buckets: Sequence[str] = BUCKETS,
) -> list[str]:
    """Create ``buckets`` (cdl's) in ``store`` (None: no object store) and ``topics`` (name ->
    partitions; a topic of cdl's own takes its count from :attr:`Topics.PARTITIONS`, and gets
    the partitions it lacks when it has fewer) with their ``configs``, where missing; returns the
    topics created (each logged). A service passes the
    buckets it uses (``cdl.store_access.store_buckets``): its key may see no others."""
    if store is not None:
        store.ensure_buckets(*buckets)
    if not topics:
        return []
    partitions = {topic: Topics.PARTITIONS.get(topic, n) for topic, n in topics.items()}
    created = ensure_topics(bootstrap, partitions, configs, grow=set(Topics.PARTITIONS) & set(partitions))
    for topic in created:
        log.info("topic created", topic=topic)
    return created
