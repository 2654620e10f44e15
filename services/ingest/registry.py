"""The dataset registry: specs stored in the object store, cached in memory.

Names that are not registered are remembered as unknown for a while (a
negative cache with a TTL), so that a flood of records for unknown datasets
costs no object-store read per record; :meth:`DatasetRegistry.register`
forgets them at once.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import Any

from cdl.datasets import DATASETS_BUCKET, DatasetSpec, check_dataset_name, valid_dataset_name
from cdl.errors import ConflictError, InvalidInputError, NotFoundError
from cdl.ml.family import family_names
from cdl.store import BlobStore

__all__ = ["DatasetRegistry"]

_VERSION_KEY = re.compile(r"/versions/(\d+)\.json$")


class DatasetRegistry:
    """Register and look up datasets. Registrations live in MinIO, so they survive restarts."""

    def __init__(
        self,
        store: BlobStore,
        unknown_ttl_s: float = 30.0,
        max_unknown: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        max_label_bytes: int = 256,
    ) -> None:
        self._store = store
        #: the longest label (UTF-8 bytes) a registration may have: ingest's label limit
        self._max_label_bytes = max_label_bytes
        self._cache: dict[str, DatasetSpec] = {}
        self._lock = threading.Lock()
        #: names found unregistered: name -> when (``clock``); at most ``max_unknown``, oldest first
        self._unknown: dict[str, float] = {}
        self._unknown_ttl_s = unknown_ttl_s
        self._max_unknown = max_unknown
        self._clock = clock
        #: bumped by every registration: a lookup that began before one does not cache its miss
        self._generation = 0

    def register(self, spec: DatasetSpec) -> tuple[DatasetSpec, bool]:
        """Store ``spec``. Returns ``(spec, created)``.

        Re-registering the same schema may change cleaning, policy and split
        settings; a different schema (task, shape, dtype, labels) is a conflict.
        A name that is not :func:`~cdl.datasets.valid_dataset_name` (DatasetSpec
        refuses it already) or a label over ``max_label_bytes`` (which every record
        would be dead-lettered for) is invalid input.
        """
        check_dataset_name(spec.name)
        if spec.family and spec.family not in family_names():
            installed = ", ".join(family_names()) or "none"
            raise InvalidInputError(
                f"invalid dataset spec: unknown model family {spec.family!r}; installed: {installed}",
                dataset=spec.name,
            )
        if spec.longest_label_bytes > self._max_label_bytes:
            raise InvalidInputError(
                f"invalid dataset spec: a label is {spec.longest_label_bytes} bytes, "
                f"ingest takes labels of at most {self._max_label_bytes} (UTF-8)",
                dataset=spec.name,
            )
        with self._lock:
            try:
                existing = self._load(spec.name)
            except NotFoundError:
                existing = None
            if existing is not None and existing.schema_hash != spec.schema_hash:
                raise ConflictError(
                    "dataset already registered with another schema",
                    dataset=spec.name,
                    registered=existing.schema_hash,
                    requested=spec.schema_hash,
                )
            if existing != spec:
                self._store.put_json(DATASETS_BUCKET, f"{spec.name}/dataset.json", spec.to_json())
            self._cache[spec.name] = spec
            self._unknown.pop(spec.name, None)
            self._generation += 1
            return spec, existing is None

    def get(self, name: str, refresh: bool = False) -> DatasetSpec:
        with self._lock:
            if not refresh and name in self._cache:
                return self._cache[name]
            spec = self._load(name)
            self._cache[name] = spec
            return spec

    def lookup(self, name: str) -> DatasetSpec | None:
        """The spec, or None if ``name`` is not registered.

        A name not seen yet is looked up in the store (outside the lock); one
        found missing is answered from memory for ``unknown_ttl_s``.
        """
        with self._lock:
            spec = self._cache.get(name)
            if spec is not None:
                return spec
            if not valid_dataset_name(name):  # never registered: no read
                return None
            since = self._unknown.get(name)
            if since is not None and self._clock() - since < self._unknown_ttl_s:
                return None
            generation = self._generation
        try:
            spec = self._load(name)
        except NotFoundError:
            with self._lock:
                if generation == self._generation:  # no registration raced this read
                    self._remember_unknown(name)
                return self._cache.get(name)
        with self._lock:
            self._unknown.pop(name, None)
            return self._cache.setdefault(name, spec)

    def _remember_unknown(self, name: str) -> None:
        """Note ``name`` as unknown now (the lock is held); the oldest notes go first when full."""
        now = self._clock()
        self._unknown.pop(name, None)
        if len(self._unknown) >= self._max_unknown:
            for old in [n for n, t in self._unknown.items() if now - t >= self._unknown_ttl_s]:
                del self._unknown[old]
            while len(self._unknown) >= self._max_unknown:
                del self._unknown[next(iter(self._unknown))]
        self._unknown[name] = now

    def _load(self, name: str) -> DatasetSpec:
        if not valid_dataset_name(name):
            raise NotFoundError("dataset not registered", dataset=name[:200])
        doc: dict[str, Any] = self._store.get_json(DATASETS_BUCKET, f"{name}/dataset.json")
        return DatasetSpec.from_json(doc)

    def names(self) -> list[str]:
        """Every registered dataset's name, sorted."""
        return [
            n for n in self._store.folders(DATASETS_BUCKET) if self._store.exists(DATASETS_BUCKET, f"{n}/dataset.json")
        ]

    def latest_version(self, name: str) -> int:
        versions = [
            int(m.group(1))
            for obj in self._store.list(DATASETS_BUCKET, prefix=f"{name}/versions/")
            if (m := _VERSION_KEY.search(obj.key))
        ]
        return max(versions, default=0)
