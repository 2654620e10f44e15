"""What the monitor needs to know of a model version (read from the registry; no Kafka, no Faust).

From ``lineage.json``: the dataset it was trained on (where labelled served
requests go, which dataset a drift alert names) and its label names (what a
predicted index means). From ``reference.npy``: its drift test, calibrated once
per version (:meth:`cdl.ml.drift.MMDTest.calibrate`, about a second for 1,000
reference rows). Versions saved without a reference (older ones) are watched
for everything but drift.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from cdl.errors import CdlError
from cdl.logging import get_logger
from cdl.ml.drift import MMDTest, from_npy
from cdl.registry import ModelRegistry

__all__ = ["VersionCatalog", "VersionInfo"]

log = get_logger(__name__)


@dataclass(frozen=True)
class VersionInfo:
    model: str
    version: int
    dataset: str = ""
    labels: tuple[str, ...] = ()
    task: str = ""
    test: MMDTest | None = None


class VersionCatalog:
    """Version facts by (model, version), loaded on first use and kept (a few per model)."""

    def __init__(self, registry: ModelRegistry, *, window: int, alpha: float, draws: int, seed: int = 0) -> None:
        self._registry = registry
        self._window, self._alpha, self._draws, self._seed = window, alpha, draws, seed
        self._known: dict[tuple[str, int], VersionInfo] = {}
        self._lock = threading.Lock()

    def cached(self, model: str, version: int) -> VersionInfo | None:
        with self._lock:
            return self._known.get((model, version))

    def load(self, model: str, version: int) -> VersionInfo:
        """The version's facts (blocking: object-store reads and a calibration the first time)."""
        known = self.cached(model, version)
        if known is not None:
            return known
        info = self._read(model, version)
        with self._lock:
            self._known[(model, version)] = info
        return info

    def _read(self, model: str, version: int) -> VersionInfo:
        try:
            lineage = self._registry.document(model, version, "lineage")
        except CdlError as exc:
            log.warning(
                "model version unknown to the registry: watched without drift",
                model=model,
                version=version,
                error=str(exc),
            )
            return VersionInfo(model, version)
        dataset = str(lineage.get("dataset", ""))
        labels = tuple(str(x) for x in lineage.get("labels", []))
        task = str(lineage.get("task", ""))
        test: MMDTest | None = None
        try:
            data = self._registry.reference(model, version)
            if data is not None:
                test = MMDTest.calibrate(
                    from_npy(data), window=self._window, alpha=self._alpha, draws=self._draws, seed=self._seed
                )
        except CdlError as exc:
            log.warning("no drift test for this version", model=model, version=version, error=str(exc))
        if test is not None:
            log.info(
                "drift test calibrated",
                model=model,
                version=version,
                threshold=test.threshold,
                reference_rows=len(test.reference),
                window=test.window,
                alpha=test.alpha,
            )
        return VersionInfo(model, version, dataset, labels, task, test)
