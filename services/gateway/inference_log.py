"""The inference log: served requests to ``inference.logged``, off the hot path.

:meth:`InferenceLog.offer` is all the hot path does: a sampling step and an
append of a tuple of references (the request's and response's bytes are not
copied) to a bounded deque, O(1). A daemon thread turns what was offered into
``InferenceLogged`` records and produces them, in rounds every ``interval_s``
(the gateway's ``log_linger_ms``, 200 ms; at once while a ``batch`` is
waiting): the thread takes the GIL once a round rather than once a request, a
round's fixed cost (its code starts cold) is shared by more records, and
librdkafka batches a round's records into one produce request. Small messages are read with protobuf's C parser
(falling back to the wire scan where it refuses the bytes), small outputs'
top labels are found without numpy, and a round's event ids and trace
contexts come from one ``os.urandom`` call. When the queue is full (Kafka
slow or away, so the thread is stuck behind librdkafka's full queue) the
record is dropped and counted in ``cdl_gateway_log_dropped_total{reason}``
(``full``); a record Kafka did not acknowledge is counted with reason
``kafka``. The gateway keeps serving either way.

The records are built and produced by a :class:`RecordWriter` in the log's
thread.

A record (``cdl.v1.InferenceLogged``, keyed by model, as a batch is: the monitor
member holding the model's partition keeps its health windows and drift state):

- ``request_id``: the client's ``id``, or the one the gateway generated (and
  Triton echoed in the response);
- ``inputs_digest``: SHA-256 hex digest of the request's ``raw_input_contents``
  (all entries in order; of the whole request when it has none), always set;
- ``inputs_sample``: the request's bytes -- a serialized ``ModelInferRequest``,
  self-describing (input names, datatypes, shapes, raw contents) -- when it is
  at most ``inputs_max_bytes``, empty otherwise;
- ``predicted_labels``: the top label of every row of the response's first
  output (argmax index over its last dimension, as a decimal string), and
  ``scores``: that label's value (logit or probability, as the model outputs);
  both empty for a failed request;
- ``status``: the gRPC status code's name (``OK`` when answered);
- ``latency_ms``, ``time`` (when the answer was sent).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
from google.protobuf.message import DecodeError
from prometheus_client import Counter

from cdl.errors import InvalidInputError, UnavailableError
from cdl.events import CONTENT_PROTOBUF, EVENT_TYPES, SPECVERSION, source_name
from cdl.logging import get_logger
from cdl.tensors import NUMPY_DTYPES
from cdl.v1 import events_pb2
from cdl.v1 import open_inference_pb2 as pb
from services.gateway.dataplane import http_codec, wire

__all__ = [
    "LOG_DROPPED",
    "LOG_SENT",
    "HttpExchange",
    "InferenceLog",
    "LogProducer",
    "RecordWriter",
    "build_record",
    "flush_unacknowledged",
    "top_labels",
]

log = get_logger(__name__)

LOG_DROPPED = Counter(
    "cdl_gateway_log_dropped_total",
    "Inference log records dropped (full: queue full, Kafka slow or away; kafka: not acknowledged;"
    " unreadable: a REST body the native lane served that the gateway does not read back)",
    ["reason"],
)
LOG_SENT = Counter("cdl_gateway_log_sent_total", "Inference log records handed to Kafka")


_ITEMSIZE: dict[str, int] = {k: np.dtype(v).itemsize for k, v in NUMPY_DTYPES.items()}


class HttpExchange(NamedTuple):
    """A REST infer request and its answer as HTTP bodies (what the native lane served over
    REST), each with its JSON part's length (None: all JSON); read back into the protobuf form
    in the log's thread (:mod:`~services.gateway.dataplane.http_codec`), not on the hot path."""

    request: bytes
    response: bytes
    request_json_length: int | None
    response_json_length: int | None


#: an offered request: model, version, request id, request (or both HTTP bodies, the response
#: then empty), response, latency, status, wall time
_Item = tuple[str, int, str, "bytes | HttpExchange", bytes, float, str, float]


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


class _Flushable(Protocol):
    def flush(self, timeout_s: float = ...) -> None: ...


def flush_unacknowledged(producer: _Flushable, timeout_s: float) -> int:
    """Flush a log's producer at exit (within ``timeout_s``); the records Kafka had not
    acknowledged by then, logged and returned to be counted, not raised (the log is best
    effort: it never stops the gateway's shutdown)."""
    try:
        producer.flush(timeout_s)
    except UnavailableError as exc:
        remaining = exc.context.get("remaining")
        log.warning("inference log: records not acknowledged at exit", error=str(exc))
        return remaining if isinstance(remaining, int) else 0
    return 0


#: datatypes whose raw little-endian contents ``memoryview.cast`` reads natively (little-endian
#: machines only): the fast path of :func:`top_labels` for small outputs, no numpy
_CAST: dict[str, str] = (
    {"FP32": "f", "FP64": "d", "INT32": "i", "INT64": "q", "UINT8": "B", "INT8": "b"}
    if sys.byteorder == "little"
    else {}
)
_FLOATS = frozenset({"FP32", "FP64"})
#: outputs of at most this many elements take the pure-Python path (numpy's per-call overhead
#: is larger than the work below that)
_SMALL = 256


#: messages up to this size are read with protobuf's (C) parser first -- the same values the wire
#: scan reads wherever the parser accepts the bytes, in a fraction of the time; larger ones (and
#: those the parser refuses) are scanned (no copy of the tensors)
_PARSE_MAX = 64 << 10


def _first_output(response: bytes) -> tuple[str, tuple[int, ...], bytes | memoryview] | None:
    """:func:`wire.first_output` (None also where it raises)."""
    if len(response) <= _PARSE_MAX:
        try:
            msg = pb.ModelInferResponse.FromString(response)
        except DecodeError:
            pass
        else:
            if not msg.outputs or not msg.raw_output_contents:
                return None
            first = msg.outputs[0]
            return first.datatype, tuple(first.shape), msg.raw_output_contents[0]
    try:
        return wire.first_output(response)
    except InvalidInputError:
        return None


def _raw_inputs(request: bytes) -> Sequence[bytes | memoryview]:
    """:func:`wire.raw_inputs` (empty where it raises)."""
    if len(request) <= _PARSE_MAX:
        try:
            return pb.ModelInferRequest.FromString(request).raw_input_contents
        except DecodeError:
            pass
    try:
        return wire.raw_inputs(request)
    except InvalidInputError:
        return []


def _top_small(values: list[Any], width: int, floats: bool) -> tuple[list[int], list[float]] | None:
    """:func:`top_labels` of a few values (numpy's argmax semantics: the first maximum);
    None where a row may hold a NaN (numpy's answer is then taken)."""
    if len(values) == width:  # one row: most requests
        if floats and math.isnan(sum(values)):
            return None
        best = max(values)
        return [values.index(best)], [float(best)]
    labels: list[int] = []
    scores: list[float] = []
    for start in range(0, len(values), width):
        row = values[start : start + width]
        if floats:
            total = sum(row)
            if math.isnan(total):  # a NaN (or inf - inf): leave it to numpy
                return None
        i = row.index(max(row))
        labels.append(i)
        scores.append(float(row[i]))
    return labels, scores


def top_labels(response: bytes) -> tuple[list[int], list[float]] | None:
    """Top label (argmax over the last dimension) and its score, per row of the first output of a
    serialized ``ModelInferResponse``; None where there is nothing numeric to decode."""
    out = _first_output(response)
    if out is None:
        return None
    datatype, shape, raw = out
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        return None
    itemsize = _ITEMSIZE[datatype]
    nbytes = len(raw) if isinstance(raw, bytes) else raw.nbytes
    if not nbytes or nbytes % itemsize:
        return None
    count = nbytes // itemsize
    width = shape[-1] if shape else count
    if width <= 0 or count % width:
        return None
    fmt = _CAST.get(datatype)
    if fmt is not None and count <= _SMALL:
        top = _top_small(memoryview(raw).cast(fmt).tolist(), width, datatype in _FLOATS)  # type: ignore[call-overload]
        if top is not None:
            return top
    values = np.frombuffer(raw, dtype=dtype)
    rows = values.reshape(-1, width)
    idx = rows.argmax(axis=1)
    scores = rows[np.arange(rows.shape[0]), idx]
    return [int(i) for i in idx], [float(s) for s in scores]


def _digest(request: bytes) -> str:
    h = hashlib.sha256()
    raws = _raw_inputs(request)
    if raws:
        for r in raws:
            h.update(r)
    else:
        h.update(request)
    return h.hexdigest()


def build_record(item: _Item, inputs_max_bytes: int) -> events_pb2.InferenceLogged:
    """The ``InferenceLogged`` record of one offered request (see the module docstring); an
    :class:`InvalidInputError` for HTTP bodies that are not read back."""
    model, version, request_id, offered, response, latency_s, status, when = item
    if isinstance(offered, HttpExchange):
        request = http_codec.infer_request(
            model, str(version), offered.request, offered.request_json_length, trusted=True
        ).request
        response = http_codec.response_message(offered.response, offered.response_json_length)
    else:
        request = offered
    rec = events_pb2.InferenceLogged(
        request_id=request_id,
        model=model,
        version=version,
        inputs_digest=_digest(request),
        latency_ms=latency_s * 1000.0,
        status=status,
    )
    if len(request) <= inputs_max_bytes:
        rec.inputs_sample = request
    if status == "OK" and response:
        top = top_labels(response)
        if top is not None:
            rec.predicted_labels.extend(str(i) for i in top[0])
            rec.scores.extend(top[1])
    rec.time.FromNanoseconds(int(when * 1e9))
    return rec


#: random bytes per record: a UUID (16) and a trace context (16 + 8)
_ENTROPY = 40
_LOG_TYPE = next(t for t, cls in EVENT_TYPES.items() if cls is events_pb2.InferenceLogged).encode()
_BATCH_TYPE = next(t for t, cls in EVENT_TYPES.items() if cls is events_pb2.InferenceLoggedBatch).encode()


class _LogHeaders:
    """The CloudEvents headers of a log record, as :func:`cdl.events.encode` writes them (the
    same names and values; ``ce_time`` is when the answer was sent), built without an
    :class:`~cdl.events.Event` per record: the log thread's costliest step after the record."""

    def __init__(self, source: str, ce_type: bytes = _LOG_TYPE) -> None:
        self._const = [
            ("ce_specversion", SPECVERSION.encode()),
            ("ce_type", ce_type),
            ("ce_source", source.encode()),
            ("content-type", CONTENT_PROTOBUF.encode()),
        ]
        self._second = -1
        self._prefix = ""

    def __call__(self, event_id: str, traceparent: str, when: float) -> list[tuple[str, bytes]]:
        second = int(when)
        if second != self._second:
            self._second, self._prefix = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        micros = min(999_999, int((when - second) * 1e6))
        stamp = f"{self._prefix}.{micros:06d}Z"
        return [
            *self._const,
            ("ce_id", event_id.encode()),
            ("ce_time", stamp.encode()),
            ("traceparent", traceparent.encode()),
        ]


def _ids(entropy: str, at: int) -> tuple[str, str]:
    """An event id (a version-4 UUID, as ``str(uuid.uuid4())``) and a fresh W3C traceparent (as
    :func:`cdl.events.new_traceparent`) from the hex digits of ``entropy`` at ``at``."""
    h = entropy[at : at + 2 * _ENTROPY]
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:32]}", f"00-{h[32:64]}-{h[64:80]}-01"


class RecordWriter:
    """Builds the records of a round and hands them to ``producer``, in the caller's thread
    (:class:`InferenceLog`'s), counting what was sent and dropped.

    With ``records_per_batch`` > 1 a round's requests of one model version go out together, up
    to that many in one ``InferenceLoggedBatch`` keyed by model (in the order they were
    answered); with 1, each as an ``InferenceLogged`` keyed by model too."""

    def __init__(
        self, producer: LogProducer, topic: str, source: str, inputs_max_bytes: int, records_per_batch: int = 1
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._inputs_max = inputs_max_bytes
        self._per_batch = max(1, records_per_batch)
        self._headers = _LogHeaders(source)
        self._batch_headers = _LogHeaders(source, _BATCH_TYPE)
        self._dropped = LOG_DROPPED.labels(reason="kafka")
        self._unreadable = LOG_DROPPED.labels(reason="unreadable")
        self.sent = 0
        """Requests handed to the producer so far."""
        self.failed = 0
        """Requests not sent or not acknowledged so far."""

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.failed += 1
            self._dropped.inc()

    def _batch_delivered(self, n: int) -> Callable[[Any, Any], None]:
        def delivered(err: Any, msg: Any) -> None:
            if err is not None:
                self.failed += n
                self._dropped.inc(n)

        return delivered

    def _build(self, item: _Item) -> events_pb2.InferenceLogged | None:
        try:
            return build_record(item, self._inputs_max)
        except InvalidInputError as exc:  # what Triton took over REST and the codec does not read
            self._unreadable.inc()
            log.warning("REST request not logged: its body is not read back", model=item[0], error=str(exc)[:200])
            return None

    def write(self, items: list[_Item]) -> None:
        if self._per_batch > 1:
            self._write_batches(items)
            return
        producer, topic, headers_of = self._producer, self._topic, self._headers
        sent = failed = 0
        entropy = os.urandom(_ENTROPY * len(items)).hex()  # one system call for the round's ids
        for i, item in enumerate(items):
            try:
                rec = self._build(item)
                if rec is None:
                    continue
                event_id, trace = _ids(entropy, i * 2 * _ENTROPY)
                headers = headers_of(event_id, trace, item[7])
                producer.send_raw(topic, rec.SerializeToString(), item[0].encode(), headers, self._delivered)
                sent += 1
            except Exception:  # a log record must never stop the log
                failed += 1
                log.exception("inference log record not sent", model=item[0])
        self._count(sent, failed)

    def _write_batches(self, items: list[_Item]) -> None:
        """The round's requests by model version, ``records_per_batch`` at most in a record."""
        groups: dict[tuple[str, str], list[events_pb2.InferenceLogged]] = {}
        failed = 0
        for item in items:
            try:
                rec = self._build(item)
                if rec is not None:
                    groups.setdefault((rec.model, str(rec.version)), []).append(rec)
            except Exception:  # a log record must never stop the log
                failed += 1
                log.exception("inference log record not built", model=item[0])
        chunks = [
            (model, recs[i : i + self._per_batch])
            for (model, _), recs in groups.items()
            for i in range(0, len(recs), self._per_batch)
        ]
        entropy = os.urandom(_ENTROPY * max(1, len(chunks))).hex()
        sent = 0
        now = time.time()
        for i, (model, recs) in enumerate(chunks):
            try:
                batch = events_pb2.InferenceLoggedBatch(records=recs)
                event_id, trace = _ids(entropy, i * 2 * _ENTROPY)
                headers = self._batch_headers(event_id, trace, now)
                value = batch.SerializeToString()
                self._producer.send_raw(self._topic, value, model.encode(), headers, self._batch_delivered(len(recs)))
                sent += len(recs)
            except Exception:  # a log record must never stop the log
                failed += len(recs)
                log.exception("inference log batch not sent", model=model, requests=len(recs))
        self._count(sent, failed)

    def _count(self, sent: int, failed: int) -> None:
        self.sent += sent
        self.failed += failed
        if sent:
            LOG_SENT.inc(sent)
        if failed:
            self._dropped.inc(failed)
        self._producer.poll(0)

    def idle(self) -> None:
        """A round with nothing to write: serve delivery reports."""
        self._producer.poll(0)


class InferenceLog:
    """Bounded, sampled, off-the-hot-path producer of ``inference.logged``; see the module docstring.

    Records are built and handed to ``producer`` by a :class:`RecordWriter` in the log's own
    thread (``topic``, ``source`` and ``inputs_max_bytes`` are that writer's). Without a
    producer the log is off: :meth:`offer` returns at once. The producer is its owner's to flush.
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
        interval_s: float = 0.05,
        records_per_batch: int = 1,
    ) -> None:
        """``interval_s``: the thread hands what was offered to the writer every so often (and
        at once while it is behind by a ``batch``); records reach Kafka that much later."""
        self._sample = min(max(sample, 0.0), 1.0)
        self._credit = 0.0
        self._max = max(1, queue_size)
        self._batch = max(1, batch)
        self._interval = max(0.001, interval_s)
        self._queue: deque[_Item] = deque()
        self._writer: RecordWriter | None = None
        if producer is not None:
            self._writer = RecordWriter(
                producer, topic, source or source_name("gateway"), inputs_max_bytes, records_per_batch
            )
        self._dropped_full = LOG_DROPPED.labels(reason="full")
        self._dropped_kafka = LOG_DROPPED.labels(reason="kafka")
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        if self._writer is not None and self._sample > 0.0:
            self._thread = threading.Thread(target=self._run, name="cdl-gateway-log", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self._thread is not None

    def pending(self) -> int:
        """Records offered and not yet handed to the producer."""
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
        self.put(model, version, request_id, request, response, latency_s, status, time.time())

    def put(
        self,
        model: str,
        version: int,
        request_id: str,
        request: bytes | HttpExchange,
        response: bytes,
        latency_s: float,
        status: str,
        when: float,
    ) -> None:
        """Log a request sampled already (by :meth:`offer`, or by the native lane), answered at
        ``when``. O(1)."""
        if self._thread is None:
            return
        if len(self._queue) >= self._max:
            self._dropped_full.inc()
            return
        self._queue.append((model, version, request_id, request, response, latency_s, status, when))

    def _run(self) -> None:
        writer = self._writer
        assert writer is not None
        queue = self._queue
        interval = self._interval
        idle = 0
        while True:
            if queue:
                # what arrived since the last round, handed over in one go: librdkafka then
                # batches it into one produce request (not one per record), and this thread
                # takes the GIL once per round, not once per request
                n = min(len(queue), self._batch)
                try:
                    writer.write([queue.popleft() for _ in range(n)])
                except Exception:  # the log must never stop
                    self._dropped_kafka.inc(n)
                    log.exception("inference log round not written", records=n)
                if len(queue) >= self._batch:
                    continue  # behind: no pause
                idle = 0
            else:
                writer.idle()
                idle += 1
            # nothing offered for a while: wake less often (a record waits at most 4 intervals)
            if self._closed.wait(interval if idle < 4 else 4 * interval) and not queue:
                return

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the thread after handing what is queued to the producer (within ``timeout_s``)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
