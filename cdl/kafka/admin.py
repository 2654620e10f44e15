"""Topic administration: creating the topics that are missing (and partitions a topic lacks),
counting a topic's partitions."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping

from confluent_kafka import KafkaException

from cdl.errors import NotFoundError, UnavailableError
from cdl.kafka.security import secured
from cdl.logging import get_logger

__all__ = ["ensure_topics", "topic_partitions"]

log = get_logger(__name__)


def ensure_topics(
    bootstrap: str,
    partitions: Mapping[str, int],
    configs: Mapping[str, Mapping[str, str]] | None = None,
    grow: Collection[str] = (),
) -> list[str]:
    """Create the topics of ``partitions`` that do not exist yet (replication 1); returns those created.

    ``configs`` gives topic settings such as ``cleanup.policy``. A topic that
    appears concurrently counts as existing; any other failure raises. An
    existing topic of ``grow`` with fewer partitions than wanted gets the missing
    ones (cdl's own topics, in a deployment made before their count rose; Kafka
    never removes partitions; a topic of the user's keeps the count it was made with):
    keys hash anew over the larger count, so a key's later records may go to
    another partition than its earlier ones. A client not allowed to alter the
    topic (a service's own user; the provisioning job, as the admin, is) leaves
    it as it is, with a warning.
    """
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewPartitions, NewTopic

    admin = AdminClient(secured({"bootstrap.servers": bootstrap}))
    existing = admin.list_topics(timeout=10).topics
    wanted = [
        NewTopic(t, num_partitions=n, replication_factor=1, config=dict((configs or {}).get(t, {})))
        for t, n in partitions.items()
        if t not in existing
    ]
    created = []
    for topic, fut in admin.create_topics(wanted, operation_timeout=30).items() if wanted else []:
        try:
            fut.result(timeout=30)
            created.append(topic)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise UnavailableError("creating topic failed", topic=topic, error=str(exc)) from exc
    # a topic just made may not be in the metadata yet: a caller reading its partitions next would
    # find none (the monitor failed `cdl stack up` so once)
    deadline = time.monotonic() + 30.0
    while created and (missing := [t for t in created if t not in admin.list_topics(timeout=10).topics]):
        if time.monotonic() > deadline:
            raise UnavailableError("topics created but not in the metadata", topics=",".join(missing))
        time.sleep(0.2)
    growing = [
        NewPartitions(t, n)
        for t, n in partitions.items()
        if t in grow and t in existing and existing[t].error is None and 0 < len(existing[t].partitions) < n
    ]
    for topic, fut in admin.create_partitions(growing, operation_timeout=30).items() if growing else []:
        try:
            fut.result(timeout=30)
            log.info("partitions added", topic=topic, partitions=partitions[topic])
        except KafkaException as exc:
            text = str(exc)
            if "AUTHORIZATION" in text:
                log.warning("cannot add partitions (not allowed)", topic=topic, error=text)
            elif "INVALID_PARTITIONS" not in text:  # (another client grew it meanwhile)
                raise UnavailableError("adding partitions failed", topic=topic, error=text) from exc
    return created


def topic_partitions(bootstrap: str, topic: str, timeout_s: float = 10.0) -> int:
    """How many partitions ``topic`` has (:class:`NotFoundError` when it does not exist)."""
    from confluent_kafka.admin import AdminClient

    meta = AdminClient(secured({"bootstrap.servers": bootstrap})).list_topics(topic=topic, timeout=timeout_s)
    found = meta.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise NotFoundError("topic not found", topic=topic)
    return len(found.partitions)
