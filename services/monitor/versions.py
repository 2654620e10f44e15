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
import time
from dataclasses import dataclass

from cdl.errors import CdlError, DecodeError, NotFoundError
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


#: versions kept (the oldest go first); a read that failed is tried again after RETRY_S
MAX_VERSIONS = 256
RETRY_S = 30.0


class VersionCatalog:
    """Version facts by (model, version), loaded on first use and kept (the newest MAX_VERSIONS).

    A version the registry does not know is remembered as such; a read that failed for
    another reason (the object store away) is remembered for ``RETRY_S`` only, then tried again.
    """

    def __init__(self, registry: ModelRegistry, *, window: int, alpha: float, draws: int, seed: int = 0) -> None:
        self._registry = registry
        self._window, self._alpha, self._draws, self._seed = window, alpha, draws, seed
        self._known: dict[tuple[str, int], tuple[VersionInfo, float]] = {}
        self._lock = threading.Lock()

    def cached(self, model: str, version: int) -> VersionInfo | None:
        with self._lock:
            found = self._known.get((model, version))
        if found is None or (found[1] and time.monotonic() > found[1]):
            return None
        return found[0]

    def load(self, model: str, version: int) -> VersionInfo:
        """The version's facts (blocking: object-store reads and a calibration the first time)."""
        known = self.cached(model, version)
        if known is not None:
            return known
        info, transient = self._read(model, version)
        with self._lock:
            self._known[(model, version)] = (info, time.monotonic() + RETRY_S if transient else 0.0)
            while len(self._known) > MAX_VERSIONS:
                self._known.pop(next(iter(self._known)))
        return info

    def _read(self, model: str, version: int) -> tuple[VersionInfo, bool]:
        """The facts, and whether they are incomplete for a reason that may pass."""
        try:
            lineage = self._registry.document(model, version, "lineage")
        except NotFoundError as exc:
            log.warning(
                "model version unknown to the registry: watched without drift",
                model=model,
                version=version,
                error=str(exc),
            )
            return VersionInfo(model, version), False
        except CdlError as exc:
            log.warning("model version unreadable for now", model=model, version=version, error=str(exc))
            return VersionInfo(model, version), True
        dataset = str(lineage.get("dataset", ""))
        labels = tuple(str(x) for x in lineage.get("labels", []))
        task = str(lineage.get("task", ""))
        test: MMDTest | None = None
        transient = False
        try:
            data = self._registry.reference(model, version)
            if data is not None:
                test = MMDTest.calibrate(
                    from_npy(data), window=self._window, alpha=self._alpha, draws=self._draws, seed=self._seed
                )
        except (NotFoundError, DecodeError) as exc:
            log.warning("no drift test for this version", model=model, version=version, error=str(exc))
        except CdlError as exc:
            transient = True
            log.warning("reference unreadable for now", model=model, version=version, error=str(exc))
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
        return VersionInfo(model, version, dataset, labels, task, test), transient
