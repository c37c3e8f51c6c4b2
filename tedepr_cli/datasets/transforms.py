"""Standard preprocessing per dataset family, in plain torch/Pillow (torchvision does not
import beside the CPU torch).

Every random draw comes from ``numpy.random.default_rng([seed, epoch, sample])``: the
augmentation of a sample depends on nothing but the run's seed, the epoch and the sample's
index, so resumed runs, DataLoader workers and DDP ranks all see the same pixels.

========== ======================================= ================================
family     normalization (``--normalize auto``)     augmentation (``--augment``)
========== ======================================= ================================
cifar10    mean/std constants of CIFAR-10 train     random crop (zero pad 4) + flip
cifar100   mean/std constants of CIFAR-100 train    random crop (zero pad 4) + flip
imagenet   ImageNet constants                       random-resized-crop + flip;
                                                    eval: resize + centre crop
mnist      none (pixels in [0, 1])                  off; random crop (pad 2) on request
generic    none                                     off; random crop (pad 4) + flip
sequence   none                                     none defined
========== ======================================= ================================
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: known per-channel statistics (of the training sets, on [0, 1] pixels)
STATS: dict[str, tuple[list[float], list[float]]] = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    "cifar100": ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]),
    "imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    "mnist": ([0.1307], [0.3081]),
}
#: families whose data is normalized / augmented unless told otherwise
NORMALIZED_BY_DEFAULT = ("cifar10", "cifar100", "imagenet")
AUGMENTED_BY_DEFAULT = ("cifar10", "cifar100", "imagenet")

EVAL_CROP = 0.875  # eval resize: shorter side to size / 0.875, then centre crop (ImageNet)


def augment_policy(family: str) -> str | None:
    """The augmentation ``--augment`` turns on for a family (None: none is defined)."""
    return {"cifar10": "random-crop(pad 4)+flip", "cifar100": "random-crop(pad 4)+flip",
            "imagenet": "random-resized-crop+flip", "mnist": "random-crop(pad 2)",
            "generic": "random-crop(pad 4)+flip"}.get(family)


def rng_for(seed: int, epoch: int, sample: int) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch."""
    return np.random.default_rng([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF, epoch, int(sample)])


def channel_stats(mean: list[float], std: list[float], channels: int) -> tuple[list[float], list[float]]:
    """Constants for ``channels`` channels (3-channel constants averaged for grayscale)."""
    if len(mean) == channels or len(mean) == 1:
        return mean, std
    if channels == 1:
        return [float(np.mean(mean))], [float(np.mean(std))]
    raise ValueError(f"{len(mean)}-channel statistics for {channels}-channel inputs")


def normalize(t: torch.Tensor, mean: list[float], std: list[float], kind: str) -> torch.Tensor:
    """``(t - mean) / std`` per channel (images), per feature or folded channel
    (sequences), per channel block (flat vectors of C-major images), or one scalar."""
    m = torch.tensor(mean, dtype=t.dtype)
    s = torch.tensor(std, dtype=t.dtype)
    if len(mean) == 1:
        return (t - m[0]) / s[0]
    n = t.shape[0]
    if kind == "image":
        return (t - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)
    if kind == "flat":
        v = t.reshape(n, len(mean), -1)
        return ((v - m.view(1, -1, 1)) / s.view(1, -1, 1)).reshape(t.shape)
    f = t.shape[-1]
    rep = f // len(mean)
    return (t - m.repeat_interleave(rep)) / s.repeat_interleave(rep)


def crop_flip(x: torch.Tensor, ids: np.ndarray, seed: int, epoch: int, pad: int, flip: bool) -> torch.Tensor:
    """Random crop of each (C, H, W) sample from its zero-padded version, and a horizontal
    flip with probability 1/2 (the CIFAR recipe)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    out = torch.empty_like(x)
    for k in range(n):
        r = rng_for(seed, epoch, int(ids[k]))
        dy, dx = (int(v) for v in r.integers(0, 2 * pad + 1, size=2))
        img = padded[k, :, dy:dy + h, dx:dx + w]
        if flip and r.random() < 0.5:
            img = img.flip(-1)
        out[k] = img
    return out


# ---------------------------------------------------------------------------- Pillow
def random_resized_crop_box(width: int, height: int, r: np.random.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A crop box (left, top, right, bottom) covering a random 8-100 % of the area with a
    random aspect ratio (Szegedy et al. 2015; torchvision's algorithm, 10 tries then centre)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * r.uniform(*scale)
        aspect = math.exp(r.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(r.integers(0, height - h + 1))
            left = int(r.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def pil_train(img: Any, size: tuple[int, int], r: np.random.Generator) -> Any:
    """ImageNet-style training view: random-resized-crop to ``size`` (h, w) + flip."""
    from PIL import Image

    box = random_resized_crop_box(img.width, img.height, r)
    out = img.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box)
    if r.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def pil_eval(img: Any, size: tuple[int, int]) -> Any:
    """Evaluation view: an image already at ``size`` is kept; otherwise the shorter side is
    resized to size / 0.875 and the centre cropped."""
    from PIL import Image

    h, w = size
    if (img.height, img.width) == (h, w):
        return img
    short = max(h, w) / EVAL_CROP
    scale = short / min(img.width, img.height)
    nw, nh = max(w, int(round(img.width * scale))), max(h, int(round(img.height * scale)))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


def resample_time(a: np.ndarray, steps: int) -> np.ndarray:
    """A clip of any length as ``steps`` evenly spaced frames (repeats frames of short clips)."""
    if len(a) == steps:
        return a
    idx = np.round(np.linspace(0, len(a) - 1, steps)).astype(np.int64)
    return a[idx]
