"""Datasets: registered specs, the shard format and version manifests.

Shared by ingest (writes) and trainer/tuner (read).

Storage layout (bucket ``cdl-datasets``)::

    <dataset>/dataset.json                              registered spec
    <dataset>/shards/p<partition>-<first>-<last>.npz    immutable shard
    <dataset>/shards/p<partition>-<first>-<last>-m<digest>.npz
                                                        immutable shard merged from smaller ones
    <dataset>/unlabelled/p<partition>-<first>-<last>.npz  records waiting for a label (ingest's)
    <dataset>/unlabelled/p<partition>-<first>-<last>-m<digest>.npz
                                                        the same, merged from smaller ones
    <dataset>/versions/<n>.json                         manifest of version n

Shard format: an uncompressed ``.npz`` (numpy zip, no pickled objects)
with equal-length columns

====== =================== =====================================================
column dtype               meaning
====== =================== =====================================================
id     unicode ``<U``      record id
label  int16 / float32       index into the spec's ``labels`` (-1: none yet); regression: the
                           target's value (NaN: none yet)
split  uint8               0 = train, 1 = holdout (stable hash of the id)
offset int64               Kafka offset in ``data.raw`` (partition in the name)
x      spec dtype          ``[n, *input_shape]`` features (tensor datasets)
text   unicode ``<U``      cleaned text (text datasets)
====== =================== =====================================================
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cdl.errors import ConflictError, InvalidInputError, NotFoundError

if TYPE_CHECKING:  # only annotations: the ML code imports this module without the object store client
    from cdl.store import BlobStore

__all__ = [
    "DATASETS_BUCKET",
    "DatasetSpec",
    "DatasetVersion",
    "Shard",
    "Task",
    "check_dataset_name",
    "decode_shard",
    "encode_shard",
    "holdout_member",
    "iter_shards",
    "latest_version",
    "load_version",
    "manifest_key",
    "newest_shards",
    "offset_ranges",
    "read_manifest",
    "shard_parts",
    "unit_hash",
    "valid_dataset_name",
]

DATASETS_BUCKET = "cdl-datasets"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_TENSOR_DTYPES = ("float32", "float64", "uint8", "int64")
#: what a dataset name may be: ASCII letters, digits, '.', '_' and '-', at most 200 characters
#: (it is part of every object key; ingest answers any other name as unknown without a read)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}")
_NAME_RULE = "1 to 200 ASCII letters, digits, '.', '_' or '-' (not '.' or '..')"


def valid_dataset_name(name: str) -> bool:
    """Whether ``name`` can be a dataset's name (the one rule, at registration and at lookup)."""
    return _NAME.fullmatch(name) is not None and name not in (".", "..")


def check_dataset_name(name: str) -> None:
    """:class:`~cdl.errors.InvalidInputError` unless :func:`valid_dataset_name`."""
    if not valid_dataset_name(name):
        raise InvalidInputError(f"invalid dataset name: it must be {_NAME_RULE}", dataset=name[:200])


class Task(StrEnum):
    TABULAR = "tabular_classification"
    IMAGE = "image_classification"
    TEXT = "text_classification"
    #: a tensor of any shape in, one number out (the spec's one label names it)
    REGRESSION = "regression"

    @property
    def regression(self) -> bool:
        return self is Task.REGRESSION


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its schema, cleaning rules, retrain policy and split."""

    name: str
    task: Task
    labels: tuple[str, ...]
    input_shape: tuple[int, ...] = ()
    dtype: str = "float32"
    min_text_length: int = 0
    lowercase_text: bool = False
    min_new_records: int = 1000
    max_interval_s: float = 0.0
    holdout_fraction: float = 0.2
    #: the dataset's own input limits (0: the ingest service's); they may tighten the
    #: service's limits, never loosen them, and are not part of the schema
    max_record_bytes: int = 0
    max_id_bytes: int = 0
    max_text_chars: int = 0
    #: the model family its models are built with (cdl.ml.family; empty: the task's default);
    #: only a name: the family's code comes from the installed environment, never from here
    family: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not valid_dataset_name(self.name):
            problems.append(f"name must be {_NAME_RULE}")
        if self.task.regression:
            if len(self.labels) != 1 or not self.labels[0]:
                problems.append("a regression dataset has one label: the name of its target")
        elif len(self.labels) < 2 or len(set(self.labels)) != len(self.labels) or any(not lab for lab in self.labels):
            problems.append("labels must be at least two distinct non-empty strings")
        if self.task is Task.TEXT:
            if self.input_shape:
                problems.append("text datasets take no input_shape")
        else:
            if not self.input_shape or any(d <= 0 for d in self.input_shape):
                problems.append("tensor datasets need a positive input_shape")
            if self.dtype not in _TENSOR_DTYPES:
                problems.append(f"dtype must be one of {', '.join(_TENSOR_DTYPES)}")
        if not 0.0 < self.holdout_fraction < 1.0:
            problems.append("holdout_fraction must be between 0 and 1")
        if self.min_new_records <= 0 and self.max_interval_s <= 0:
            problems.append("the retrain policy needs min_new_records > 0 or max_interval_s > 0")
        if self.min_new_records < 0 or self.max_interval_s < 0 or self.min_text_length < 0:
            problems.append("policy and cleaning numbers must not be negative")
        if self.family and not valid_dataset_name(self.family):
            problems.append(f"family must be {_NAME_RULE}")
        if min(self.max_record_bytes, self.max_id_bytes, self.max_text_chars) < 0:
            problems.append("limits must not be negative (0 = the service's)")
        if problems:
            raise InvalidInputError("invalid dataset spec: " + "; ".join(problems), dataset=self.name[:200])

    @cached_property
    def longest_label_bytes(self) -> int:
        """The UTF-8 length of the spec's longest label."""
        return max(len(label.encode()) for label in self.labels)

    @property
    def schema_hash(self) -> str:
        """Hash of what records must look like (task, shape, dtype, labels)."""
        schema: dict[str, Any] = {"task": self.task.value, "labels": list(self.labels)}
        if self.task is not Task.TEXT:
            schema |= {"input_shape": list(self.input_shape), "dtype": self.dtype}
        return hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:16]

    def label_index(self, label: str) -> int:
        return self.labels.index(label)

    @property
    def label_dtype(self) -> type[np.generic]:
        """The shard column's dtype: class indices, or the regression target's values."""
        return np.float32 if self.task.regression else np.int16

    @property
    def unlabelled(self) -> float:
        """The label column's value of a record whose label has not come yet."""
        return math.nan if self.task.regression else -1

    def is_unlabelled(self, value: float) -> bool:
        """Whether a label column's ``value`` is :attr:`unlabelled`."""
        return math.isnan(value) if self.task.regression else value < 0

    def label_value(self, label: str) -> float:
        """A record's label as the label column holds it: the index of one of ``labels``, or a
        regression target's finite value (a decimal string). ValueError with the reason otherwise."""
        if self.task.regression:
            try:
                value = float(label)
            except ValueError:
                raise ValueError(f"label {label[:40]!r} is not a number (the target of a regression)") from None
            if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
                raise ValueError(f"label {label[:40]!r} is not a finite float32 number")
            return value
        if label not in self.labels:
            raise ValueError(f"label {label!r} is not one of the dataset's labels")
        return self.labels.index(label)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["task"] = self.task.value
        doc["labels"] = list(self.labels)
        doc["input_shape"] = list(self.input_shape)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> DatasetSpec:
        """A spec from :meth:`to_json`'s document; fields it does not know are ignored, missing
        ones take their defaults (documents written before a field existed still load)."""
        known = {f.name for f in dataclass_fields(cls)}
        fields = {k: v for k, v in doc.items() if k in known}
        fields["task"] = Task(fields["task"])
        fields["labels"] = tuple(fields["labels"])
        fields["input_shape"] = tuple(int(d) for d in fields.get("input_shape", ()))
        return cls(**fields)


_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_MASK64 = 0xFFFFFFFFFFFFFFFF


def unit_hash(data: bytes) -> float:
    """A stable hash of ``data`` mapped to [0, 1): 64-bit FNV-1a, then the
    MurmurHash3 finaliser (so similar ids spread evenly), top 53 bits."""
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK64
    h ^= h >> 33
    return (h >> 11) / 2**53


def holdout_member(dataset: str, record_id: str, fraction: float) -> bool:
    """Stable split: the same id is in the holdout in every version."""
    return unit_hash(f"{dataset}\x00{record_id}".encode()) < fraction


# --------------------------------------------------------------------------- shards


class _Parts(io.RawIOBase):
    """A seekable sink for :mod:`zipfile` that keeps what it is given instead of copying it.

    Large writes (the columns' data, which a stored zip passes through
    unchanged) are kept by reference; small ones (headers) are copied, so the
    header zipfile rewrites in place once it knows the CRC and sizes can be
    patched. The bytes are ``b"".join(parts)``.
    """

    _BY_REFERENCE = 1 << 16

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytearray | memoryview] = []
        self._starts: list[int] = []
        self._pos = 0
        self._size = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self._pos = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence] + pos
        return self._pos

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        if self._pos == self._size:  # appending
            if n < self._BY_REFERENCE and self.parts and isinstance(self.parts[-1], bytearray):
                self.parts[-1] += view  # small writes share one copied part
            else:
                self._starts.append(self._size)
                self.parts.append(view if n >= self._BY_REFERENCE else bytearray(view))
            self._size += n
        else:  # rewriting what was written: only ever a header, which was copied
            i = bisect.bisect_right(self._starts, self._pos) - 1
            part, at = self.parts[i], self._pos - self._starts[i]
            if not isinstance(part, bytearray) or at + n > len(part):
                raise io.UnsupportedOperation("only copied bytes can be rewritten")
            part[at : at + n] = view
        self._pos += n
        return n


def shard_parts(columns: Mapping[str, npt.NDArray[Any] | Sequence[npt.NDArray[Any]]]) -> list[bytearray | memoryview]:
    """Serialize shard columns (see the module docstring) as ``.npz`` bytes in parts.

    ``b"".join(parts)`` is what ``np.savez`` writes (a stored zip of ``.npy``
    files). A column may be given as chunks of one dtype, joined along the first
    axis. The columns' data is not copied at all: the parts refer to the arrays
    (which must not change until the parts are written out) and the zip's
    headers are the only new bytes. A shard of float32 digits is ~5 MiB;
    ``np.savez`` made three copies of it.
    """
    chunks_of: dict[str, list[npt.NDArray[Any]]] = {
        name: [np.asarray(c) for c in col] if isinstance(col, list | tuple) else [np.asarray(col)]
        for name, col in columns.items()
    }
    for name, chunks in chunks_of.items():
        if len({c.dtype for c in chunks}) > 1 or len({c.shape[1:] for c in chunks}) > 1:
            chunks_of[name] = [np.concatenate(chunks)]  # e.g. id chunks of different widths
    lengths = {name: sum(len(c) for c in chunks) for name, chunks in chunks_of.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"shard columns differ in length: {lengths}")
    sink = _Parts()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, chunks in chunks_of.items():
            first = chunks[0]
            header = {
                "descr": np.lib.format.dtype_to_descr(first.dtype),  # type: ignore[no-untyped-call]
                "fortran_order": False,
                "shape": (lengths[name], *first.shape[1:]),
            }
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)  # type: ignore[no-untyped-call]
                for chunk in chunks:
                    f.write(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data)
    return sink.parts


def encode_shard(columns: Mapping[str, npt.NDArray[Any] | Sequence[npt.NDArray[Any]]]) -> bytes:
    """Serialize shard columns to ``.npz`` bytes (:func:`shard_parts`, joined)."""
    return b"".join(shard_parts(columns))


def decode_shard(data: bytes) -> dict[str, npt.NDArray[Any]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


@dataclass(frozen=True)
class Shard:
    """A shard as a manifest lists it."""

    key: str
    partition: int
    first_offset: int
    last_offset: int
    records: int
    train: int
    holdout: int
    label_histogram: dict[str, int] = field(default_factory=dict)

    @staticmethod
    def key_for(dataset: str, partition: int, first: int, last: int, unlabelled: bool = False) -> str:
        folder = "unlabelled" if unlabelled else "shards"
        return f"{dataset}/{folder}/p{partition:03d}-{first:012d}-{last:012d}.npz"

    @staticmethod
    def merged_key(
        dataset: str, partition: int, first: int, last: int, inputs: Sequence[str], unlabelled: bool = False
    ) -> str:
        """The key of a shard merged from the shards ``inputs`` (in that order).

        Named by what it holds: the same inputs give the same key (and the same
        bytes), other inputs another key, never the key of a shard written by a flush.
        """
        digest = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:16]
        folder = "unlabelled" if unlabelled else "shards"
        return f"{dataset}/{folder}/p{partition:03d}-{first:012d}-{last:012d}-m{digest}.npz"

    def to_json(self) -> dict[str, Any]:
        # written for every shard at every flush: no dataclasses.asdict (deep copies)
        return {
            "key": self.key,
            "partition": self.partition,
            "first_offset": self.first_offset,
            "last_offset": self.last_offset,
            "records": self.records,
            "train": self.train,
            "holdout": self.holdout,
            "label_histogram": dict(self.label_histogram),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Shard:
        return cls(**dict(doc))


# --------------------------------------------------------------------------- versions


@dataclass(frozen=True)
class DatasetVersion:
    """A version loaded for training: features/texts, labels (class indices as int64, or a
    regression's float32 targets) and split.

    ``text`` is an object array of Python strings (each as long as it is), not a
    ``<U`` array, which would pad every text to the version's longest.
    """

    spec: DatasetSpec
    version: int
    manifest: dict[str, Any]
    ids: npt.NDArray[np.str_]
    labels: npt.NDArray[Any]
    split: npt.NDArray[np.uint8]
    x: npt.NDArray[Any] | None
    text: npt.NDArray[np.object_] | None
    shards: list[dict[str, Any]] = field(default_factory=list)
    """The manifest entries read: all of them, or the newest ones of a window."""

    @property
    def windowed(self) -> bool:
        return len(self.shards) < len(self.manifest["shards"])

    def offset_ranges(self) -> list[dict[str, Any]]:
        """Per raw-topic partition, the offsets of the records loaded (the lineage of a model)."""
        return offset_ranges(self.manifest, self.shards)

    def subset(self, holdout: bool) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        mask = self.split == (1 if holdout else 0)
        data = self.x if self.x is not None else self.text
        assert data is not None
        return data[mask], self.labels[mask]


def offset_ranges(manifest: Mapping[str, Any], entries: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per raw-topic partition, the offsets of the records of the manifest's shards ``entries``:
    the manifest's own ranges when they are all of its shards (the lineage of a model)."""
    if len(entries) >= len(manifest["shards"]):
        return list(manifest["offset_ranges"])
    topic = manifest["offset_ranges"][0]["topic"] if manifest["offset_ranges"] else ""
    ranges: dict[int, list[int]] = {}
    for e in entries:
        lo_hi = ranges.setdefault(int(e["partition"]), [int(e["first_offset"]), int(e["last_offset"])])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], int(e["first_offset"])), max(lo_hi[1], int(e["last_offset"]))
    return [{"topic": topic, "partition": p, "first": lo, "last": hi} for p, (lo, hi) in sorted(ranges.items())]


def latest_version(store: BlobStore, dataset: str) -> int | None:
    """The newest version of ``dataset`` in the object store (None: none yet)."""
    found = [
        int(m.group(1))
        for o in store.list(DATASETS_BUCKET, prefix=f"{dataset}/versions/")
        if (m := re.fullmatch(r".*/versions/(\d+)\.json", o.key))
    ]
    return max(found) if found else None


def manifest_key(dataset: str, version: int) -> str:
    """Where version ``version`` of ``dataset``'s manifest lives (bucket ``cdl-datasets``)."""
    return f"{dataset}/versions/{version}.json"


def read_manifest(store: BlobStore, dataset: str, version: int) -> dict[str, Any]:
    doc: dict[str, Any] = store.get_json(DATASETS_BUCKET, manifest_key(dataset, version))
    return doc


def iter_shards(
    store: BlobStore, manifest: Mapping[str, Any], entries: Sequence[Mapping[str, Any]] | None = None
) -> Iterator[dict[str, npt.NDArray[Any]]]:
    for entry in manifest["shards"] if entries is None else entries:
        yield decode_shard(store.get_bytes(DATASETS_BUCKET, entry["key"]))


def newest_shards(manifest: Mapping[str, Any], max_records: int) -> list[dict[str, Any]]:
    """The manifest's newest shards holding at least ``max_records`` records (0: every shard).

    A manifest lists shards in the order they were committed (a merge takes the
    place of the shards it merged), so the newest are at its end; whole shards
    are taken, in manifest order.
    """
    entries: list[dict[str, Any]] = list(manifest["shards"])
    if max_records <= 0:
        return entries
    total = 0
    for i in range(len(entries) - 1, -1, -1):
        total += int(entries[i]["records"])
        if total >= max_records:
            return entries[i:]
    return entries


def load_version(store: BlobStore, dataset: str, version: int, max_records: int = 0) -> DatasetVersion:
    """Read a version's manifest and the shards it lists: every one, or with
    ``max_records`` the newest that hold at least that many records (a training
    window: memory and time stay bounded however long the dataset grows).

    Shards are read one at a time; a text column becomes Python strings as its
    shard is read (see :class:`DatasetVersion`), so a version costs what its
    texts hold, not records x its longest text.
    """
    manifest = read_manifest(store, dataset, version)
    spec = DatasetSpec.from_json(manifest["spec"])
    entries = newest_shards(manifest, max_records)
    columns: dict[str, list[npt.NDArray[Any]]] = {}
    for part in iter_shards(store, manifest, entries):
        for name, col in part.items():
            columns.setdefault(name, []).append(col.astype(object) if name == "text" else col)
    if not columns:
        raise NotFoundError("version has no shards", dataset=dataset, version=version)

    def cat(name: str) -> npt.NDArray[Any]:
        return np.concatenate(columns[name])

    total = sum(len(c) for c in columns["id"])
    expected = manifest["total_records"] if len(entries) == len(manifest["shards"]) else None
    if total != sum(int(e["records"]) for e in entries) or expected not in (None, total):
        raise ConflictError("manifest and shards disagree", dataset=dataset, version=version)
    return DatasetVersion(
        spec=spec,
        version=version,
        manifest=manifest,
        ids=cat("id"),
        labels=cat("label").astype(np.float32 if spec.task.regression else np.int64),
        split=cat("split"),
        x=cat("x") if "x" in columns else None,
        text=cat("text") if "text" in columns else None,
        shards=entries,
    )
