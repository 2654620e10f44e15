"""The ingest stream's fast path: plain JSON records scanned in C (``fastscan.c``).

The C scanner is compiled once per source version with the system C compiler
into ``$CDL_HOME/native/`` and loaded with ctypes (no Python build step). It
accepts only plainly valid records and leaves every other one to the careful
Python path (:func:`services.ingest.records.parse` + ``clean``), which names
the reason; so it changes speed, never a verdict. Without a C compiler the
stream runs on the careful path alone (correct, slower) and says so in the log
(``CDL_INGEST_NO_FASTSCAN=1`` forces that). Memory per scan is bounded by the
batch and ``max_id_bytes``: a longer id leaves its record to the careful path.

``CDL_FASTSCAN_LIB=<path>`` loads a prebuilt scanner instead of building one:
the fuzz test's hook for a build with AddressSanitizer and UBSan
(``tests/native/test_fastscan_fuzz.py``, ``docs/native.md``).
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from cdl import native
from cdl.datasets import DatasetSpec, Task
from cdl.events import InBatch
from cdl.settings import NativeSettings
from services.ingest.records import Limits

__all__ = [
    "ACCEPTED",
    "OTHER_DATASET",
    "UNDECIDED",
    "BatchScan",
    "IdSet",
    "JsonBatch",
    "Scan",
    "available",
    "scan",
    "scan_batch",
]

ACCEPTED, UNDECIDED, OTHER_DATASET = 0, 1, 2

_SOURCE = Path(__file__).with_name("fastscan.c")

_i64p = np.ctypeslib.ndpointer(dtype=np.int64, flags="C_CONTIGUOUS")
_i32p = np.ctypeslib.ndpointer(dtype=np.int32, flags="C_CONTIGUOUS")
_i8p = np.ctypeslib.ndpointer(dtype=np.int8, flags="C_CONTIGUOUS")
_u8p = np.ctypeslib.ndpointer(dtype=np.uint8, flags="C_CONTIGUOUS")
_u32p = np.ctypeslib.ndpointer(dtype=np.uint32, flags="C_CONTIGUOUS")


@functools.cache
def _load() -> ctypes.CDLL | None:
    """Build (once per source version) and load the scanner; None when that is impossible."""
    switches = NativeSettings()
    if switches.ingest_no_fastscan:
        return None
    prebuilt = switches.fastscan_lib
    lib = ctypes.CDLL(prebuilt) if prebuilt else native.load(_SOURCE)
    if lib is None:
        return None
    fn = lib.cdl_scan_json
    fn.restype = ctypes.c_int64
    fn.argtypes = [
        ctypes.c_char_p,  # buf
        _i64p,  # bounds
        _i64p,  # which
        ctypes.c_int64,  # n
        ctypes.c_char_p,  # dataset
        ctypes.c_int64,
        ctypes.c_char_p,  # labels
        _i64p,  # label bounds
        ctypes.c_int64,
        ctypes.c_int64,  # size
        ctypes.c_int,  # dtype code
        ctypes.c_double,  # holdout fraction
        ctypes.c_int64,  # max id length
        ctypes.c_void_p,  # x_out
        _i32p,  # label_out
        _u8p,  # holdout_out
        _u8p,  # ids_out
        _i64p,  # ids_used
        _i8p,  # status
        _i64p,  # ds_span
    ]
    idset = ctypes.c_void_p
    for name, res, args in (
        ("cdl_idset_new", idset, []),
        ("cdl_idset_free", None, [idset]),
        ("cdl_idset_len", ctypes.c_int64, [idset]),
        ("cdl_idset_contains", ctypes.c_int, [idset, ctypes.c_char_p, ctypes.c_int64]),
        ("cdl_idset_add_many", ctypes.c_int64, [idset, ctypes.c_char_p, _i64p, _i64p, ctypes.c_int64, _u8p]),
        ("cdl_ids_ucs4", None, [_u8p, _i64p, _i64p, ctypes.c_int64, ctypes.c_int64, _u32p]),
    ):
        getattr(lib, name).restype = res
        getattr(lib, name).argtypes = args
    return lib


def available() -> bool:
    """Whether the C scanner could be built and loaded."""
    return _load() is not None


class JsonBatch:
    """Record values in one buffer (record ``r`` spans ``buf[bounds[r]:bounds[r + 1]]``),
    shared by several scans (one per dataset).

    ``buf`` is a bytes object, which CPython always ends with a NUL byte past its
    length: the scanner's features fast path relies on that sentinel.
    """

    __slots__ = ("bounds", "buf")

    def __init__(self, buf: bytes, bounds: npt.NDArray[np.int64]) -> None:
        if type(buf) is not bytes:  # the NUL sentinel is a property of bytes objects
            raise TypeError("JsonBatch needs a bytes buffer")
        self.buf = buf
        self.bounds = np.ascontiguousarray(bounds, dtype=np.int64)

    @classmethod
    def of(cls, values: list[bytes]) -> JsonBatch:
        n = len(values)
        bounds = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, values), dtype=np.int64, count=n), out=bounds[1:])
        return cls(b"".join(values), bounds)


@dataclass(slots=True)
class Scan:
    """Per scanned record (in ``which`` order) its ``status``; ``other`` maps records of
    another dataset to its name. The accepted records, compactly and in order: features
    ``x`` (the dataset's dtype and shape), label indices, holdout flags and ids: as a
    fixed-width unicode column (``id_column``, as shards store them) and as bytes
    (``id_bytes[id_starts[k]:id_starts[k] + id_lengths[k]]``, for :class:`IdSet`)."""

    status: npt.NDArray[np.int8]
    x: npt.NDArray[Any]
    labels: npt.NDArray[np.int32]
    holdout: npt.NDArray[np.bool_]
    id_column: npt.NDArray[np.str_]
    id_bytes: bytes
    id_starts: npt.NDArray[np.int64]
    id_lengths: npt.NDArray[np.int64]
    other: dict[int, str]

    @property
    def ids(self) -> list[str]:
        return [self.id_at(k) for k in range(len(self.id_starts))]

    def id_at(self, k: int) -> str:
        lo = int(self.id_starts[k])
        return self.id_bytes[lo : lo + int(self.id_lengths[k])].decode("ascii")


#: the dtypes the scanner writes (codes shared with fastscan.c)
_DTYPES = {"float32": 0, "float64": 1, "uint8": 2, "int64": 3}


def scan(batch: JsonBatch, which: npt.NDArray[np.int64], spec: DatasetSpec, max_id_bytes: int = 256) -> Scan | None:
    """Scan records ``which`` of ``batch`` as records of ``spec``; None without the C scanner
    (or for a dtype it does not write).

    A record whose id is longer than ``max_id_bytes`` bytes is left undecided (the careful
    path rejects it with its reason), so the id column costs at most
    ``len(which) * max_id_bytes * 4`` bytes.
    """
    lib = _load()
    if lib is None or spec.dtype not in _DTYPES:
        return None
    n = len(which)
    which = np.ascontiguousarray(which, dtype=np.int64)
    name = spec.name.encode()
    label_bytes = [lab.encode() for lab in spec.labels]
    label_bounds = np.zeros(len(label_bytes) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in label_bytes], out=label_bounds[1:])
    size = math.prod(spec.input_shape)
    x = np.empty((n, size), dtype=spec.dtype)
    labels = np.empty(n, dtype=np.int32)
    holdout = np.empty(n, dtype=np.uint8)
    status = np.empty(n, dtype=np.int8)
    spans = np.zeros(2 * n, dtype=np.int64)
    max_id_bytes = max(int(max_id_bytes), 0)
    scanned = int((batch.bounds[which + 1] - batch.bounds[which]).sum()) if n else 0
    # each id is no longer than its record, nor than max_id_bytes; plus its NUL
    ids_out = np.empty(min(scanned + n, n * (max_id_bytes + 1)) + 1, dtype=np.uint8)
    used = np.zeros(1, dtype=np.int64)
    accepted = int(
        lib.cdl_scan_json(
            batch.buf,
            batch.bounds,
            which,
            n,
            name,
            len(name),
            b"".join(label_bytes),
            label_bounds,
            len(label_bytes),
            size,
            _DTYPES[spec.dtype],
            spec.holdout_fraction,
            max_id_bytes,
            x.ctypes.data,
            labels,
            holdout,
            ids_out,
            used,
            status,
            spans,
        )
    )
    if accepted < 0:
        raise MemoryError("fast JSON scan: out of memory")
    blob = ids_out[: int(used[0])]  # ASCII ids, each NUL-terminated
    other: dict[int, str] = {}
    for k in np.flatnonzero(status == OTHER_DATASET).tolist():
        lo, ln = int(spans[2 * k]), int(spans[2 * k + 1])
        other[k] = batch.buf[lo : lo + ln].decode("ascii")
    return Scan(
        status,
        x[:accepted].reshape(accepted, *spec.input_shape),
        labels[:accepted],
        holdout[:accepted].view(np.bool_),
        *_id_columns(lib, blob, accepted),
        other,
    )


def _id_columns(
    lib: ctypes.CDLL, blob: npt.NDArray[np.uint8], n: int
) -> tuple[npt.NDArray[np.str_], bytes, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """NUL-terminated ASCII ids as a ``<U{longest}`` array (no Python object per id; nothing
    allocated but the column itself, ``n * longest * 4`` bytes), and as bytes with each id's
    start and length."""
    if n == 0:
        none = np.empty(0, dtype=np.int64)
        return np.empty(0, dtype="<U1"), b"", none, none
    ends = np.flatnonzero(blob == 0)
    starts = np.empty(n, dtype=np.int64)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts
    width = max(int(lengths.max()), 1)
    chars = np.empty((n, width), dtype=np.uint32)  # UCS-4, zero-padded past each id's end: a <U column
    lib.cdl_ids_ucs4(blob, starts, lengths, n, width, chars)
    column: npt.NDArray[np.str_] = chars.view(f"<U{width}").reshape(n)
    return column, blob.tobytes(), starts, lengths


class IdSet:
    """The ids a dataset has taken, in C (~30 bytes per id; a Python set of str takes
    over 100), or a Python set where the C helper is unavailable."""

    def __init__(self) -> None:
        lib = _load()
        self._lib = lib
        self._h = lib.cdl_idset_new() if lib is not None else None
        self._py: set[str] | None = set() if lib is None else None
        if lib is not None and not self._h:
            raise MemoryError("id set: out of memory")

    def __del__(self) -> None:
        if getattr(self, "_h", None) and self._lib is not None:
            self._lib.cdl_idset_free(self._h)
            self._h = None

    def __len__(self) -> int:
        if self._py is not None:
            return len(self._py)
        assert self._lib is not None
        return int(self._lib.cdl_idset_len(self._h))

    def __contains__(self, rid: str) -> bool:
        if self._py is not None:
            return rid in self._py
        assert self._lib is not None
        raw = rid.encode()
        return bool(self._lib.cdl_idset_contains(self._h, raw, len(raw)))

    def add(self, rid: str) -> bool:
        """Add ``rid``; True when it was not there before."""
        return bool(self.add_all([rid])[0])

    def add_all(self, ids: list[str]) -> npt.NDArray[np.bool_]:
        """Add ``ids`` in order; per id, whether it was new (a repeat within ``ids`` is not)."""
        if self._py is not None:
            fresh = np.zeros(len(ids), dtype=bool)
            for k, rid in enumerate(ids):
                if rid not in self._py:
                    self._py.add(rid)
                    fresh[k] = True
            return fresh
        raw = [rid.encode() for rid in ids]
        lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        starts = np.zeros(len(raw), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        return self.add_bytes(b"".join(raw), starts, lengths)

    def add_bytes(
        self, buf: bytes, starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.bool_]:
        """Add the ids ``buf[starts[k]:starts[k] + lengths[k]]`` (UTF-8) in order; per id, whether it was new."""
        n = len(starts)
        if self._py is not None:
            return self.add_all([buf[int(a) : int(a) + int(b)].decode() for a, b in zip(starts, lengths, strict=True)])
        assert self._lib is not None
        fresh = np.zeros(n, dtype=np.uint8)
        starts = np.ascontiguousarray(starts, dtype=np.int64)
        lengths = np.ascontiguousarray(lengths, dtype=np.int64)
        if self._lib.cdl_idset_add_many(self._h, buf, starts, lengths, n, fresh) < 0:
            raise MemoryError("id set: out of memory")
        return fresh.view(np.bool_)


#: what a batch's scan gives: per dataset (spec, accepted rows, scan), and the undecided rows
BatchScan = tuple[list[tuple[DatasetSpec, npt.NDArray[np.int64], Scan]], list[int]]


def _dataset_of(value: bytes) -> str | None:
    """The ``dataset`` field of a JSON record, or None (the careful path will say why)."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    name = doc.get("dataset") if type(doc) is dict else None
    return name if type(name) is str and name else None


def scan_batch(
    batch: InBatch,
    eligible: npt.NDArray[np.int64],
    lookup: Callable[[str], DatasetSpec | None],
    limits: Limits,
) -> BatchScan:
    """Scan JSON records in C, one dataset at a time (in the scan thread; no state is touched).

    ``lookup`` finds a dataset's spec (the registry's); ``limits`` are the service's.
    Returns, per dataset, the rows of ``batch`` accepted and their scan; and the rows left undecided.
    """
    joined = JsonBatch(batch.data, batch.bounds)  # the batch's own buffer, not a copy
    pending = eligible
    accepted: list[tuple[DatasetSpec, npt.NDArray[np.int64], Scan]] = []
    undecided: list[int] = []
    name = _dataset_of(batch.value(int(pending[0])) or b"")
    while len(pending):
        spec = lookup(name) if name else None
        if spec is None or spec.task in (Task.TEXT, Task.REGRESSION):  # the careful path names the reason
            undecided.append(int(pending[0]))
            pending = pending[1:]
            name = _dataset_of(batch.value(int(pending[0])) or b"") if len(pending) else None
            continue
        sc = scan(joined, pending, spec, max_id_bytes=limits.for_spec(spec).id_bytes)
        if sc is None:  # no C scanner here: everything takes the careful path
            undecided.extend(pending.tolist())
            break
        undecided.extend(pending[sc.status == UNDECIDED].tolist())
        if len(sc.id_starts):  # (sc.ids would make a str per record)
            accepted.append((spec, pending[sc.status == ACCEPTED], sc))
        others = sc.status == OTHER_DATASET
        name = sc.other[int(np.flatnonzero(others)[0])] if others.any() else None
        pending = pending[others]
    return accepted, undecided
