"""Writing dataset versions for tests through the ingest service's own code."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from cdl.datasets import DatasetSpec, Task
from cdl.events import InBatch, OutRecord
from cdl.kafka import Producer
from cdl.store import BlobStore
from services.ingest.processor import IngestProcessor
from services.ingest.registry import DatasetRegistry
from tests.fakes import RecordingProducer


class DatasetWriter:
    """Registers a dataset and commits versions of it exactly as ingest does,
    publishing each ``data.updated`` to ``updated_topic``.

    ``kafka``: a bootstrap (a :class:`cdl.kafka.Producer` is made when something is first
    published) or a producer, e.g. tests/fakes.py's RecordingProducer; ``store`` an
    ObjectStore, or tests/fakes.py's MemoryStore (ingest's sweep, the one part of ingest that
    reads MinIO's listing directly, comes due every 10 minutes: never while a test writes).
    """

    def __init__(
        self, store: BlobStore, kafka: str | Producer | RecordingProducer, updated_topic: str, spec: DatasetSpec
    ) -> None:
        self.spec = spec
        self.registry = DatasetRegistry(store)
        self.registry.register(spec)
        self.processor = IngestProcessor(
            registry=self.registry,
            store=store,  # type: ignore[arg-type]  # see above
            source="/cdl/test",
            state_topic=f"{updated_topic}.unused-state",
            updated_topic=updated_topic,
            shard_max_records=10**9,
        )
        self._kafka = kafka
        self.updated_topic = updated_topic
        self._offset = 0

    def version(self, x: npt.NDArray[Any] | Sequence[str], labels: Sequence[str], ids: Sequence[str]) -> OutRecord:
        """Add these records and commit a version now; returns its data.updated record (unsent)."""
        batch = []
        for i, (item, label, rid) in enumerate(zip(x, labels, ids, strict=True)):
            doc: dict[str, Any] = {"dataset": self.spec.name, "id": rid, "label": label}
            if self.spec.task is Task.TEXT:
                doc["text"] = item
            else:
                doc["features"] = np.asarray(item).reshape(-1).tolist()
            batch.append((0, self._offset + i, None, json.dumps(doc).encode(), None))
        self._offset += len(batch)
        self.processor.on_batch(InBatch.of("data.raw", batch))
        ds = self.processor.state.dataset(self.spec.name)
        ds.last_version_at = 0.0  # make the time policy due now
        out = [r for r in self.processor.flush() if r.topic == self.updated_topic]
        assert len(out) == 1, "expected exactly one version"
        return out[0]

    def publish(self, record: OutRecord) -> None:
        if isinstance(self._kafka, str):
            self._kafka = Producer(self._kafka)
        self._kafka.send_raw(record.topic, record.value, record.key, record.headers)
        self._kafka.flush()


def digits_spec(name: str) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        task=Task.IMAGE,
        labels=tuple(str(i) for i in range(10)),
        input_shape=(1, 8, 8),
        min_new_records=10**9,
        max_interval_s=1.0,
        holdout_fraction=0.2,
    )
