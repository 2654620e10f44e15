"""Structured pruning of any family's graph (cdl.ml.pruning, torch-pruning's dependency graph): the
built-in families and the example ResNet-18 plugin shrink, stay consistent (the same output
shape, an ONNX export that answers as PyTorch does), keep their output layer whole and keep the
channels with the largest L1 norm; the model given is not changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cdl.errors import InvalidInputError
from cdl.ml.core import build_seeded, hyperparameters
from cdl.ml.models import Family, ModelConfig, build_model
from cdl.ml.preprocess import Preprocessor
from cdl.ml.pruning import parameters, prune
from services.compressor.variants import Served, export_onnx, run


def _trained_like(config: ModelConfig) -> torch.nn.Module:
    module = build_seeded(config, 0)
    for m in module.modules():  # BatchNorm statistics that are not the defaults
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return module.eval()


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(Family.CNN, (1, 8, 8), 10, hyperparameters("cnn", {"channels": 16})),
        ModelConfig(Family.CNN, (1, 28, 28), 10, hyperparameters("cnn")),
        ModelConfig(Family.MLP, (20,), 4, hyperparameters("mlp", {"hidden": 32, "layers": 3})),
        ModelConfig(Family.MLP, (10,), 1, hyperparameters("mlp")),  # a regression's one output
        ModelConfig("resnet18", (1, 8, 8), 10, hyperparameters("resnet18")),  # residual additions
    ],
    ids=["cnn-8", "cnn-28", "mlp", "mlp-regression", "resnet18"],
)
def test_any_family_shrinks_and_exports_as_it_answers(config: ModelConfig) -> None:
    module = _trained_like(config)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(5, *config.input_shape)
    small = prune(module, config, 0.5)
    assert parameters(small) < 0.6 * parameters(module)
    assert small(x).shape == module(x).shape
    heads = [m for m in small.modules() if isinstance(m, torch.nn.Linear)]
    assert heads[-1].out_features == config.num_classes
    for k, v in module.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    pre = Preprocessor("standardize", (0.0,), (1.0,))
    served = Served(small, config, pre).eval()
    onnx = export_onnx(served, x.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(run(onnx, x.numpy()), served(x).numpy(), atol=1e-4)


def test_the_neurons_with_the_largest_l1_norm_are_kept() -> None:
    config = ModelConfig(Family.MLP, (3,), 2, {"hidden": 4, "layers": 1})
    module = build_model(config).eval()
    first = module.net[1]
    assert isinstance(first, torch.nn.Linear)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0, 0], [5, 5, 5], [0.1, 0, 0], [-3, -3, -3]]))
        first.bias.zero_()
    small = prune(module, config, 0.5)
    kept = next(m for m in small.modules() if isinstance(m, torch.nn.Linear))
    assert sorted(kept.weight.tolist()) == [[-3.0, -3, -3], [5.0, 5, 5]]  # rows 1 and 3


def test_bad_fractions_and_text_models_are_refused() -> None:
    config = ModelConfig(Family.TEXT, (), 2, {"buckets": 64, "embed_dim": 8})
    with pytest.raises(InvalidInputError):
        prune(build_model(config), config, 0.5)
    mlp = ModelConfig(Family.MLP, (3,), 2, {"hidden": 4, "layers": 1})
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(InvalidInputError):
            prune(build_model(mlp), mlp, bad)
