"""Models written the way other people write them (torch's own layers, torchvision-style
blocks, tied weights), for the end-to-end tests of issue 18. Each callable builds a small
classifier; the module-level ``input_shape`` is the per-sample shape of the callables that
do not set ``model.input_shape`` themselves (README: "Bringing your own model").

Nothing here knows tedepr: the CLI imports these with ``--arch tests.foreign_models:NAME``.
"""

from __future__ import annotations

import torch
from torch import nn

input_shape = (3, 32, 32)  # what resnet18 / vgg11_bn take (torchvision's default layout)


# ---------------------------------------------------------------------------- sequences
class _EncoderClassifier(nn.Module):
    """torch's nn.TransformerEncoder (nn.MultiheadAttention inside) over a sequence."""

    def __init__(self, features: int = 16, d_model: int = 32, heads: int = 4, layers: int = 2,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.proj = nn.Linear(features, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=64, dropout=0.1,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.proj(x)).mean(dim=1))


def transformer(**kw) -> nn.Module:
    m = _EncoderClassifier(**kw)
    m.input_shape = (8, 16)  # 8 time steps of 16 features
    return m


class _RNNClassifier(nn.Module):
    def __init__(self, cell: str, features: int = 16, hidden: int = 24, layers: int = 2,
                 bidirectional: bool = True, num_classes: int = 10) -> None:
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(features, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def lstm(**kw) -> nn.Module:
    m = _RNNClassifier("lstm", **kw)
    m.input_shape = (8, 16)
    return m


def gru(**kw) -> nn.Module:
    m = _RNNClassifier("gru", **kw)
    m.input_shape = (8, 16)
    return m


class _TextClassifier(nn.Module):
    """Token ids in, classes out: nn.Embedding first (the dry run must feed int64 ids)."""

    def __init__(self, vocab: int = 50, dim: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.fc = nn.Linear(dim, 64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(ids).transpose(1, 2)).relu().mean(dim=2)
        return self.head(torch.relu(self.fc(h)))


def text(**kw) -> nn.Module:
    m = _TextClassifier(**kw)
    m.input_shape = (12,)  # 12 token ids
    return m


# ---------------------------------------------------------------------------- tied weights
class _Tied(nn.Module):
    """Two Linears sharing one weight (an autoencoder-like tie: ``dec.weight is enc.weight``)
    between two untied layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(64, 48)
        self.a = nn.Linear(48, 48)
        self.b = nn.Linear(48, 48)
        self.b.weight = self.a.weight  # tied
        self.head = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x.flatten(1)))
        h = torch.relu(self.a(h))
        return self.head(torch.relu(self.b(h)))


def tied(**kw) -> nn.Module:
    m = _Tied(**kw)
    m.input_shape = (64,)
    return m


def untied(**kw) -> nn.Module:
    """The same layers as :func:`tied`, each with its own weight (an architecture that does
    not tie them itself: loading an artifact of a tied model must tie them again)."""
    m = _Tied(**kw)
    m.b.weight = nn.Parameter(m.a.weight.detach().clone())
    m.input_shape = (64,)
    return m


# ---------------------------------------------------------------------------- torchvision style
class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, verbatim in structure."""

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
    """torchvision.models.ResNet (7x7 stem, max-pool, four stages, adaptive pool, fc)."""

    def __init__(self, layers: list[int], num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
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


def resnet18(num_classes: int = 10, width: int = 8) -> nn.Module:
    """No input_shape on the model: the module-level ``input_shape`` applies."""
    return ResNet([2, 2, 2, 2], num_classes, width)


class VGG(nn.Module):
    """torchvision.models.VGG with batch norm (configuration "A" = VGG-11)."""

    def __init__(self, num_classes: int = 10, width: int = 8, hidden: int = 64) -> None:
        super().__init__()
        cfg = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"]
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v * width, 3, padding=1), nn.BatchNorm2d(v * width),
                           nn.ReLU(inplace=True)]
                c = v * width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(nn.Linear(c * 4, hidden), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg11_bn(num_classes: int = 10, width: int = 8) -> nn.Module:
    return VGG(num_classes, width)
