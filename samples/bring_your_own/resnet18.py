"""A torchvision-style ResNet-18, written in plain torch as a user brings it to tedepr.

torchvision's own ``torchvision.models.resnet18`` builds the same modules (7x7 stem, max-pool,
four stages of two ``BasicBlock``s, adaptive average pool, ``fc``); torchvision does not
import beside the CPU torch wheel this project installs, so the structure is written out
here (He et al. 2016, "Deep Residual Learning for Image Recognition"). Nothing in this file
knows tedepr: ``resnet18.sh`` passes ``--arch resnet18:resnet18``, and tedepr reads the
module-level ``input_shape`` because the model does not set one itself (README "Bringing
your own model").
"""

from __future__ import annotations

import torch
from torch import nn

input_shape = (1, 28, 28)  # the shipped MNIST sample (samples/mnist5k.npz); torchvision uses 3x224x224


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: two 3x3 convs with batch norm and a residual."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet with basic blocks: ``layers`` blocks per stage, ``width``
    channels in the first stage (torchvision: 64), doubled at each of the next three."""

    def __init__(self, layers: list[int], num_classes: int = 10, width: int = 64,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(2 * width, layers[1], 2)
        self.layer3 = self._make_layer(4 * width, layers[2], 2)
        self.layer4 = self._make_layer(8 * width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 1) -> nn.Module:
    """ResNet-18 (2 blocks per stage; 11.2 M parameters at width 64 and 3 input channels).
    Defaults fit ``input_shape`` (grayscale); pass ``in_channels=3`` for RGB."""
    return ResNet([2, 2, 2, 2], num_classes, width, in_channels)
