"""uint8 images stay uint8 at the served model's input: the exported graph takes uint8 and casts
as its first step, and every compressed variant keeps that input and answers as FP32 does."""

from __future__ import annotations

import numpy as np
import onnx
import torch

from cdl.datasets import Task
from cdl.ml.core import build_seeded, fit_preprocessor, hyperparameters
from cdl.ml.models import ModelConfig
from services.compressor.variants import (
    Served,
    export_onnx,
    fp16_variant,
    int8_dynamic_variant,
    int8_static_variant,
    run,
    served_input,
)


def test_a_uint8_dataset_s_model_takes_uint8_and_its_variants_too() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, 1, 12, 12), dtype=np.uint8)
    hp = hyperparameters("cnn", {"channels": 8})
    config = ModelConfig("cnn", (1, 12, 12), 10, hp)
    pre = fit_preprocessor("cnn", Task.IMAGE, images, hp)
    served = Served(build_seeded(config, 0).eval(), config, pre, "uint8").eval()
    x = served_input(config, pre, images, "uint8")
    assert x.dtype == np.uint8
    fp32 = export_onnx(served, x)
    [inp] = onnx.load_from_string(fp32).graph.input
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    with torch.no_grad():  # the same answers as the float path: standardisation after the cast
        want = Served(served.module, config, pre).eval()(torch.from_numpy(images.astype(np.float32))).numpy()
    np.testing.assert_allclose(run(fp32, x), want, atol=1e-4)
    for variant in (int8_dynamic_variant(fp32), int8_static_variant(fp32, x[:32]), fp16_variant(fp32)):
        [vin] = onnx.load_from_string(variant).graph.input
        assert vin.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        out = run(variant, x)
        assert (out.argmax(1) == want.argmax(1)).mean() > 0.8
