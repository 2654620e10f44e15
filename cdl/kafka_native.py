"""A consumer that hands over records by column (``rdbatch.c``, librdkafka through ctypes).

confluent-kafka's ``consume()`` makes a ``Message`` object per record, and
reading its fields back makes more: at ingest's rates that was about a third of
the stream's CPU. This consumer runs the same librdkafka (the copy
confluent-kafka ships) with the same settings, and returns each batch as
one buffer of values plus arrays of partitions and offsets (an
:class:`~cdl.events.InBatch`); keys and headers are decoded only for the
records that have them. It offers the part of confluent-kafka's ``Consumer``
that :class:`~cdl.kafka.TransactionalLoop` uses (subscribe with assign/revoke
callbacks, assignment, position, group metadata, close), so the transactional
producer commits its offsets exactly as before.

Where the helper cannot be built (no C compiler, a confluent-kafka built
without its bundled librdkafka) or the bundled librdkafka is not a version
``rdbatch.c``'s declarations of its structs were checked against
(:data:`LIBRDKAFKA_VERSIONS`), :func:`available` is False, a warning says why
and the loop uses confluent-kafka's consumer; ``CDL_KAFKA_NO_NATIVE=1`` forces
that (``CDL_NATIVE_REQUIRED=1`` makes those an error instead, see
:mod:`cdl.native`).

Topics are named per record, also those a regular-expression subscription
(``^...``) matched. Consume errors are logged and counted
(``cdl_kafka_consume_errors_total{code}``); a fatal one raises. Where memory
runs out while a batch is copied, the batch is released and
:meth:`NativeConsumer.consume_batches` raises :class:`MemoryError`: the
consumer's positions are then past records nobody saw, so from then on
:meth:`~NativeConsumer.position` raises too (nothing can commit them) and the
caller recovers from the committed offsets with a new consumer (``docs/native.md``).
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import confluent_kafka
import numpy as np
from confluent_kafka import TopicPartition

from cdl import native
from cdl.errors import UnavailableError
from cdl.events import Headers, InBatch
from cdl.logging import get_logger
from cdl.observability import count_consume_error
from cdl.settings import NativeSettings

__all__ = ["LIBRDKAFKA_VERSIONS", "NativeConsumer", "available"]

log = get_logger(__name__)

_SOURCE = Path(__file__).with_name("rdbatch.c")
_FLAG_NULL_VALUE, _FLAG_KEY, _FLAG_HEADERS = 1, 2, 4
_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_int)
_I64 = struct.Struct("<q")
_ERR_FATAL = -150
#: the librdkafka releases (major, minor; first and last) whose rdkafka.h declares the structs
#: rdbatch.c reads as it does (checked 2.1 to 2.15 in the sources, 2.16 by the tests; the
#: confluent-kafka pin in pyproject.toml keeps to it)
LIBRDKAFKA_VERSIONS = ((2, 6), (2, 16))


def _librdkafka() -> Path | None:
    """The librdkafka that confluent-kafka's wheel bundles (and has loaded already)."""
    libs = Path(confluent_kafka.__file__).resolve().parent.parent / "confluent_kafka.libs"
    found = sorted(libs.glob("librdkafka*.so*")) if libs.is_dir() else []
    return found[0] if found else None


def _version_str(version: int) -> str:
    return f"{version >> 24 & 0xFF}.{version >> 16 & 0xFF}.{version >> 8 & 0xFF}"


def _supported(version: int) -> bool:
    (lo_major, lo_minor), (hi_major, hi_minor) = LIBRDKAFKA_VERSIONS
    return (lo_major, lo_minor) <= (version >> 24 & 0xFF, version >> 16 & 0xFF) <= (hi_major, hi_minor)


@functools.cache
def _load() -> ctypes.CDLL | None:
    if NativeSettings().kafka_no_native:
        return None
    rdkafka = _librdkafka()
    if rdkafka is None:
        native.fallback("no bundled librdkafka next to confluent-kafka: the columnar consumer is unavailable")
        return None
    try:
        rd = ctypes.CDLL(str(rdkafka))  # confluent-kafka has it loaded already: the same library
        rd.rd_kafka_version.restype = ctypes.c_int
        version = int(rd.rd_kafka_version())
    except (OSError, AttributeError) as exc:
        native.fallback(f"librdkafka {rdkafka} cannot be loaded: {exc}")
        return None
    if not _supported(version):
        (a, b), (c, d) = LIBRDKAFKA_VERSIONS
        native.fallback(
            f"librdkafka {_version_str(version)} is not a version rdbatch.c was written for ({a}.{b}-{c}.{d}):"
            " confluent-kafka's consumer runs instead of the columnar one",
            library=str(rdkafka),
        )
        return None
    key = f"python={sys.version}; confluent-kafka={confluent_kafka.version()[0]}; librdkafka={version:#x}"
    lib = native.load(_SOURCE, (str(rdkafka), f"-Wl,-rpath,{rdkafka.parent}"), key=key)
    if lib is None:
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    strings = ctypes.POINTER(ctypes.c_char_p)
    sigs: dict[str, tuple[Any, list[Any]]] = {
        "cdl_consumer_new": (p, [strings, strings, i32, _HOOK, ctypes.c_char_p, i32]),
        "cdl_consumer_subscribe": (i32, [p, strings, i32]),
        "cdl_consumer_consume": (i64, [p, i64, i32, p, p, p, p, p, p]),
        "cdl_consumer_data": (p, [p, ctypes.POINTER(i64)]),
        "cdl_consumer_aux": (p, [p, ctypes.POINTER(i64)]),
        "cdl_consumer_errors": (i32, [p, p, p, i32, ctypes.POINTER(ctypes.c_char_p)]),
        "cdl_consumer_errno": (i32, [p]),
        "cdl_consumer_topic_count": (i32, [p]),
        "cdl_consumer_topic_name": (ctypes.c_char_p, [p, i32]),
        "cdl_err2name": (ctypes.c_char_p, [i32]),
        "cdl_rdkafka_version": (i32, []),
        "cdl_consumer_positions": (i32, [p, p, p, p, i32]),
        "cdl_consumer_group_metadata": (i64, [p, ctypes.c_char_p, i64]),
        "cdl_consumer_close": (None, [p]),
    }
    for name, (res, args) in sigs.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def available() -> bool:
    """Whether the columnar consumer could be built and loaded."""
    return _load() is not None


def _strings(items: list[str]) -> Any:
    return (ctypes.c_char_p * len(items))(*[s.encode() for s in items])


def _setting(value: object) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


class NativeConsumer:
    """A librdkafka consumer returning :class:`InBatch` columns; see the module docstring."""

    def __init__(self, config: dict[str, Any], max_batch: int = 10000) -> None:
        lib = _load()
        if lib is None:
            raise UnavailableError("the columnar consumer is unavailable on this machine")
        self._lib = lib
        #: topic names by the C side's index (subscribed, matched by a pattern, assigned), as seen so far
        self._names: list[str] = []
        #: why the positions can no longer be committed (records taken off the queue but never handed over)
        self._lost: str | None = None
        self._on_assign: Callable[[Any, list[TopicPartition]], None] | None = None
        self._on_revoke: Callable[[Any, list[TopicPartition]], None] | None = None
        #: an exception raised in a rebalance callback, re-raised when consume returns
        self._failure: BaseException | None = None
        self._hook = _HOOK(self._rebalanced)  # kept referenced: C holds the pointer
        err = ctypes.create_string_buffer(512)
        keys, values = list(config), [_setting(v) for v in config.values()]
        self._h = lib.cdl_consumer_new(_strings(keys), _strings(values), len(keys), self._hook, err, len(err))
        if not self._h:
            raise UnavailableError("consumer could not be created", error=err.value.decode(errors="replace"))
        self._cap = max_batch
        self._partitions = np.empty(max_batch, dtype=np.int32)
        self._offsets = np.empty(max_batch, dtype=np.int64)
        self._topic = np.empty(max_batch, dtype=np.int16)
        self._bounds = np.empty(max_batch + 1, dtype=np.int64)
        self._aux_off = np.empty(max_batch, dtype=np.int64)
        self._flags = np.empty(max_batch, dtype=np.int8)

    # ------------------------------------------------------------ group
    def subscribe(
        self,
        topics: list[str],
        on_assign: Callable[[Any, list[TopicPartition]], None] | None = None,
        on_revoke: Callable[[Any, list[TopicPartition]], None] | None = None,
    ) -> None:
        """Subscribe to ``topics``: names, or regular expressions where they start with ``^``."""
        self._on_assign, self._on_revoke = on_assign, on_revoke
        err = self._lib.cdl_consumer_subscribe(self._h, _strings(list(topics)), len(topics))
        if err:
            raise UnavailableError("subscribe failed", topics=topics, error=err)

    def _rebalanced(self, assigned: int) -> None:
        # runs inside a consume (or close) call, on this thread, while the partitions are still ours
        callback = self._on_assign if assigned else self._on_revoke
        if callback is None or self._failure is not None:
            return
        try:
            callback(self, self.assignment())
        except BaseException as exc:  # noqa: BLE001 - ctypes would print and drop it: re-raised after the C call
            self._failure = exc

    def _raise_failure(self, consumed: int = 0) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            if consumed > 0:
                self._lose(f"a rebalance callback raised {failure!r}")
            raise failure

    def _lose(self, why: str) -> None:
        """Records were taken off the queue but will not be handed over: the positions are past them."""
        self._lost = why
        log.error("consumed records were not handed over; the positions must not be committed", reason=why)

    def _topic_name(self, index: int) -> str:
        if index >= len(self._names):
            count = int(self._lib.cdl_consumer_topic_count(self._h))
            for i in range(len(self._names), count):
                self._names.append((self._lib.cdl_consumer_topic_name(self._h, i) or b"").decode())
        return self._names[index]

    def _positions(self) -> list[TopicPartition]:
        if not self._h:
            return []
        cap = 4096
        topic = np.empty(cap, dtype=np.int16)
        parts = np.empty(cap, dtype=np.int32)
        offs = np.empty(cap, dtype=np.int64)
        n = self._lib.cdl_consumer_positions(self._h, topic.ctypes.data, parts.ctypes.data, offs.ctypes.data, cap)
        if n < 0:
            return []
        return [
            TopicPartition(self._topic_name(t), p, o)
            for t, p, o in zip(topic[:n].tolist(), parts[:n].tolist(), offs[:n].tolist(), strict=True)
        ]

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition) for tp in self._positions()]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        """The consume positions of ``partitions`` (those assigned).

        Raises :class:`UnavailableError` once records were consumed but never handed over
        (see :meth:`consume_batches`): such positions must not be committed.
        """
        if self._lost is not None:
            raise UnavailableError(
                "positions are past records that were never handed over; recover from the committed offsets",
                reason=self._lost,
            )
        wanted = {(tp.topic, tp.partition) for tp in partitions}
        return [tp for tp in self._positions() if (tp.topic, tp.partition) in wanted]

    def consumer_group_metadata(self) -> bytes:
        if not self._h:
            raise UnavailableError("the consumer is closed")
        buf = ctypes.create_string_buffer(4096)
        n = self._lib.cdl_consumer_group_metadata(self._h, buf, len(buf))
        if n < 0:
            raise UnavailableError("consumer group metadata unavailable")
        return buf.raw[:n]

    def close(self) -> None:
        if self._h:
            try:  # leaving the group runs the revoke hook, which still needs the handle
                self._lib.cdl_consumer_close(self._h)
            finally:
                self._h = None
            self._raise_failure()

    # ------------------------------------------------------------ records
    def consume_batches(self, max_records: int, timeout_s: float) -> tuple[int, list[InBatch]]:
        """Up to ``max_records`` records, one :class:`InBatch` per topic; and how many in all.

        Consume errors are logged and counted (``cdl_kafka_consume_errors_total{code}``); a
        fatal one raises :class:`UnavailableError`. Where memory ran out copying the batch it
        raises :class:`MemoryError`: the batch is gone from this consumer (its positions are
        past it, and :meth:`position` refuses from then on), so the caller recovers from the
        committed offsets (a new consumer, or a restart) and nothing is lost.
        """
        if not self._h:
            raise UnavailableError("the consumer is closed")
        if self._lost is not None:
            raise UnavailableError("the consumer lost a batch; recover from the committed offsets", reason=self._lost)
        max_records = min(max_records, self._cap)
        n = int(
            self._lib.cdl_consumer_consume(
                self._h,
                max_records,
                int(timeout_s * 1000),
                self._partitions.ctypes.data,
                self._offsets.ctypes.data,
                self._topic.ctypes.data,
                self._bounds.ctypes.data,
                self._aux_off.ctypes.data,
                self._flags.ctypes.data,
            )
        )
        fatal = self._report_errors()
        if n == -1:
            self._lose("out of memory copying a batch")
            self._raise_failure()
            raise MemoryError("consumer: out of memory copying a batch (recover from the committed offsets)")
        if n == -2:
            errno = int(self._lib.cdl_consumer_errno(self._h))
            self._raise_failure()
            raise UnavailableError("consume failed", errno=errno, error=os.strerror(errno))
        self._raise_failure(n)
        if fatal is not None:
            if n:
                self._lose(f"fatal consumer error: {fatal}")
            raise UnavailableError("fatal consumer error", error=fatal)
        if n == 0:
            return 0, []
        size = ctypes.c_int64()
        ptr = self._lib.cdl_consumer_data(self._h, ctypes.byref(size))
        data = ctypes.string_at(ptr, size.value) if size.value else b""
        flags = self._flags[:n].copy()
        keys: list[bytes | None] | None = None
        headers: list[Headers | None] | None = None
        if (flags & (_FLAG_KEY | _FLAG_HEADERS)).any():
            keys, headers = self._keys_and_headers(n, flags)
        topics = self._topic[:n]
        batch = InBatch(
            self._topic_name(int(topics[0])),
            self._partitions[:n].copy(),
            self._offsets[:n].copy(),
            data,
            self._bounds[: n + 1].copy(),
            null_values=(flags & _FLAG_NULL_VALUE).astype(bool) if (flags & _FLAG_NULL_VALUE).any() else None,
            keys=keys,
            headers=headers,
        )
        if (topics == topics[0]).all():
            return n, [batch]
        # records of several topics (e.g. data.raw and data.feedback): one batch per topic, in order of first
        order = list(dict.fromkeys(topics.tolist()))
        return n, [batch.select(np.flatnonzero(topics == t), self._topic_name(t)) for t in order]

    def _keys_and_headers(self, n: int, flags: np.ndarray[Any, Any]) -> tuple[list[bytes | None], list[Headers | None]]:
        size = ctypes.c_int64()
        ptr = self._lib.cdl_consumer_aux(self._h, ctypes.byref(size))
        aux = ctypes.string_at(ptr, size.value)
        keys: list[bytes | None] = [None] * n
        headers: list[Headers | None] = [None] * n
        for i in np.flatnonzero(flags & (_FLAG_KEY | _FLAG_HEADERS)).tolist():
            at = int(self._aux_off[i])
            f = int(flags[i])
            if f & _FLAG_KEY:
                (klen,) = _I64.unpack_from(aux, at)
                keys[i] = aux[at + 8 : at + 8 + klen]
                at += 8 + klen
            if f & _FLAG_HEADERS:
                (count,) = _I64.unpack_from(aux, at)
                at += 8
                pairs: list[tuple[str, bytes | None]] = []
                for _ in range(count):
                    (nlen,) = _I64.unpack_from(aux, at)
                    name = aux[at + 8 : at + 8 + nlen].decode(errors="replace")
                    at += 8 + nlen
                    (vlen,) = _I64.unpack_from(aux, at)
                    at += 8
                    value = None if vlen < 0 else aux[at : at + vlen]
                    at += max(vlen, 0)
                    pairs.append((name, value))
                headers[i] = pairs
        return keys, headers

    def _report_errors(self) -> str | None:
        """Log and count the consume errors since the last call; a fatal one's description, or None."""
        cap = 32
        codes = np.empty(cap, dtype=np.int32)
        counts = np.empty(cap, dtype=np.int64)
        last = ctypes.c_char_p()
        k = int(self._lib.cdl_consumer_errors(self._h, codes.ctypes.data, counts.ctypes.data, cap, ctypes.byref(last)))
        if not k:
            return None
        detail = (last.value or b"").decode(errors="replace")
        fatal = None
        for code, count in zip(codes[:k].tolist(), counts[:k].tolist(), strict=True):
            name = (self._lib.cdl_err2name(code) or b"").decode() or str(code)
            count_consume_error(name, count)
            log.warning("consumer error", code=name, count=count, error=detail)
            if code == _ERR_FATAL:
                fatal = detail
        return fatal
