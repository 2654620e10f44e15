"""A demo feed for the local stack: scikit-learn's digits streamed into ``data.raw``.

Records are JSON, exactly as any Kafka client (kcat, another language) would
send them; the dataset is registered through the ingest gRPC API.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import grpc
from confluent_kafka import Producer

from cdl.events import Topics
from cdl.v1 import ingest_pb2, ingest_pb2_grpc

__all__ = ["DigitsFeed", "register_digits"]

DIGITS = "digits"


def register_digits(
    ingest_endpoint: str, min_new_records: int = 500, max_interval_s: float = 30.0, api_key: str | None = None
) -> bool:
    """Register the ``digits`` dataset (8x8 grey images, labels 0-9); True if it was new."""
    spec = ingest_pb2.DatasetSpec(
        name=DIGITS,
        task=ingest_pb2.TASK_IMAGE_CLASSIFICATION,
        input_shape=[1, 8, 8],
        dtype="float32",
        labels=[str(i) for i in range(10)],
        policy=ingest_pb2.RetrainPolicy(min_new_records=min_new_records, max_interval_s=max_interval_s),
        holdout_fraction=0.2,
    )
    with grpc.insecure_channel(ingest_endpoint) as channel:
        resp = ingest_pb2_grpc.IngestServiceStub(channel).RegisterDataset(
            ingest_pb2.RegisterDatasetRequest(spec=spec),
            timeout=10,
            metadata=(("authorization", f"Bearer {api_key}"),) if api_key else None,
        )
    return bool(resp.created)


class DigitsFeed:
    """Produces digits records at ``rate`` per second in a background thread."""

    def __init__(self, bootstrap: str, rate: float = 100.0, topic: str = Topics.DATA_RAW) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self._x: Any = digits.data
        self._y: Any = digits.target
        self._producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
        self._rate = rate
        self._topic = topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdl-demo-feed", daemon=True)
        self.sent = 0
        self._run_id = time.strftime("%Y%m%d%H%M%S")

    def start(self) -> DigitsFeed:
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self._rate)
            while self.sent < due:
                j = self.sent % len(self._x)
                doc = {
                    "dataset": DIGITS,
                    "id": f"{self._run_id}-{self.sent}",
                    "features": self._x[j].tolist(),
                    "label": str(int(self._y[j])),
                }
                self._producer.produce(self._topic, json.dumps(doc).encode())
                self.sent += 1
            self._producer.poll(0)
            self._stop.wait(0.05)
        self._producer.flush(10)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
