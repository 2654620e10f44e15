"""The demo's data: scikit-learn's digits, streamed into ``data.raw`` honestly.

Records are JSON, exactly as any Kafka client (kcat, another language) would
send them; the dataset is registered through the ingest gRPC API.

**No image is in both splits.** The demo streams the same 1,797 images again in
every wave, each time under a new record id, and ingest splits by record id.
So that a copy never lands in the other split from its first copy, each image
gets a split of its own (a hash of its pixels, at the dataset's holdout
fraction) and the demo picks each record id, by trying suffixes, so that the
id's split is the image's. Every holdout record is thus an image the model never
trained on, and :meth:`DigitsData.served` gives the client traffic only those.

**Drift** is an inverted scanner: ``shifted`` images are ``16 - x`` (light
strokes on a dark page), which the model trained on plain digits mostly gets
wrong and the monitor's MMD test tells apart from the reference.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from confluent_kafka import Producer

from cdl.datasets import holdout_member, unit_hash
from cdl.events import Topics
from cdl.kafka.security import secured
from cdl.v1 import ingest_pb2, ingest_pb2_grpc

__all__ = ["DIGITS", "HOLDOUT_FRACTION", "DigitsData", "DigitsFeed", "digits_spec", "register_digits"]

DIGITS = "digits"
HOLDOUT_FRACTION = 0.2


def digits_spec(min_new_records: int = 500, max_interval_s: float = 30.0, name: str = DIGITS) -> ingest_pb2.DatasetSpec:
    """The ``digits`` dataset's spec: 8x8 grey images, labels 0-9."""
    return ingest_pb2.DatasetSpec(
        name=name,
        task=ingest_pb2.TASK_IMAGE_CLASSIFICATION,
        input_shape=[1, 8, 8],
        dtype="float32",
        labels=[str(i) for i in range(10)],
        policy=ingest_pb2.RetrainPolicy(min_new_records=min_new_records, max_interval_s=max_interval_s),
        holdout_fraction=HOLDOUT_FRACTION,
    )


def register_digits(
    ingest_endpoint: str,
    min_new_records: int = 500,
    max_interval_s: float = 30.0,
    api_key: str | None = None,
    name: str = DIGITS,
) -> bool:
    """Register the ``digits`` dataset (:func:`digits_spec`) over plaintext gRPC; True if it was new."""
    spec = digits_spec(min_new_records, max_interval_s, name)
    with grpc.insecure_channel(ingest_endpoint) as channel:
        resp = ingest_pb2_grpc.IngestServiceStub(channel).RegisterDataset(
            ingest_pb2.RegisterDatasetRequest(spec=spec),
            timeout=10,
            metadata=(("authorization", f"Bearer {api_key}"),) if api_key else None,
        )
    return bool(resp.created)


class DigitsData:
    """The digits, each image with its own split, and record ids that keep it there."""

    def __init__(self, name: str = DIGITS, holdout_fraction: float = HOLDOUT_FRACTION, run_id: str = "") -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.name = name
        self.x: npt.NDArray[np.float64] = digits.data
        self.y: npt.NDArray[np.int64] = digits.target
        self.fraction = holdout_fraction
        #: True for the images of the holdout split (by content: equal images, equal split)
        digests = [hashlib.sha256(row.tobytes()).digest() for row in self.x]
        self.holdout = np.array([unit_hash(d) < holdout_fraction for d in digests])
        self.run_id = run_id or time.strftime("%Y%m%d%H%M%S")

    def __len__(self) -> int:
        return len(self.x)

    def id_in_split(self, base: str, holdout: bool, as_record: Callable[[str], str] = str) -> str:
        """``base-<k>`` for the first ``k`` whose record id (``as_record`` of it) ingest puts in
        the holdout when ``holdout``, else in the train split."""
        for k in range(10_000):
            rid = f"{base}-{k}"
            if holdout_member(self.name, as_record(rid), self.fraction) == holdout:
                return rid
        raise RuntimeError("no id in the split asked for")  # p < 0.8**10000: never

    def record_id(self, wave: int, j: int, shifted: bool = False) -> str:
        """An id for image ``j`` in ``wave`` that ingest puts in the image's split."""
        return self.id_in_split(f"{self.run_id}-w{wave}{'s' if shifted else ''}-{j}", bool(self.holdout[j]))

    @staticmethod
    def shifted(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """The drifted scanner: inverted images."""
        return 16.0 - np.asarray(x, dtype=np.float64)

    def record(self, wave: int, j: int, shifted: bool = False) -> bytes:
        x = self.shifted(self.x[j]) if shifted else self.x[j]
        doc = {
            "dataset": self.name,
            "id": self.record_id(wave, j, shifted),
            "features": [float(v) for v in x],
            "label": str(int(self.y[j])),
        }
        return json.dumps(doc).encode()

    def served(self) -> npt.NDArray[np.int64]:
        """Indices of the holdout images: what clients send (no model trained on them)."""
        return np.flatnonzero(self.holdout)


class DigitsFeed:
    """Produces digits records at ``rate`` per second in a background thread (each image once
    per pass through the 1,797, each pass a new "wave" of ids)."""

    def __init__(self, bootstrap: str, rate: float = 100.0, topic: str = Topics.DATA_RAW) -> None:
        self._data = DigitsData()
        self._producer = Producer(secured({"bootstrap.servers": bootstrap, "linger.ms": 20, "log_level": 0}))
        self._rate = rate
        self._topic = topic
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cdl-demo-feed", daemon=True)
        self.sent = 0

    def start(self) -> DigitsFeed:
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        n = len(self._data)
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self._rate)
            while self.sent < due:
                wave, j = divmod(self.sent, n)
                self._producer.produce(self._topic, self._data.record(wave, j))
                self.sent += 1
            self._producer.poll(0)
            self._stop.wait(0.05)
        self._producer.flush(10)

    def stop(self) -> None:
        """Stop producing (before the broker goes: the flush is bounded and quiet)."""
        self._stop.set()
        self._thread.join(timeout=15)
