"""Structured pruning (cdl.ml.pruning, through each family's prune): the kept weights are the right ones."""

from __future__ import annotations

import pytest
import torch

from cdl.errors import InvalidInputError
from cdl.ml.models import Family, ModelConfig, build_model
from cdl.ml.pruning import keep_count, parameters, prune


def _trained_like(config: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    module = build_model(config)
    for m in module.modules():  # BatchNorm statistics that are not the defaults
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return module.eval()


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(Family.CNN, (1, 8, 8), 10, {"channels": 16}),
        ModelConfig(Family.MLP, (20,), 4, {"hidden": 32, "layers": 3}),
    ],
)
def test_keeping_every_unit_gives_the_same_model_and_pruning_shrinks_it(config: ModelConfig) -> None:
    module = _trained_like(config)
    x = torch.randn(5, *config.input_shape)
    same, same_config = prune(module, config, 0.01)  # keeps every unit: the same function
    assert same_config.hparams == config.hparams
    torch.testing.assert_close(same.eval()(x), module(x))
    small, small_config = prune(module, config, 0.5)
    key = "channels" if config.family is Family.CNN else "hidden"
    assert small_config.hparams[key] == config.hparams[key] // 2
    assert parameters(small) < 0.6 * parameters(module)
    assert small.eval()(x).shape == module(x).shape
    assert small_config.architecture() != config.architecture()


def test_the_units_with_the_largest_l1_norm_are_kept() -> None:
    config = ModelConfig(Family.MLP, (3,), 2, {"hidden": 4, "layers": 1})
    module = build_model(config).eval()
    first = module.net[1]
    assert isinstance(first, torch.nn.Linear)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0, 0], [5, 5, 5], [0.1, 0, 0], [-3, -3, -3]]))
    small, _ = prune(module, config, 0.5)
    kept = next(m for m in small.modules() if isinstance(m, torch.nn.Linear))
    assert kept.weight.tolist() == [[5.0, 5, 5], [-3, -3, -3]]  # rows 1 and 3, in order


def test_bad_fractions_and_the_text_family_are_refused() -> None:
    config = ModelConfig(Family.TEXT, (), 2, {"buckets": 64, "embed_dim": 8})
    with pytest.raises(InvalidInputError):
        prune(build_model(config), config, 0.5)
    mlp = ModelConfig(Family.MLP, (3,), 2, {"hidden": 4, "layers": 1})
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(InvalidInputError):
            prune(build_model(mlp), mlp, bad)
    assert keep_count(32, 0.5) == 16 and keep_count(3, 0.99) == 1
