"""A text model exports to ONNX with the same answers (EmbeddingBag with padding is not exportable)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdl.datasets import Task
from cdl.ml.core import build_seeded, fit_preprocessor, hyperparameters
from cdl.ml.models import Family, ModelConfig
from services.compressor.variants import (
    Served,
    export_onnx,
    fp16_variant,
    int8_dynamic_variant,
    parity,
    run,
    served_input,
)

TEXTS = np.array(
    ["the quick brown fox", "jumps over the lazy dog", "", "numpy arrays and dtypes", "a b c d e f g h i j k"] * 4,
    dtype=object,
)


@pytest.mark.parametrize("pooling", ["idf", "mean"])
def test_a_text_model_exports_and_its_variants_answer_like_it(pooling: str) -> None:
    hp = hyperparameters(Family.TEXT, {"pooling": pooling})
    pre = fit_preprocessor(Family.TEXT, Task.TEXT, TEXTS, hp)
    config = ModelConfig(Family.TEXT, (), 3, hp)
    module = build_seeded(config, 0).eval()
    ids = served_input(config, pre, TEXTS)
    assert ids.dtype == np.int64 and (ids == 0).any()  # padded, and one text is padding only
    module.set_idf(ids[: len(ids) // 2])  # ids of the other half weigh 0 (unseen), as in training
    if pooling == "idf":
        idf = module.get_buffer("idf")
        assert idf[0] == 0 and (idf > 0).sum() == len(np.unique(ids[: len(ids) // 2])) - 1
        assert not (ids[len(ids) // 2 :] == 0).all()
    served = Served(module, config, pre).eval()
    fp32 = export_onnx(served, ids)
    assert parity(fp32, served, ids, 1e-5) < 1e-5
    with torch.no_grad():
        reference = served(torch.from_numpy(ids)).numpy()
    for variant in (int8_dynamic_variant(fp32), fp16_variant(fp32)):
        got = run(variant, ids)
        assert got.shape == reference.shape and (got.argmax(1) == reference.argmax(1)).mean() >= 0.9
