"""Structured pruning of any family's graph, through a dependency-graph library (torch-pruning).

:func:`prune` removes ``fraction`` of the channels (or neurons) of every prunable layer,
those with the smallest L1 norm, from a copy of the model. torch-pruning traces the module
with an example input and builds the graph of what depends on what — a convolution's output
channels, the BatchNorm after it, the next convolution's input channels, a residual addition
that ties two branches, a flatten into a linear head — so the model stays consistent whatever
the family's architecture: the same code prunes ``mlp``, ``cnn`` and a user's ResNet-18, with
nothing per family. The output layers (those with one output per class, or a regression's
one) are left whole. The result is the same module type with thinner layers; it cannot be
rebuilt from the family's config, so the compressor fine-tunes this very module
(``cdl.ml.core.fit(module=...)``) and exports it; it is never a registry version.

A family opts in by listing ``pruned`` in its ``compressions``; text models (the embedding
table dominates their size) do not. A graph the tracer cannot follow raises, and the
compressor records that variant's failure with its reason (docs/compressor.md).
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
from torch import nn

from cdl.errors import InvalidInputError
from cdl.ml.models import ModelConfig

__all__ = ["parameters", "prune"]


def prune(module: nn.Module, config: ModelConfig, fraction: float) -> nn.Module:
    """A copy of ``module`` (a model of ``config``) with ``fraction`` of the channels or neurons of
    each prunable layer removed, smallest L1 norm first; ``module`` itself is not changed."""
    import torch_pruning as tp

    if not 0.0 < fraction < 1.0:
        raise InvalidInputError("a pruning fraction is between 0 and 1", fraction=fraction)
    if not config.input_shape:
        raise InvalidInputError("only models of tensor inputs are pruned", family=config.family)
    small = copy.deepcopy(module).cpu().eval()
    example = torch.zeros(2, *config.input_shape)
    outputs = [
        m
        for m in small.modules()
        if (isinstance(m, nn.Linear) and m.out_features == config.num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == config.num_classes)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's notes on layers it leaves alone
        pruner = tp.pruner.MetaPruner(
            small,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=fraction,
            ignored_layers=outputs,
        )
        pruner.step()
    return small


def parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
