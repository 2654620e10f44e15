"""Structured pruning: a smaller dense model with the least important neurons or channels
removed (by L1 norm), fine-tuned briefly through the shared training core.

- **CNN**: the first convolution keeps the ``1 - fraction`` of its output channels
  with the largest L1 norm (its BatchNorm with them), the second convolution
  the same share of its own (its input channels follow the first's choice),
  and the head keeps the columns of the kept channels. The result is the same
  family with a smaller ``channels`` (the second convolution has twice as many, as always).
- **MLP**: every hidden layer keeps its largest-L1 neurons (the next layer's
  inputs follow), so ``hidden`` shrinks.
- **Text**: not pruned (the embedding table dominates its size; see docs/compressor.md).

The pruned model is a plain model of the family (``build_model`` of the new
config) holding the kept weights; :func:`prune` returns it with its config,
and the compressor fine-tunes it (``cdl.ml.core.fit`` with that config and a
warm start from these weights) before exporting and measuring it like any
other variant.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from cdl.errors import InvalidInputError
from cdl.ml.family import get_family
from cdl.ml.models import CNN, MLP, ModelConfig, build_model

__all__ = ["keep_count", "load_into", "parameters", "prune", "prune_cnn", "prune_mlp"]


def keep_count(width: int, fraction: float) -> int:
    """How many of ``width`` units stay when ``fraction`` of them is removed (at least 1)."""
    return max(1, min(width, round(width * (1.0 - fraction))))


def _top_l1(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (sorted) of the ``k`` output units of ``weight`` with the largest L1 norm."""
    norms = weight.detach().abs().reshape(weight.shape[0], -1).sum(1)
    return torch.sort(torch.topk(norms, k).indices).values


def prune_cnn(module: nn.Module, config: ModelConfig, fraction: float) -> tuple[nn.Module, ModelConfig]:
    """The ``cnn`` family's pruning (see the module docstring)."""
    if not isinstance(module, CNN):
        raise InvalidInputError("not a cnn module", module=type(module).__name__)
    # features: 0 conv1, 1 bn1, 2 relu, 3 conv2, 4 bn2, ...; head: flatten, dropout, linear
    sd = module.state_dict()
    channels = int(sd["features.0.weight"].shape[0])
    k1 = keep_count(channels, fraction)
    keep1 = _top_l1(sd["features.0.weight"], k1)
    keep2 = _top_l1(sd["features.3.weight"][:, keep1], 2 * k1)
    head = sd["head.2.weight"]
    per_channel = int(head.shape[1]) // int(sd["features.3.weight"].shape[0])  # flattened positions each
    cols = (keep2[:, None] * per_channel + torch.arange(per_channel)[None, :]).reshape(-1)
    new: dict[str, torch.Tensor] = {
        "features.0.weight": sd["features.0.weight"][keep1],
        "features.0.bias": sd["features.0.bias"][keep1],
        "features.3.weight": sd["features.3.weight"][keep2][:, keep1],
        "features.3.bias": sd["features.3.bias"][keep2],
        "head.2.weight": head[:, cols],
        "head.2.bias": sd["head.2.bias"],
    }
    for bn, keep in (("features.1", keep1), ("features.4", keep2)):
        for part in ("weight", "bias", "running_mean", "running_var"):
            new[f"{bn}.{part}"] = sd[f"{bn}.{part}"][keep]
        new[f"{bn}.num_batches_tracked"] = sd[f"{bn}.num_batches_tracked"]
    new_config = ModelConfig(config.family, config.input_shape, config.num_classes, {**config.hparams, "channels": k1})
    small = build_model(new_config)
    small.load_state_dict({k: v.clone() for k, v in new.items()})
    return small, new_config


def prune_mlp(module: nn.Module, config: ModelConfig, fraction: float) -> tuple[nn.Module, ModelConfig]:
    """The ``mlp`` family's pruning (see the module docstring)."""
    if not isinstance(module, MLP):
        raise InvalidInputError("not an mlp module", module=type(module).__name__)
    linears = [m for m in module.net if isinstance(m, nn.Linear)]
    hidden = linears[0].out_features
    k = keep_count(hidden, fraction)
    new_config = ModelConfig(config.family, config.input_shape, config.num_classes, {**config.hparams, "hidden": k})
    small = build_model(new_config)
    small_linears = [m for m in small.modules() if isinstance(m, nn.Linear)]
    keep_in = torch.arange(linears[0].in_features)
    with torch.no_grad():
        for i, (src, dst) in enumerate(zip(linears, small_linears, strict=True)):
            last = i == len(linears) - 1
            keep_out = torch.arange(src.out_features) if last else _top_l1(src.weight[:, keep_in], k)
            dst.weight.copy_(src.weight[keep_out][:, keep_in])
            dst.bias.copy_(src.bias[keep_out])
            keep_in = keep_out
    return small, new_config


def prune(module: nn.Module, config: ModelConfig, fraction: float) -> tuple[nn.Module, ModelConfig]:
    """A copy of ``module`` with ``fraction`` of its structure removed, as its family prunes (the
    built-ins: channels of a CNN, hidden neurons of an MLP, by L1 norm), and its config; the
    original is not changed. A family without pruning raises InvalidInputError."""
    if not 0.0 < fraction < 1.0:
        raise InvalidInputError("a pruning fraction is between 0 and 1", fraction=fraction)
    return get_family(config.family).prune(module, config, fraction)


def parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())


def load_into(target: nn.Module, source: nn.Module) -> Any:
    """Copy ``source``'s weights into ``target`` (same architecture): the fine-tune's warm start."""
    return target.load_state_dict(source.state_dict())
