"""Kafka transport: an idempotent producer and the two exactly-once loops.

- :class:`TransactionalLoop` consumes a stream in batches and publishes, every
  flush, what its processor returns together with the consumed offsets in one
  Kafka transaction (ingest).
- :class:`JobLoop` runs one long job per event (trainer, compressor) and
  commits the job's outputs with the event's offset in one transaction.

Failures follow one policy (:mod:`cdl.failure`): a transaction that cannot be
committed ends the loop's *session*, and a new one starts from what Kafka
committed (:mod:`cdl.kafka.session` says how). See docs/reliability.md.

One module a concern:

- :mod:`~cdl.kafka.producer`: :class:`Producer`, the idempotent producer.
- :mod:`~cdl.kafka.admin`: :func:`ensure_topics`, :func:`topic_partitions`.
- :mod:`~cdl.kafka.consumer`: :func:`consumer_conf`, the settings every loop's
  consumer uses, and :class:`RecordContext`, where a consumed record came from.
- :mod:`~cdl.kafka.signals`: stopping a loop on request or on SIGTERM/SIGINT.
- :mod:`~cdl.kafka.session`: what the loops share: sessions, their failure and
  restart, and the transaction that publishes records with consumer offsets
  (:class:`FencedError`).
- :mod:`~cdl.kafka.batch_loop`: :class:`TransactionalLoop` and the
  :class:`BatchProcessor` it drives.
- :mod:`~cdl.kafka.job_loop`: :class:`JobLoop`.
- :mod:`~cdl.kafka.state`: :func:`read_latest`, a key's newest committed value
  in a (state) topic.
- :mod:`~cdl.kafka.security`: the process's TLS and SASL, which every client above carries.
- :mod:`~cdl.kafka.acls`: the users and ACLs of a secured cluster (each service writes only
  the topics it owns).
"""

from __future__ import annotations

from cdl.kafka.admin import ensure_topics, topic_partitions
from cdl.kafka.batch_loop import BatchProcessor, TransactionalLoop
from cdl.kafka.consumer import RecordContext, consumer_conf
from cdl.kafka.job_loop import JobLoop
from cdl.kafka.producer import Producer
from cdl.kafka.session import FencedError
from cdl.kafka.state import read_latest

__all__ = [
    "BatchProcessor",
    "FencedError",
    "JobLoop",
    "Producer",
    "RecordContext",
    "TransactionalLoop",
    "consumer_conf",
    "ensure_topics",
    "read_latest",
    "topic_partitions",
]
