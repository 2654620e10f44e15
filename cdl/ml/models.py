"""Model families: MLP (tabular), CNN (images), a hashed-token text classifier."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cdl.datasets import Task
from cdl.ml.family import ModelFamily, get_family
from cdl.ml.preprocess import Preprocessor

__all__ = [
    "CNN",
    "MLP",
    "CnnFamily",
    "Family",
    "MlpFamily",
    "ModelConfig",
    "TextClassifier",
    "TextFamily",
    "build_model",
]


class Family:
    """The names of cdl's own families (any installed family's name is valid: cdl.ml.family)."""

    MLP = "mlp"
    CNN = "cnn"
    TEXT = "text"


_TRAINING = {"lr": 3e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": 30}
_COMMON_SPACE: dict[str, list[Any]] = {
    "lr": ["log", 1e-4, 3e-2],
    "weight_decay": ["log", 1e-6, 1e-2],
    "batch_size": ["choice", [32, 64, 128, 256]],
    "dropout": ["float", 0.0, 0.5],
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model (stored with every checkpoint)."""

    family: str
    input_shape: tuple[int, ...]
    num_classes: int
    hparams: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["input_shape"] = list(self.input_shape)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ModelConfig:
        return cls(str(doc["family"]), tuple(doc["input_shape"]), int(doc["num_classes"]), dict(doc["hparams"]))

    def architecture(self) -> dict[str, Any]:
        """What must match for a warm start (shapes of every weight)."""
        keys = get_family(self.family).architecture_keys
        return {
            "family": self.family,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            **{k: v for k, v in sorted(self.hparams.items()) if k in keys},
        }


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        blocks.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


class CNN(nn.Module):
    """Two conv blocks and a linear head; works for small images such as 8x8 digits.

    ``early_pool``: on images of 16 px and more, halve the resolution after the first block too
    (its ReLU becomes ReLU + max-pool: the same parameter names), so the second convolution runs
    on a quarter of the positions: a 28x28 image trains about four times faster, as accurately.
    Small images (digits' 8x8) keep their resolution whatever it says."""

    def __init__(
        self, in_shape: tuple[int, ...], num_classes: int, channels: int, dropout: float, early_pool: bool = False
    ) -> None:
        super().__init__()
        c, h, w = in_shape if len(in_shape) == 3 else (1, *in_shape)
        self.in_shape = (c, h, w)
        early = early_pool and min(h, w) >= 16
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)) if early else nn.ReLU(),
            nn.Conv2d(channels, channels * 2, 3, padding=1),
            nn.BatchNorm2d(channels * 2),
            nn.ReLU(),
            nn.MaxPool2d(2) if min(h, w) >= 4 else nn.Identity(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], *self.in_shape)
        out: torch.Tensor = self.head(self.features(x))
        return out


class TextClassifier(nn.Module):
    """Hashed token ids (word n-grams and subwords, :class:`cdl.ml.preprocess.Preprocessor`)
    -> EmbeddingBag -> linear.

    ``pooling``:

    - ``"idf"`` (the default since text models take subwords): a TF-IDF-weighted sum, L2
      normalised -- each id weighs its inverse document frequency in the training texts
      (:meth:`set_idf`; ids no training text had weigh 0, as in a fitted TF-IDF vocabulary),
      and the weights of a text are scaled to unit L2 norm. The weights are a buffer: they
      travel with the checkpoint and the ONNX file.
    - ``"mean"``: the plain mean of the ids' vectors (models trained before).

    Id 0 is padding: it takes no part. The ONNX exporter cannot export ``embedding_bag`` with
    a ``padding_idx``; under export the same pooling is computed as an embedding lookup and a
    weighted sum (same weights, same answers: tested to 1e-6), so a text model compresses and
    serves like the others.
    """

    def __init__(self, buckets: int, embed_dim: int, num_classes: int, dropout: float, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "idf"):
            raise ValueError(f"pooling: mean or idf, not {pooling!r}")
        self.pooling = pooling
        self.embedding = nn.EmbeddingBag(buckets, embed_dim, mode="mean" if pooling == "mean" else "sum", padding_idx=0)
        if pooling == "idf":
            nn.init.normal_(self.embedding.weight, std=0.1)  # a sum of unit norm: N(0, 1) would saturate
            with torch.no_grad():
                self.embedding.weight[0].zero_()
            self.register_buffer("idf", torch.ones(buckets))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(embed_dim, num_classes)

    def set_idf(self, ids: torch.Tensor | Any) -> None:
        """Fit the idf weights on the training texts' ids ``[n, max_tokens]`` (smooth idf:
        ``ln((1 + n) / (1 + df)) + 1``; 0 for ids in no text, and for padding)."""
        if self.pooling != "idf":
            return
        ids = torch.as_tensor(ids, dtype=torch.int64)
        n, buckets = len(ids), self.embedding.num_embeddings
        rows = torch.arange(n, dtype=torch.int64).unsqueeze(1).expand_as(ids)
        pairs = torch.unique((rows * buckets + ids).reshape(-1))  # (text, id) once each
        df = torch.bincount(pairs % buckets, minlength=buckets).to(torch.float64)
        idf = torch.where(df > 0, torch.log((1.0 + n) / (1.0 + df)) + 1.0, torch.zeros_like(df))
        idf[0] = 0.0
        self.get_buffer("idf").copy_(idf.to(torch.float32))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean":
            pooled = self._masked_mean(ids) if torch.onnx.is_in_onnx_export() else self.embedding(ids)
        else:
            w = nn.functional.embedding(ids, self.get_buffer("idf").unsqueeze(1)).squeeze(-1)  # [batch, tokens]
            w = w / w.pow(2).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-6)
            if torch.onnx.is_in_onnx_export():
                vectors = nn.functional.embedding(ids, self.embedding.weight)
                pooled = (vectors * w.unsqueeze(-1)).sum(dim=1)
            else:
                pooled = self.embedding(ids, per_sample_weights=w)
        out: torch.Tensor = self.fc(self.dropout(pooled))
        return out

    def _masked_mean(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = nn.functional.embedding(ids, self.embedding.weight)
        mask = (ids != 0).unsqueeze(-1).to(vectors.dtype)
        total = (vectors * mask).sum(dim=1)
        count = mask.sum(dim=1).clamp(min=1.0)  # a text of padding only: zeros, as EmbeddingBag gives
        out: torch.Tensor = total / count
        return out


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised module of ``config``'s family."""
    return get_family(config.family).build(config)


class MlpFamily(ModelFamily):
    """Fully connected layers over the flattened input: tabular data (and small images)."""

    name = Family.MLP
    tasks = frozenset({Task.TABULAR, Task.IMAGE, Task.REGRESSION})
    default_for = frozenset({Task.TABULAR, Task.REGRESSION})
    defaults: Mapping[str, Any] = {"hidden": 128, "layers": 2, "dropout": 0.1, **_TRAINING}
    space: Mapping[str, Sequence[Any]] = {
        **_COMMON_SPACE,
        "hidden": ["choice", [32, 64, 128, 256]],
        "layers": ["int", 1, 3],
    }
    architecture_keys = frozenset({"hidden", "layers"})

    def build(self, config: ModelConfig) -> nn.Module:
        hp = {**self.defaults, **config.hparams}
        return MLP(
            math.prod(config.input_shape),
            config.num_classes,
            int(hp["hidden"]),
            int(hp["layers"]),
            float(hp["dropout"]),
        )


class CnnFamily(ModelFamily):
    """Two convolution blocks and a linear head: images."""

    name = Family.CNN
    tasks = frozenset({Task.IMAGE})
    default_for = frozenset({Task.IMAGE})
    defaults: Mapping[str, Any] = {"channels": 32, "dropout": 0.2, "early_pool": True, **_TRAINING}
    space: Mapping[str, Sequence[Any]] = {**_COMMON_SPACE, "channels": ["choice", [8, 16, 32, 64]]}
    architecture_keys = frozenset({"channels", "early_pool"})

    def build(self, config: ModelConfig) -> nn.Module:
        hp = {**self.defaults, **config.hparams}
        # early_pool: what the model was built with; configs from before it existed pooled late
        early = bool(config.hparams.get("early_pool", False))
        return CNN(config.input_shape, config.num_classes, int(hp["channels"]), float(hp["dropout"]), early)


class TextFamily(ModelFamily):
    """Hashed word n-grams and subwords, TF-IDF pooled embeddings, a linear head: text. Its
    tokenizer is versioned with the model and runs in the served entry."""

    name = Family.TEXT
    tasks = frozenset({Task.TEXT})
    default_for = frozenset({Task.TEXT})
    defaults: Mapping[str, Any] = {
        "embed_dim": 32,
        "buckets": 2**16,
        "ngrams": 2,
        "subwords": 5,
        "max_tokens": 1024,
        "pooling": "idf",
        "dropout": 0.1,
        "lr": 2e-3,
        "weight_decay": 0.0,
        "batch_size": 64,
        "epochs": 20,
    }
    space: Mapping[str, Sequence[Any]] = {
        **_COMMON_SPACE,
        "embed_dim": ["choice", [32, 64, 128]],
        "ngrams": ["int", 1, 2],
    }
    architecture_keys = frozenset({"embed_dim", "buckets", "ngrams", "subwords", "pooling"})
    text_input = True
    # the embedding table dominates its size; static quantization needs tensor inputs
    compressions = frozenset({"int8-dynamic", "fp16"})

    def build(self, config: ModelConfig) -> nn.Module:
        hp = {**self.defaults, **config.hparams}
        # pooling: what the model was trained with; configs from before it was a hyperparameter pooled by mean
        pooling = str(config.hparams.get("pooling", "mean"))
        return TextClassifier(
            int(hp["buckets"]), int(hp["embed_dim"]), config.num_classes, float(hp["dropout"]), pooling
        )

    def preprocessor(self, task: Task, x: Any, hparams: Mapping[str, Any]) -> Preprocessor:
        return Preprocessor.for_text(
            int(hparams["buckets"]),
            int(hparams["ngrams"]),
            max_tokens=int(hparams.get("max_tokens", 256)),
            subwords=int(hparams.get("subwords", 0)),
        )
