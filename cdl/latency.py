"""Latency histograms: fixed log-spaced buckets, O(1) memory, quantiles within ~4%.

Shared by the gateway's rollout windows and the monitor's health windows (which keep
theirs in a Faust table, hence the sparse JSON form).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping

__all__ = ["EDGES", "LatencyHistogram"]

#: bucket edges in seconds: 10 µs to ~100 s, each 8% wider than the last
_GROWTH = 1.08
EDGES: tuple[float, ...] = tuple(1e-5 * _GROWTH**i for i in range(int(math.log(1e7) / math.log(_GROWTH)) + 2))


class LatencyHistogram:
    """Counts of latencies per bucket (one bisect per sample)."""

    __slots__ = ("buckets", "count")

    def __init__(self) -> None:
        self.buckets = [0] * (len(EDGES) + 1)
        self.count = 0

    def add(self, latency_s: float, n: int = 1) -> None:
        self.buckets[bisect_right(EDGES, latency_s)] += n
        self.count += n

    def merge(self, other: LatencyHistogram) -> None:
        for i, c in enumerate(other.buckets):
            if c:
                self.buckets[i] += c
        self.count += other.count

    def quantile(self, q: float) -> float | None:
        """Quantile ``q`` in seconds (the bucket's geometric middle); None when empty."""
        if not self.count:
            return None
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for i, count in enumerate(self.buckets):
            seen += count
            if seen >= rank:
                if i == 0:
                    return EDGES[0]
                if i == len(EDGES):
                    return EDGES[-1]
                return math.sqrt(EDGES[i - 1] * EDGES[i])
        return EDGES[-1]  # pragma: no cover - seen reaches count

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LatencyHistogram) and self.buckets == other.buckets

    __hash__ = None  # type: ignore[assignment]

    def to_json(self) -> dict[str, int]:
        """The non-empty buckets, ``{"<index>": count}``."""
        return {str(i): c for i, c in enumerate(self.buckets) if c}

    @classmethod
    def from_json(cls, doc: Mapping[str, int]) -> LatencyHistogram:
        h = cls()
        for i, c in doc.items():
            h.buckets[int(i)] = int(c)
            h.count += int(c)
        return h
