"""Durable rollout state in the object store, so a restarted gateway resumes.

Objects (bucket ``cdl-models``, see DESIGN.md's storage layout):

* ``<model>/rollout.json`` — the rollout manager's document for the model
  (:meth:`services.gateway.rollout.RolloutManager.to_json`);
* ``<model>/serving.json`` — ``{"version": n}``, the version the gateway
  serves; the trainer warm-starts from it (the same object and shape as
  ``cdl.registry.ModelRegistry.set_serving`` writes).

``cdl.registry`` imports torch and the gateway process imports none, so this
module reads and writes the objects with :mod:`cdl.store` directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from cdl.errors import NotFoundError
from cdl.logging import get_logger
from cdl.store import BlobStore

__all__ = ["MODELS_BUCKET", "ROLLOUT_OBJECT", "SERVING_OBJECT", "RolloutStore"]

log = get_logger(__name__)

MODELS_BUCKET = "cdl-models"
"""Same bucket as ``cdl.registry.MODELS_BUCKET`` (a unit test keeps them equal)."""
ROLLOUT_OBJECT = "rollout.json"
SERVING_OBJECT = "serving.json"


class RolloutStore:
    """``rollout.json`` and ``serving.json`` of every model."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store

    def save(self, model: str, doc: Mapping[str, Any]) -> None:
        """Write ``model``'s rollout document (the manager's ``persist`` callback)."""
        self._store.put_json(MODELS_BUCKET, f"{model}/{ROLLOUT_OBJECT}", dict(doc))

    def load(self, model: str) -> dict[str, Any] | None:
        """``model``'s rollout document, or None when there is none."""
        try:
            doc = self._store.get_json(MODELS_BUCKET, f"{model}/{ROLLOUT_OBJECT}")
        except NotFoundError:
            return None
        return doc if isinstance(doc, dict) else None

    def load_all(self, which: Callable[[str], bool] | None = None) -> dict[str, dict[str, Any]]:
        """Every model's rollout document (``which``: of the models it accepts), by model name;
        unreadable ones are logged and left out."""
        docs: dict[str, dict[str, Any]] = {}
        try:
            objects = list(self._store.list(MODELS_BUCKET))
        except NotFoundError:
            return docs
        for obj in objects:
            model, _, name = obj.key.partition("/")
            if name != ROLLOUT_OBJECT or not model or (which is not None and not which(model)):
                continue
            try:
                doc = self._store.get_json(MODELS_BUCKET, obj.key)
            except NotFoundError:
                continue
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                log.error("rollout state unreadable", uri=obj.uri, error=str(exc))
                continue
            if isinstance(doc, dict):
                docs[model] = doc
            else:
                log.error("rollout state is not a JSON object", uri=obj.uri)
        return docs

    def set_serving(self, model: str, version: int) -> None:
        """Record the version the gateway serves (read by the trainer)."""
        self._store.put_json(MODELS_BUCKET, f"{model}/{SERVING_OBJECT}", {"version": version})

    def serving(self, model: str) -> int | None:
        try:
            return int(self._store.get_json(MODELS_BUCKET, f"{model}/{SERVING_OBJECT}")["version"])
        except NotFoundError:
            return None
