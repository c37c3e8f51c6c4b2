"""Models written the way other people write them (torch's own layers, torchvision-style
blocks, tied weights), for the end-to-end tests of issue 18. Each callable builds a small
classifier; the module-level ``input_shape`` is the per-sample shape of the callables that
do not set ``model.input_shape`` themselves (README: "Bringing your own model").

Nothing here knows tedepr: the CLI imports these with ``--arch tests.foreign_models:NAME``.
"""

from __future__ import annotations

import torch
from torch import nn

from samples.bring_your_own.resnet18 import ResNet

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
def resnet18(num_classes: int = 10, width: int = 8) -> nn.Module:
    """torchvision's ResNet-18 structure, the one samples/bring_your_own/ shows users (narrow,
    RGB). No input_shape on the model: this module's ``input_shape`` applies."""
    return ResNet([2, 2, 2, 2], num_classes, width, in_channels=3)


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
