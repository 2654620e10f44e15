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


#: the key of a rollout document that names the gateway group that wrote it
GROUP_KEY = "gateway_group"


class RolloutStore:
    """``rollout.json`` and ``serving.json`` of every model.

    With ``group`` (the gateway's consumer group), a document is written with the group's name
    and only documents of that group (or of none: written before documents named theirs) are
    read: two gateway deployments sharing an object store (or the tests' gateways, which share
    one and the Triton servers) never resume or follow, and so never load on Triton, each
    other's rollouts. The name is not part of what the manager is handed.
    """

    def __init__(self, store: BlobStore, group: str = "") -> None:
        self._store = store
        self._group = group

    def save(self, model: str, doc: Mapping[str, Any]) -> None:
        """Write ``model``'s rollout document (the manager's ``persist`` callback)."""
        out = dict(doc)
        if self._group:
            out[GROUP_KEY] = self._group
        self._store.put_json(MODELS_BUCKET, f"{model}/{ROLLOUT_OBJECT}", out)

    def _ours(self, doc: Any) -> dict[str, Any] | None:
        """``doc`` without the group's name when it is a document of this group, else None."""
        if not isinstance(doc, dict):
            return None
        group = doc.pop(GROUP_KEY, None)
        if self._group and group is not None and group != self._group:
            return None
        return doc

    def load(self, model: str) -> dict[str, Any] | None:
        """``model``'s rollout document, or None when there is none (or another group's)."""
        try:
            doc = self._store.get_json(MODELS_BUCKET, f"{model}/{ROLLOUT_OBJECT}")
        except NotFoundError:
            return None
        return self._ours(doc)

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
            if not isinstance(doc, dict):
                log.error("rollout state is not a JSON object", uri=obj.uri)
            elif (ours := self._ours(doc)) is not None:
                docs[model] = ours
        return docs

    def set_serving(self, model: str, version: int) -> None:
        """Record the version the gateway serves (read by the trainer)."""
        self._store.put_json(MODELS_BUCKET, f"{model}/{SERVING_OBJECT}", {"version": version})

    def serving(self, model: str) -> int | None:
        try:
            return int(self._store.get_json(MODELS_BUCKET, f"{model}/{SERVING_OBJECT}")["version"])
        except NotFoundError:
            return None
