"""The model registry in the object store (bucket ``cdl-models``).

Layout::

    <model>/<version>/claim.json            dataset version this model version is for
    <model>/<version>/model.safetensors     weights
    <model>/<version>/model.json            ModelConfig (family, shapes, hyperparameters)
    <model>/<version>/preprocessing.json    fitted preprocessing (transformation registry)
    <model>/<version>/metrics.json          per-epoch metrics, holdout scores
    <model>/<version>/lineage.json          dataset version + offsets, parent, hyperparameters, code, device
    <model>/<version>/reference.npy         a sample of the training inputs' feature rows (cdl.ml.drift)
    <model>/<version>/result.json           written last: the verdict (the version is complete)
    <model>/claims/d<dataset version>.json  index: dataset version -> model version
    <model>/champion.json                   newest accepted version
    <model>/serving.json                    version the gateway serves (set by the gateway)
    <model>/hyperparameters.json            newest tuned hyperparameters and their source
    <model>/start/model.safetensors         a user's starting point (``cdl checkpoint upload``)
    <model>/start/start.json                its SHA-256, the layers kept frozen, when and from what
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdl.errors import NotFoundError
from cdl.ml.preprocess import Preprocessor
from cdl.store import BlobStore

if TYPE_CHECKING:
    import torch

    from cdl.ml.models import ModelConfig

# torch is imported where weights are read or written: the monitor reads lineage and
# reference samples from the registry, and its image carries no torch (deploy/)

__all__ = ["MODELS_BUCKET", "LoadedModel", "ModelRegistry", "score_of"]

MODELS_BUCKET = "cdl-models"
_VERSION_DIR = re.compile(r"^[^/]+/(\d+)/claim\.json$")


def score_of(result: Mapping[str, Any], who: str) -> float | None:
    """The ``challenger``'s or ``champion``'s holdout score (accuracy, or R²) in a version's
    ``result.json``; versions trained before scores had that name kept ``<who>_accuracy``."""
    value = result.get(f"{who}_score", result.get(f"{who}_accuracy"))
    return None if value is None else float(value)


@dataclass
class LoadedModel:
    version: int
    config: ModelConfig
    preprocessor: Preprocessor
    module: torch.nn.Module


class ModelRegistry:
    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ versions
    def versions(self, model: str) -> list[int]:
        found = []
        for obj in self._store.list(MODELS_BUCKET, prefix=f"{model}/"):
            m = _VERSION_DIR.match(obj.key)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def claim(self, model: str, dataset: str, dataset_version: int, cause: str = "") -> tuple[int, bool]:
        """The model version for ``dataset_version`` (and ``cause``, when a version is trained for
        another reason than new data: a finished study): the one claimed before, or the next one.

        Returns ``(version, new)``. A redelivered event gets the same version, so
        versions are monotonic and never duplicated.

        A version claimed for new data and abandoned before its result (the trainer killed
        while it trained, its dataset version then superseded by a newer one in the backlog it
        coalesced; or killed between this method's two writes) passes its number to the next
        claim of that dataset: version numbers have no gaps. Its ``claim.json`` then names the
        dataset version it is for and the one it ``superseded``.
        """
        with self._lock:
            index = self._claim_index(model, dataset_version, cause)
            if self._store.exists(MODELS_BUCKET, index):
                found: dict[str, Any] = self._store.get_json(MODELS_BUCKET, index)
                version = int(found["version"])
                claim = f"{model}/{version}/claim.json"
                if not self._store.exists(MODELS_BUCKET, claim):  # a crash between the two writes
                    self._store.put_json(MODELS_BUCKET, claim, found)
                return version, False
            versions = self.versions(model)
            doc: dict[str, Any] = {"dataset": dataset, "dataset_version": dataset_version}
            abandoned = None if cause else self._abandoned(model, versions, dataset, dataset_version)
            if abandoned is not None:
                version, old = abandoned
                doc["superseded"] = int(old["dataset_version"])
            else:
                version = max(versions, default=0) + 1
            doc = {"model": model, "version": version, **doc}
            if cause:
                doc["cause"] = cause
            # the index first: a crash after it leaves the claim found again by a redelivery
            self._store.put_json(MODELS_BUCKET, index, doc)
            self._store.put_json(MODELS_BUCKET, f"{model}/{version}/claim.json", doc)
            if abandoned is not None and int(abandoned[1]["dataset_version"]) != dataset_version:
                self._store.delete(MODELS_BUCKET, self._claim_index(model, int(abandoned[1]["dataset_version"]), ""))
            return version, True

    @staticmethod
    def _claim_index(model: str, dataset_version: int, cause: str) -> str:
        suffix = f"-{cause}" if cause else ""
        return f"{model}/claims/d{dataset_version:09d}{suffix}.json"

    def _abandoned(
        self, model: str, versions: list[int], dataset: str, dataset_version: int
    ) -> tuple[int, dict[str, Any]] | None:
        """The oldest of the newest versions without a result that was claimed for new data of
        ``dataset`` up to ``dataset_version``: a claim nobody will finish (see :meth:`claim`)."""
        found = None
        for version in reversed(versions):
            if self.result(model, version) is not None:
                break
            doc: dict[str, Any] = self._store.get_json(MODELS_BUCKET, f"{model}/{version}/claim.json")
            mine = not doc.get("cause") and doc.get("dataset") == dataset
            if mine and int(doc["dataset_version"]) <= dataset_version:
                found = (version, doc)
        return found

    # ------------------------------------------------------------------ artifacts
    def save(
        self,
        model: str,
        version: int,
        *,
        state: dict[str, torch.Tensor],
        config: ModelConfig,
        preprocessor: Preprocessor,
        metrics: dict[str, Any],
        lineage: dict[str, Any],
        result: dict[str, Any],
        reference: bytes | None = None,
    ) -> str:
        import safetensors.torch

        prefix = f"{model}/{version}"
        weights = safetensors.torch.save({k: v.contiguous() for k, v in state.items()})
        uri = self._store.put_bytes(MODELS_BUCKET, f"{prefix}/model.safetensors", weights)
        self._store.put_json(MODELS_BUCKET, f"{prefix}/model.json", config.to_json())
        self._store.put_json(MODELS_BUCKET, f"{prefix}/preprocessing.json", preprocessor.to_json())
        self._store.put_json(MODELS_BUCKET, f"{prefix}/metrics.json", metrics)
        self._store.put_json(MODELS_BUCKET, f"{prefix}/lineage.json", lineage)
        if reference is not None:
            self._store.put_bytes(MODELS_BUCKET, f"{prefix}/reference.npy", reference)
        self._store.put_json(MODELS_BUCKET, f"{prefix}/result.json", {**result, "checkpoint_uri": uri})
        return uri

    def result(self, model: str, version: int) -> dict[str, Any] | None:
        key = f"{model}/{version}/result.json"
        if not self._store.exists(MODELS_BUCKET, key):
            return None
        doc: dict[str, Any] = self._store.get_json(MODELS_BUCKET, key)
        return doc

    def document(self, model: str, version: int, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = self._store.get_json(MODELS_BUCKET, f"{model}/{version}/{name}.json")
        return doc

    def reference(self, model: str, version: int) -> bytes | None:
        """The version's reference sample (``.npy`` bytes), None for a version saved without one."""
        key = f"{model}/{version}/reference.npy"
        if not self._store.exists(MODELS_BUCKET, key):
            return None
        return self._store.get_bytes(MODELS_BUCKET, key)

    def config(self, model: str, version: int) -> ModelConfig:
        from cdl.ml.models import ModelConfig

        return ModelConfig.from_json(self.document(model, version, "model"))

    def load(self, model: str, version: int) -> LoadedModel:
        config = self.config(model, version)
        import safetensors.torch

        from cdl.ml.models import build_model

        pre = Preprocessor.from_json(self.document(model, version, "preprocessing"))
        module = build_model(config)
        state = safetensors.torch.load(self._store.get_bytes(MODELS_BUCKET, f"{model}/{version}/model.safetensors"))
        module.load_state_dict(state)
        module.eval()
        return LoadedModel(version, config, pre, module)

    # ------------------------------------------------------------------ pointers
    def _pointer(self, model: str, name: str) -> int | None:
        try:
            return int(self._store.get_json(MODELS_BUCKET, f"{model}/{name}.json")["version"])
        except NotFoundError:
            return None

    def champion(self, model: str) -> int | None:
        return self._pointer(model, "champion")

    def serving(self, model: str) -> int | None:
        return self._pointer(model, "serving")

    def set_champion(self, model: str, version: int) -> None:
        current = self.champion(model)
        if current is None or version > current:
            self._store.put_json(MODELS_BUCKET, f"{model}/champion.json", {"version": version})

    def set_serving(self, model: str, version: int) -> None:
        self._store.put_json(MODELS_BUCKET, f"{model}/serving.json", {"version": version})

    def hyperparameters(self, model: str) -> tuple[dict[str, Any], str] | None:
        try:
            doc = self._store.get_json(MODELS_BUCKET, f"{model}/hyperparameters.json")
        except NotFoundError:
            return None
        return dict(doc["params"]), str(doc["source"])

    def set_hyperparameters(self, model: str, params: dict[str, Any], source: str) -> None:
        self._store.put_json(MODELS_BUCKET, f"{model}/hyperparameters.json", {"params": params, "source": source})

    # ------------------------------------------------------------------ a user's starting point
    def set_start(self, model: str, weights: bytes, freeze: list[str], source: str) -> dict[str, Any]:
        """Store a starting point for ``model``: ``weights`` (safetensors bytes of a ``state_dict``)
        that its first version fine-tunes from, and the parameter-name patterns (``fnmatch``) kept
        frozen in every version's training. Returns its description (``start.json``)."""
        import hashlib
        import time

        import safetensors.torch

        safetensors.torch.load(weights)  # refuse what is not a safetensors state dict before storing it
        doc = {
            "sha256": hashlib.sha256(weights).hexdigest(),
            "freeze": list(freeze),
            "source": source,
            "uploaded_at": time.time(),
        }
        self._store.put_bytes(MODELS_BUCKET, f"{model}/start/model.safetensors", weights)
        self._store.put_json(MODELS_BUCKET, f"{model}/start/start.json", doc)
        return doc

    def start(self, model: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """The starting point of ``model`` (its state dict and ``start.json``), None when there is none."""
        try:
            doc = dict(self._store.get_json(MODELS_BUCKET, f"{model}/start/start.json"))
        except NotFoundError:
            return None
        import safetensors.torch

        return safetensors.torch.load(self._store.get_bytes(MODELS_BUCKET, f"{model}/start/model.safetensors")), doc
