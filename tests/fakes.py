"""Test doubles the unit tier shares: an object store in memory and a producer that records.

Neither talks to a server or starts a client that would: :class:`MemoryStore` keeps objects
in dicts with :class:`cdl.store.ObjectStore`'s semantics for what cdl uses of it (the
:class:`cdl.store.BlobStore` protocol), :class:`RecordingProducer` keeps what is sent with
the interface of :class:`cdl.kafka.Producer` (and of the gateway log's ``LogProducer``).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

from cdl.errors import NotFoundError, UnavailableError
from cdl.events import Event, OutRecord, decode, encode
from cdl.store import BUCKETS, ObjectInfo

__all__ = ["MemoryStore", "RecordingProducer", "Sent"]


class MemoryStore:
    """:class:`cdl.store.BlobStore` in memory, as :class:`cdl.store.ObjectStore` behaves on MinIO.

    Buckets exist from the start (``buckets``, else cdl's :data:`cdl.store.BUCKETS`) or
    from :meth:`ensure_buckets`. Reading a missing object (or one in a missing bucket)
    raises :class:`NotFoundError` ``object not found``; writing or listing in a missing
    bucket, ``bucket not found``; ``exists`` says False. A write replaces the object and
    returns its ``s3://`` URI; JSON is written as ObjectStore writes it. ``list`` goes in
    key order (S3's), ``recursive=False`` yields only the objects right below ``prefix``
    and :meth:`folders` the names one level below it, as S3's ``/`` delimiter does. ETags
    are the MD5 of the body (S3's for a single-part upload; the local MinIO, run with
    ``--no-compat``, gives random ones: cdl only compares them). Deleting a missing object
    is no error (S3's); deleting in a missing bucket raises NotFoundError here (ObjectStore
    lets MinIO's S3Error through). Safe to use from several threads.
    """

    def __init__(self, *buckets: str) -> None:
        self._buckets: dict[str, dict[str, bytes]] = {b: {} for b in buckets or BUCKETS}
        self._lock = threading.Lock()

    def copy(self) -> MemoryStore:
        """Another store holding the objects this one holds now (each changes on its own after)."""
        other = MemoryStore()
        with self._lock:
            other._buckets = {bucket: dict(objects) for bucket, objects in self._buckets.items()}
        return other

    def ensure_buckets(self, *buckets: str) -> None:
        with self._lock:
            for bucket in buckets or BUCKETS:
                self._buckets.setdefault(bucket, {})

    def _bucket(self, bucket: str) -> dict[str, bytes]:
        objects = self._buckets.get(bucket)
        if objects is None:
            raise NotFoundError("bucket not found", bucket=bucket)
        return objects

    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes | Sequence[bytes | bytearray | memoryview],
        content_type: str = "application/octet-stream",
    ) -> str:
        body = data if isinstance(data, bytes) else b"".join(bytes(part) for part in data)
        with self._lock:
            self._bucket(bucket)[key] = body
        return f"s3://{bucket}/{key}"

    def get_bytes(self, bucket: str, key: str) -> bytes:
        with self._lock:
            body = self._buckets.get(bucket, {}).get(key)
        if body is None:
            raise NotFoundError("object not found", uri=f"s3://{bucket}/{key}")
        return body

    def put_json(self, bucket: str, key: str, doc: Any) -> str:
        data = json.dumps(doc, indent=2, sort_keys=True).encode()
        return self.put_bytes(bucket, key, data, content_type="application/json")

    def get_json(self, bucket: str, key: str) -> Any:
        return json.loads(self.get_bytes(bucket, key))

    def size(self, bucket: str, key: str) -> int:
        return len(self.get_bytes(bucket, key))

    def exists(self, bucket: str, key: str) -> bool:
        with self._lock:
            return key in self._buckets.get(bucket, {})

    def list(self, bucket: str, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        with self._lock:  # a snapshot, taken when iteration starts (the call itself raises nothing, as ObjectStore's)
            objects = sorted(self._bucket(bucket).items())
        for key, body in objects:
            if key.startswith(prefix) and (recursive or "/" not in key[len(prefix) :]):
                yield ObjectInfo(bucket, key, len(body), hashlib.md5(body).hexdigest())

    def folders(self, bucket: str, prefix: str = "") -> builtins.list[str]:
        with self._lock:
            keys = list(self._bucket(bucket))
        rests = (k[len(prefix) :] for k in keys if k.startswith(prefix))
        return sorted({rest.split("/", 1)[0] for rest in rests if "/" in rest})

    def delete(self, bucket: str, key: str) -> None:
        with self._lock:
            self._bucket(bucket).pop(key, None)


class Sent(NamedTuple):
    """One record handed to a :class:`RecordingProducer`."""

    topic: str
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]

    def event(self) -> Event:
        """The CloudEvent in the record, as a consumer decodes it."""
        return decode(self.key, self.value, self.headers)


class RecordingProducer:
    """:class:`cdl.kafka.Producer`'s interface, recording instead of producing.

    ``sent`` holds every record in the order sent. Delivery reports come as librdkafka's
    do, from :meth:`poll` and :meth:`flush`: each callback gets ``(error, record)``, the
    error None, or with ``fail`` ``"MSG_TIMED_OUT"``; failed records without a callback of
    their own make :meth:`flush` raise :class:`UnavailableError` as Producer's does.
    Clearing ``gate`` makes :meth:`send_raw` block until it is set again (a stuck Kafka).
    """

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[Sent] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self._reports: list[tuple[Callable[[Any, Any], None], Sent]] = []
        self._errors: list[str] = []
        self._lock = threading.Lock()

    def _on_delivery(self, err: Any, record: Sent) -> None:
        if err is not None:
            self._errors.append(f"{record.topic}: {err}")

    def send_raw(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] | None = None,
        on_delivery: Callable[[Any, Any], None] | None = None,
    ) -> None:
        self.gate.wait()
        record = Sent(topic, value, key, list(headers or []))
        with self._lock:
            self.sent.append(record)
            self._reports.append((on_delivery or self._on_delivery, record))

    def send(self, topic: str, event: Event) -> None:
        key, value, headers = encode(event)
        self.send_raw(topic, value, key, headers)

    def send_record(self, record: OutRecord) -> None:
        """Send an encoded record as the services' loops produce their jobs' outputs."""
        self.send_raw(record.topic, record.value, record.key, record.headers)

    def poll(self, timeout_s: float = 0.0) -> None:
        with self._lock:
            reports, self._reports = self._reports, []
        for callback, record in reports:
            callback("MSG_TIMED_OUT" if self.fail else None, record)

    def flush(self, timeout_s: float = 30.0) -> None:
        self.poll()
        errors, self._errors = self._errors, []
        if errors:
            raise UnavailableError("produce failed", errors=errors[:5])

    def events(self, topic: str | None = None) -> builtins.list[Event]:
        """The events sent (to ``topic``), decoded."""
        return [r.event() for r in self.sent if topic is None or r.topic == topic]
