"""The model zoo: the paper's five families, written in plain torch.

torchvision/timm cannot be imported beside the CPU build of torch here, so the reference
architectures are re-implemented from their papers. Every builder takes ``num_classes``,
``in_channels`` and ``input_size`` (image side) and returns a module whose
``input_shape`` (per-sample) and ``input_kind`` (``flat`` | ``image`` | ``sequence``) tell
the data module how to present samples. ``width`` scales channel counts (for fast tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BadInput
from .registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("architecture")


def _declare(model: nn.Module, input_shape: tuple[int, ...], kind: str) -> nn.Module:
    model.input_shape = tuple(int(s) for s in input_shape)
    model.input_kind = kind
    return model


def _check_positive(**kwargs: Any) -> None:
    for k, v in kwargs.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise BadInput(f"architecture argument {k}={v!r} must be a positive integer")


def _scaled(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


# ---------------------------------------------------------------------------- LeNet
class LeNet300(nn.Module):
    """LeNet-300-100 (LeCun et al. 1998): the MLP every pruning paper starts from."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """LeNet-5 in the Caffe 20-50-500 variant used by SNIP/SynFlow on MNIST."""

    def __init__(self, in_channels: int, input_size: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        side = ((input_size - 4) // 2 - 4) // 2
        if side <= 0:
            raise BadInput(f"lenet5 needs input_size >= 16, got {input_size}")
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@MODELS.register("lenet300")
def lenet300(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    _check_positive(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    n = in_channels * input_size * input_size
    return _declare(LeNet300(n, num_classes), (n,), "flat")


@MODELS.register("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> nn.Module:
    _check_positive(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    model = LeNet5(in_channels, input_size, num_classes)
    return _declare(model, (in_channels, input_size, input_size), "image")


# ---------------------------------------------------------------------------- VGG
_VGG_CFG = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR-style VGG with batch norm (Simonyan & Zisserman 2015; one FC head)."""

    def __init__(self, cfg: list, in_channels: int, input_size: int, num_classes: int,
                 width: float) -> None:
        super().__init__()
        if input_size % 32:
            raise BadInput(f"vgg needs input_size divisible by 32, got {input_size}")
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out = _scaled(v, width)
                layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out),
                           nn.ReLU(inplace=True)]
                c = out
        self.features = nn.Sequential(*layers)
        side = input_size // 32
        self.classifier = nn.Linear(c * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _vgg(name: str, num_classes: int, in_channels: int, input_size: int,
         width: float) -> nn.Module:
    _check_positive(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    model = VGG(_VGG_CFG[name], in_channels, input_size, num_classes, width)
    return _declare(model, (in_channels, input_size, input_size), "image")


@MODELS.register("vgg11")
def vgg11(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
          width: float = 1.0) -> nn.Module:
    return _vgg("vgg11", num_classes, in_channels, input_size, width)


@MODELS.register("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
          width: float = 1.0) -> nn.Module:
    return _vgg("vgg16", num_classes, in_channels, input_size, width)


# ---------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    """CIFAR ResNet block with the parameter-free option-A shortcut (He et al. 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_channels: int, num_classes: int, width: float) -> None:
        super().__init__()
        n = (depth - 2) // 6
        widths = [_scaled(c, width) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        cin = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _resnet(depth: int, num_classes: int, in_channels: int, input_size: int,
            width: float) -> nn.Module:
    _check_positive(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
    model = CifarResNet(depth, in_channels, num_classes, width)
    return _declare(model, (in_channels, input_size, input_size), "image")


@MODELS.register("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
             width: float = 1.0) -> nn.Module:
    return _resnet(20, num_classes, in_channels, input_size, width)


@MODELS.register("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
             width: float = 1.0) -> nn.Module:
    return _resnet(32, num_classes, in_channels, input_size, width)


@MODELS.register("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
             width: float = 1.0) -> nn.Module:
    return _resnet(56, num_classes, in_channels, input_size, width)


# ---------------------------------------------------------------------------- LSTM
class LSTMClassifier(nn.Module):
    """Sequence classifier: an LSTM over time steps, a linear head on the last step."""

    def __init__(self, features: int, hidden: int, num_layers: int, bidirectional: bool,
                 num_classes: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, num_layers=num_layers, batch_first=True,
                            bidirectional=bidirectional)
        self.fc = nn.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


@MODELS.register("lstm")
def lstm(num_classes: int = 10, in_channels: int = 1, input_size: int = 28, hidden: int = 128,
         num_layers: int = 1, bidirectional: bool = False,
         seq_len: int | None = None, features: int | None = None) -> nn.Module:
    """Rows of an image as time steps (T = input_size, F = in_channels * input_size) by
    default; ``seq_len``/``features`` describe any other sequence (e.g. video features)."""
    _check_positive(num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                    hidden=hidden, num_layers=num_layers)
    t = seq_len if seq_len is not None else input_size
    f = features if features is not None else in_channels * input_size
    _check_positive(seq_len=t, features=f)
    model = LSTMClassifier(f, hidden, num_layers, bool(bidirectional), num_classes)
    return _declare(model, (t, f), "sequence")


# ---------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    """Multi-head self-attention with plain ``nn.Linear`` projections (ViT, Dosovitskiy
    et al. 2021), so every projection is an ordinary tensorizable Linear."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise BadInput(f"vit dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d // self.heads))
        out = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class MHAttention(nn.Module):
    """The same block through ``nn.MultiheadAttention`` (packed ``in_proj_weight``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads) if attn == "linear" else MHAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, in_channels: int, input_size: int, patch: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float, num_classes: int, attn: str) -> None:
        super().__init__()
        if input_size % patch:
            raise BadInput(f"vit input_size {input_size} is not divisible by patch {patch}")
        self.patch = patch
        self.grid = input_size // patch
        self.patch_embed = nn.Linear(in_channels * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid * self.grid + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, attn) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        g, p = self.grid, self.patch
        x = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@MODELS.register("vit_tiny")
def vit_tiny(num_classes: int = 10, in_channels: int = 1, input_size: int = 28,
             patch_size: int | None = None, dim: int = 64, depth: int = 4, heads: int = 4,
             mlp_ratio: float = 2.0, attn: str = "linear") -> nn.Module:
    """A small patch Transformer; ``attn="mha"`` uses ``nn.MultiheadAttention`` instead."""
    if patch_size is None:
        patch_size = 7 if input_size % 7 == 0 else 4
    _check_positive(num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                    patch_size=patch_size, dim=dim, depth=depth, heads=heads)
    if attn not in ("linear", "mha"):
        raise BadInput(f"vit attn must be 'linear' or 'mha', got {attn!r}")
    model = ViT(in_channels, input_size, patch_size, dim, depth, heads, mlp_ratio,
                num_classes, attn)
    return _declare(model, (in_channels, input_size, input_size), "image")
