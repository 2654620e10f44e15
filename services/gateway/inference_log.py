"""The inference log: served requests to ``inference.logged``, off the hot path.

:meth:`InferenceLog.offer` is all the hot path does: a sampling step and an
append of a tuple of references (the request's and response's bytes are not
copied) to a bounded deque, O(1). A daemon thread turns what was offered into
``InferenceLogged`` records and produces them; when the queue is full (Kafka
slow or away, so the thread is stuck behind librdkafka's full queue) the
record is dropped and counted in ``cdl_gateway_log_dropped_total{reason}``
(``full``); a record Kafka did not acknowledge is counted with reason
``kafka``. The gateway keeps serving either way.

A record (``cdl.v1.InferenceLogged``, keyed by request id, so the monitor's
join with ``data.feedback`` by request id is a key join):

- ``request_id``: the client's ``id``, or the one the gateway generated (and
  Triton echoed in the response);
- ``inputs_digest``: SHA-256 hex digest of the request's ``raw_input_contents``
  (all entries in order; of the whole request when it has none), always set;
- ``inputs_sample``: the request's bytes -- a serialized ``ModelInferRequest``,
  self-describing (input names, datatypes, shapes, raw contents) -- when it is
  at most ``inputs_max_bytes``, empty otherwise;
- ``predicted_labels``: the top label of every row of the response's first
  output (argmax index over its last dimension, as a decimal string);
- ``latency_ms``, ``time`` (when the answer was sent).

Not representable in ``InferenceLogged`` as it stands (events.proto is
shared): the top label's *score* and the request's *status*. Convention until
fields exist for them: a failed request is logged with no
``predicted_labels``; :func:`top_labels` computes the scores for whoever adds
the field.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter

from cdl.errors import InvalidInputError
from cdl.events import Event, encode, source_name
from cdl.logging import get_logger
from cdl.v1 import events_pb2
from services.gateway import wire

__all__ = ["LOG_DROPPED", "LOG_SENT", "InferenceLog", "LogProducer", "build_record", "top_labels"]

log = get_logger(__name__)

LOG_DROPPED = Counter(
    "cdl_gateway_log_dropped_total",
    "Inference log records dropped (full: queue full, Kafka slow or away; kafka: not acknowledged)",
    ["reason"],
)
LOG_SENT = Counter("cdl_gateway_log_sent_total", "Inference log records handed to Kafka")

#: Open Inference Protocol datatypes numpy can read as they travel (little-endian)
_NUMPY: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}

#: an offered request: model, version, request id, request, response, latency, status, wall time
_Item = tuple[str, int, str, bytes, bytes, float, str, float]


class LogProducer(Protocol):
    """What the log needs of :class:`cdl.kafka.Producer`."""

    def send_raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = ...,
        headers: list[tuple[str, bytes]] | None = ...,
        on_delivery: Callable[[Any, Any], None] | None = ...,
    ) -> None: ...

    def poll(self, timeout_s: float = ...) -> None: ...


def top_labels(response: bytes) -> tuple[list[int], list[float]] | None:
    """Top label (argmax over the last dimension) and its score, per row of the first output of a
    serialized ``ModelInferResponse``; None where there is nothing numeric to decode."""
    try:
        out = wire.first_output(response)
    except InvalidInputError:
        return None
    if out is None:
        return None
    datatype, shape, raw = out
    dtype = _NUMPY.get(datatype)
    if dtype is None:
        return None
    itemsize = np.dtype(dtype).itemsize
    if not raw.nbytes or raw.nbytes % itemsize:
        return None
    values = np.frombuffer(raw, dtype=dtype)
    width = shape[-1] if shape else values.size
    if width <= 0 or values.size % width:
        return None
    rows = values.reshape(-1, width)
    idx = rows.argmax(axis=1)
    scores = rows[np.arange(rows.shape[0]), idx]
    return [int(i) for i in idx], [float(s) for s in scores]


def _digest(request: bytes) -> str:
    h = hashlib.sha256()
    try:
        raws = wire.raw_inputs(request)
    except InvalidInputError:
        raws = []
    if raws:
        for r in raws:
            h.update(r)
    else:
        h.update(request)
    return h.hexdigest()


def build_record(item: _Item, inputs_max_bytes: int) -> events_pb2.InferenceLogged:
    """The ``InferenceLogged`` record of one offered request (see the module docstring)."""
    model, version, request_id, request, response, latency_s, status, when = item
    rec = events_pb2.InferenceLogged(
        request_id=request_id,
        model=model,
        version=version,
        inputs_digest=_digest(request),
        latency_ms=latency_s * 1000.0,
    )
    if len(request) <= inputs_max_bytes:
        rec.inputs_sample = request
    if status == "OK" and response:
        top = top_labels(response)
        if top is not None:
            rec.predicted_labels.extend(str(i) for i in top[0])
    ts = Timestamp()
    ts.FromNanoseconds(int(when * 1e9))
    rec.time.CopyFrom(ts)
    return rec


class InferenceLog:
    """Bounded, sampled, off-the-hot-path producer of ``inference.logged``; see the module docstring.

    With ``producer`` None the log is off: :meth:`offer` returns at once.
    """

    def __init__(
        self,
        producer: LogProducer | None,
        topic: str,
        sample: float = 1.0,
        inputs_max_bytes: int = 4096,
        queue_size: int = 10000,
        source: str | None = None,
        batch: int = 512,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._sample = min(max(sample, 0.0), 1.0)
        self._credit = 0.0
        self._inputs_max = inputs_max_bytes
        self._max = max(1, queue_size)
        self._batch = batch
        self._queue: deque[_Item] = deque()
        self._source = source or source_name("gateway")
        self._dropped_full = LOG_DROPPED.labels(reason="full")
        self._dropped_kafka = LOG_DROPPED.labels(reason="kafka")
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if producer is not None and self._sample > 0.0:
            self._thread = threading.Thread(target=self._run, name="cdl-gateway-log", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    def pending(self) -> int:
        """Records offered and not yet handed to Kafka."""
        return len(self._queue)

    def offer(
        self,
        model: str,
        version: int,
        request_id: str,
        request: bytes,
        response: bytes,
        latency_s: float,
        status: str,
    ) -> None:
        """Log one served request (``status``: the gRPC code's name, ``OK`` when answered). O(1)."""
        if self._thread is None:
            return
        if self._sample < 1.0:
            # deterministic sampling: of every n requests, sample x n are logged, evenly spread
            self._credit += self._sample
            if self._credit < 1.0:
                return
            self._credit -= 1.0
        if len(self._queue) >= self._max:
            self._dropped_full.inc()
            return
        self._queue.append((model, version, request_id, request, response, latency_s, status, time.time()))

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self._dropped_kafka.inc()

    def _run(self) -> None:
        producer = self._producer
        assert producer is not None
        queue = self._queue
        while True:
            if not queue:
                producer.poll(0)
                if self._closed.wait(0.02) and not queue:
                    return
                continue
            for _ in range(min(len(queue), self._batch)):
                item = queue.popleft()
                try:
                    rec = build_record(item, self._inputs_max)
                    key, value, headers = encode(Event(payload=rec, source=self._source, key=item[2]))
                    producer.send_raw(self._topic, value, key, headers, on_delivery=self._delivered)
                    LOG_SENT.inc()
                except Exception:  # a log record must never stop the log
                    self._dropped_kafka.inc()
                    log.exception("inference log record not sent", model=item[0])
            producer.poll(0)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after handing what is queued to Kafka (within ``timeout_s``)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
