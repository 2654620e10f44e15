"""Preprocessing fitted on the train split and stored with the model (the
"transformation registry" of the paper): normalisation statistics for tensors,
hashing settings for text."""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
