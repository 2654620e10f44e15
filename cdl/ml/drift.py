"""Input drift: a model version's reference sample and a calibrated two-sample test.

The trainer stores with each model version a bounded, seeded sample of its
training inputs (:func:`reference_sample`, ``<model>/<version>/reference.npy``).
The monitor tests windows of the inputs that version served against it with a
kernel two-sample test: the (biased) squared maximum mean discrepancy with a
Gaussian kernel whose width is the median heuristic on the reference,

    MMD^2 = mean k(W, W) + mean k(R, R) - 2 mean k(W, R).

Calibration (:meth:`MMDTest.calibrate`): the stored rows are split in two at
random; one half is the reference ``R`` the windows are compared with, the
other a pool from the same (training) distribution. The statistic of
``draws`` windows drawn from the pool is its null distribution; the threshold
is its ``1 - alpha`` quantile, so a window of inputs from the training
distribution is over it with probability ~``alpha``. The monitor raises an
alert only after ``persist`` windows in a row are over it (docs/monitor.md:
false-alarm rate ~``alpha ** persist`` per window).

Inputs become feature rows with :func:`featurize`: numeric tensors flattened;
texts as log-scaled counts of their hashed lower-case tokens
(``TEXT_BUCKETS`` buckets). numpy only: no Kafka, no Faust, no torch.
"""

from __future__ import annotations

import io
import re
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cdl.errors import DecodeError

__all__ = ["TEXT_BUCKETS", "MMDTest", "featurize", "from_npy", "reference_sample", "to_npy"]

#: hashed token buckets of a text's feature row
TEXT_BUCKETS = 256
_TOKEN = re.compile(r"[a-z0-9_]+")

Rows = npt.NDArray[np.float32]


def _text_row(out: Rows, i: int, text: object) -> None:
    s = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    for tok in _TOKEN.findall(s.lower()):
        out[i, zlib.crc32(tok.encode()) % TEXT_BUCKETS] += 1.0


def featurize(x: npt.NDArray[np.generic] | list[str] | list[bytes]) -> Rows:
    """Feature rows of inputs: a numeric array ``(n, ...)`` flattened to ``(n, d)`` float32;
    texts (str/bytes, a list or an object array) as ``(n, TEXT_BUCKETS)`` hashed token counts."""
    arr = np.asarray(x, dtype=object) if isinstance(x, list) else x
    if arr.dtype == object or arr.dtype.kind in "USa":
        out = np.zeros((len(arr), TEXT_BUCKETS), np.float32)
        for i, t in enumerate(arr.reshape(len(arr), -1)[:, 0] if arr.ndim > 1 else arr):
            _text_row(out, i, t)
        return np.log1p(out)
    return np.asarray(arr, np.float32).reshape(len(arr), -1)


def reference_sample(x: npt.NDArray[np.generic], rows: int, seed: int = 0) -> Rows:
    """At most ``rows`` feature rows of ``x``, drawn without replacement (seeded)."""
    n = len(x)
    take = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    return featurize(x[take])


def to_npy(rows: Rows) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows, np.float32), allow_pickle=False)
    return buf.getvalue()


def from_npy(data: bytes) -> Rows:
    try:
        rows = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise DecodeError("reference sample is not a .npy array", error=str(exc)) from exc
    if rows.ndim != 2:
        raise DecodeError("reference sample must be 2-D", shape=list(rows.shape))
    return np.asarray(rows, np.float32)


def _sq_dists(a: Rows, b: Rows) -> npt.NDArray[np.float64]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d: npt.NDArray[np.float64] = (a64 * a64).sum(1)[:, None] + (b64 * b64).sum(1)[None, :] - 2.0 * (a64 @ b64.T)
    return np.maximum(d, 0.0, out=d)


@dataclass
class MMDTest:
    """MMD^2 of a window against a fixed reference, with its calibrated threshold."""

    reference: Rows
    gamma: float
    """Kernel ``exp(-gamma * |a - b|^2)``."""
    threshold: float
    window: int
    alpha: float
    k_rr: float
    """Mean kernel of the reference with itself (fixed: computed once)."""

    @property
    def features(self) -> int:
        return int(self.reference.shape[1])

    def _k(self, a: Rows, b: Rows) -> float:
        return float(np.exp(-self.gamma * _sq_dists(a, b)).mean())

    def statistic(self, rows: Rows) -> float:
        """MMD^2 of ``rows`` (a window) against the reference."""
        if rows.ndim != 2 or rows.shape[1] != self.features:
            raise DecodeError("inputs do not match the reference's features", expected=self.features)
        return self._k(rows, rows) + self.k_rr - 2.0 * self._k(rows, self.reference)

    @classmethod
    def calibrate(cls, rows: Rows, window: int, alpha: float = 0.01, draws: int = 1000, seed: int = 0) -> MMDTest:
        """Split ``rows`` into the reference and a null pool; the threshold is the ``1 - alpha``
        quantile of ``draws`` windows from the pool (see the module docstring)."""
        if len(rows) < 2 * window:
            raise DecodeError("reference sample too small for the window", rows=len(rows), window=window)
        rng = np.random.default_rng(seed)
        perm = rng.permutation(len(rows))
        half = len(rows) // 2
        ref, pool = rows[perm[:half]], rows[perm[half:]]
        probe = ref[rng.choice(len(ref), size=min(len(ref), 500), replace=False)]
        d = _sq_dists(probe, probe)
        med = float(np.median(d[np.triu_indices(len(probe), k=1)]))
        gamma = 1.0 / med if med > 0 else 1.0
        test = cls(ref, gamma, float("inf"), window, alpha, 0.0)
        test.k_rr = test._k(ref, ref)
        null = np.array([test.statistic(pool[rng.choice(len(pool), size=window, replace=False)]) for _ in range(draws)])
        test.threshold = float(np.quantile(null, 1.0 - alpha))
        return test
