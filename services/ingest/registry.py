"""The dataset registry: specs stored in the object store, cached in memory."""

from __future__ import annotations

import re
import threading
from typing import Any

from cdl.datasets import DATASETS_BUCKET, DatasetSpec
from cdl.errors import ConflictError, NotFoundError
from cdl.store import ObjectStore

__all__ = ["DatasetRegistry"]

_VERSION_KEY = re.compile(r"/versions/(\d+)\.json$")


class DatasetRegistry:
    """Register and look up datasets. Registrations live in MinIO, so they survive restarts."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._cache: dict[str, DatasetSpec] = {}
        self._lock = threading.Lock()

    def register(self, spec: DatasetSpec) -> tuple[DatasetSpec, bool]:
        """Store ``spec``. Returns ``(spec, created)``.

        Re-registering the same schema may change cleaning, policy and split
        settings; a different schema (task, shape, dtype, labels) is a conflict.
        """
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
            return spec, existing is None

    def get(self, name: str, refresh: bool = False) -> DatasetSpec:
        with self._lock:
            if not refresh and name in self._cache:
                return self._cache[name]
            spec = self._load(name)
            self._cache[name] = spec
            return spec

    def lookup(self, name: str) -> DatasetSpec | None:
        """The spec, re-reading the store once for names not seen yet; None if unknown."""
        try:
            return self.get(name)
        except NotFoundError:
            return None

    def _load(self, name: str) -> DatasetSpec:
        if not name or "/" in name:
            raise NotFoundError("dataset not registered", dataset=name)
        doc: dict[str, Any] = self._store.get_json(DATASETS_BUCKET, f"{name}/dataset.json")
        return DatasetSpec.from_json(doc)

    def latest_version(self, name: str) -> int:
        versions = [
            int(m.group(1))
            for obj in self._store.list(DATASETS_BUCKET, prefix=f"{name}/versions/")
            if (m := _VERSION_KEY.search(obj.key))
        ]
        return max(versions, default=0)
