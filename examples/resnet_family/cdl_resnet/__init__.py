"""An example model family, written as a cdl user would: torchvision's ResNet-18 (random
initial weights, nothing downloaded), its stem adapted to small images.

Install it into the environment cdl runs in (``uv pip install -e examples/resnet_family``, or as
a dependency of your own package) and register a dataset with ``--family resnet18``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from cdl.datasets import Task
from cdl.ml.family import ModelFamily
from cdl.ml.models import ModelConfig

__all__ = ["ResNet18Family", "SmallImageResNet"]


class SmallImageResNet(nn.Module):
    """ResNet-18 (``[2, 2, 2, 2]`` basic blocks) with a 3x3 stride-1 stem and no max-pool, so
    that 8x8 to 32x32 images keep their detail; ``width`` scales every stage's channels."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, width: int) -> None:
        super().__init__()
        c, h, w = in_shape if len(in_shape) == 3 else (1, *in_shape)
        self.in_shape = (c, h, w)
        net = _resnet18(width, num_classes)
        net.conv1 = nn.Conv2d(c, net.bn1.num_features, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()  # type: ignore[assignment]
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x.reshape(x.shape[0], *self.in_shape))
        return out


def _resnet18(width: int, num_classes: int) -> ResNet:
    """torchvision's ResNet-18 with stages of ``width``·(1, 2, 4, 8) channels (64: the original)."""
    net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
    net.inplanes = width
    net.bn1 = nn.BatchNorm2d(width)
    net.layer1 = net._make_layer(BasicBlock, width, 2)
    net.layer2 = net._make_layer(BasicBlock, width * 2, 2, stride=2)
    net.layer3 = net._make_layer(BasicBlock, width * 4, 2, stride=2)
    net.layer4 = net._make_layer(BasicBlock, width * 8, 2, stride=2)
    net.fc = nn.Linear(width * 8, num_classes)
    return net


class ResNet18Family(ModelFamily):
    """The plugin: cdl builds, tunes and compresses the model through this object only."""

    name = "resnet18"
    tasks = frozenset({Task.IMAGE})
    defaults: Mapping[str, Any] = {"width": 16, "lr": 2e-3, "weight_decay": 1e-4, "batch_size": 64, "epochs": 15}
    space: Mapping[str, Sequence[Any]] = {
        "lr": ["log", 3e-4, 1e-2],
        "weight_decay": ["log", 1e-6, 1e-3],
        "width": ["choice", [8, 16, 32]],
    }
    architecture_keys = frozenset({"width"})
    compressions = frozenset({"int8-dynamic", "int8-static", "fp16"})

    def build(self, config: ModelConfig) -> nn.Module:
        hp = {**self.defaults, **config.hparams}
        return SmallImageResNet(config.input_shape, config.num_classes, int(hp["width"]))
