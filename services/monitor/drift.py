"""Drift of one serving version's inputs: windows tested against its reference (no Kafka, no Faust).

Served inputs (feature rows, :func:`cdl.ml.drift.featurize`) fill windows of
``test.window`` distinct rows: a row equal to one already in the window is
skipped. Repeats carry no news about the input distribution (a popular input, a
client retrying), but they raise the statistic: on digits, windows drawn with
repeats from unseen images were over a 1% threshold 5% of the time, distinct ones
0.6% (docs/monitor.md). The calibration's null windows are distinct rows too.
Each full window is tested
(:meth:`cdl.ml.drift.MMDTest.statistic`). ``persist`` windows in a row over
the threshold raise one alert for the version; a window under it resets the
streak. A version alerts at most once: its successor, trained on the data that
came since, has its own reference. The streak and that flag are the tracker's
state (a Faust table keeps them); the partial window is not (a restart starts it
again, which only delays a test by less than a window).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cdl.ml.drift import MMDTest, Rows

__all__ = ["DriftTracker", "WindowTest"]


@dataclass(frozen=True, slots=True)
class WindowTest:
    statistic: float
    threshold: float
    over: bool
    alert: bool
    """This window completes ``persist`` in a row: publish drift.detected."""
    windows: int
    """Windows tested for the version so far (this one included)."""


class DriftTracker:
    def __init__(self, test: MMDTest, persist: int, state: Mapping[str, Any] | None = None) -> None:
        self.test = test
        self.persist = max(1, persist)
        self._rows: list[Rows] = []
        self._seen: set[bytes] = set()
        self.repeats = 0
        st = state or {}
        self.streak = int(st.get("streak", 0))
        self.alerted = bool(st.get("alerted", False))
        self.windows = int(st.get("windows", 0))

    def state(self) -> dict[str, Any]:
        return {"streak": self.streak, "alerted": self.alerted, "windows": self.windows}

    def add(self, rows: Rows) -> list[WindowTest]:
        """Take served rows; the tests of the windows they complete (usually none or one)."""
        if rows.ndim != 2 or rows.shape[1] != self.test.features or not len(rows):
            return []
        out: list[WindowTest] = []
        for row in rows:
            key = row.tobytes()
            if key in self._seen:
                self.repeats += 1
                continue
            self._seen.add(key)
            self._rows.append(row)
            if len(self._rows) >= self.test.window:
                window = np.stack(self._rows)
                self._rows, self._seen = [], set()
                out.append(self._test(window))
        return out

    def _test(self, window: Rows) -> WindowTest:
        stat = self.test.statistic(window)
        over = stat > self.test.threshold
        self.streak = self.streak + 1 if over else 0
        self.windows += 1
        alert = over and self.streak >= self.persist and not self.alerted
        if alert:
            self.alerted = True
        return WindowTest(stat, self.test.threshold, over, alert, self.windows)
