"""Preprocessing fitted on the train split and stored with the model (the
"transformation registry" of the paper): normalisation statistics for tensors,
hashing settings for text."""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["TOKEN_RE", "Preprocessor"]

TOKEN_RE = re.compile(r"[\w']+")


@dataclass(frozen=True)
class Preprocessor:
    kind: str  # "standardize" | "hash_tokens"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    per_feature: bool = False
    buckets: int = 0
    ngrams: int = 1
    max_tokens: int = 256
    lowercase: bool = True
    subwords: int = 0
    """Text: also the character n-grams of 3 to ``subwords`` characters of each word, the word
    wrapped in ``<`` and ``>`` (fastText's subwords; 0: none). They come after the words and
    the word n-grams, and ``max_tokens`` cuts what is over."""
    target_mean: float = 0.0
    target_std: float = 1.0
    """Regression: the target's mean and standard deviation on the training part. The model
    learns the standardised target; its output times ``target_std`` plus ``target_mean`` is the
    answer in the target's units (inside the served graph: :meth:`unscale`)."""

    # ------------------------------------------------------------------ fit
    @classmethod
    def fit_tensor(cls, x: npt.NDArray[Any], per_feature: bool) -> Preprocessor:
        flat = x.reshape(len(x), -1).astype(np.float64)
        if per_feature:
            mean, std = flat.mean(axis=0), flat.std(axis=0)
        else:
            mean, std = np.array([flat.mean()]), np.array([flat.std()])
        std = np.where(std < 1e-6, 1.0, std)
        return cls("standardize", tuple(map(float, mean)), tuple(map(float, std)), per_feature)

    @classmethod
    def for_text(
        cls, buckets: int, ngrams: int, max_tokens: int = 256, lowercase: bool = True, subwords: int = 0
    ) -> Preprocessor:
        return cls(
            "hash_tokens", buckets=buckets, ngrams=ngrams, max_tokens=max_tokens, lowercase=lowercase, subwords=subwords
        )

    def with_target(self, y: npt.NDArray[Any]) -> Preprocessor:
        """This preprocessing with the target standardisation fitted on ``y`` (regression)."""
        values = np.asarray(y, dtype=np.float64)
        mean = float(values.mean()) if len(values) else 0.0
        std = float(values.std()) if len(values) else 1.0
        return replace(self, target_mean=mean, target_std=std if std > 1e-6 else 1.0)

    @property
    def scales_target(self) -> bool:
        return (self.target_mean, self.target_std) != (0.0, 1.0)

    def scale(self, y: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        """Targets in the units the model learns (standardised)."""
        return ((np.asarray(y, dtype=np.float64) - self.target_mean) / self.target_std).astype(np.float32)

    def unscale(self, out: Any) -> Any:
        """A model's outputs (numpy array or torch tensor) in the target's units."""
        return out * self.target_std + self.target_mean if self.scales_target else out

    # ------------------------------------------------------------------ apply
    def transform(self, data: npt.NDArray[Any] | Sequence[str]) -> npt.NDArray[Any]:
        if self.kind == "standardize":
            x = np.asarray(data, dtype=np.float32)
            shape = x.shape
            flat = x.reshape(len(x), -1)
            mean = np.asarray(self.mean, dtype=np.float32)
            std = np.asarray(self.std, dtype=np.float32)
            return ((flat - mean) / std).reshape(shape).astype(np.float32)
        return self._hash(data)

    def _hash(self, texts: npt.NDArray[Any] | Sequence[str]) -> npt.NDArray[np.int64]:
        out = np.zeros((len(texts), self.max_tokens), dtype=np.int64)  # 0 = padding
        for i, text in enumerate(texts):
            tokens = TOKEN_RE.findall(str(text).lower() if self.lowercase else str(text))
            grams = list(tokens)
            for n in range(2, self.ngrams + 1):
                grams += [" ".join(tokens[j : j + n]) for j in range(len(tokens) - n + 1)]
            if self.subwords >= 3:
                for token in tokens:
                    w = f"<{token}>"
                    for n in range(3, self.subwords + 1):
                        grams += ["#" + w[j : j + n] for j in range(len(w) - n + 1)]
                    if len(grams) >= self.max_tokens:
                        break
            ids = [1 + zlib.crc32(g.encode()) % (self.buckets - 1) for g in grams[: self.max_tokens]]
            out[i, : len(ids)] = ids
        return out

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Preprocessor:
        d = dict(doc)
        d["mean"], d["std"] = tuple(d.get("mean", ())), tuple(d.get("std", ()))
        return cls(**d)
