"""Labelled data from ``.npz`` files, presented in the layout a model declares (the other
``--data`` layouts - CIFAR, MNIST IDX, image folders, sequence clips - live in
:mod:`tedepr_cli.datasets`, which builds on :func:`present`).

An ``.npz`` holds ``x`` (samples, any layout: ``N×H×W``, ``N×C×H×W``, ``N×H×W×C``,
``N×T×F`` or ``N×F``; ``uint8`` is scaled to [0, 1], floats are used as they are), ``y``
(integer labels) and optionally ``split`` (0 = train, 1 = test). Without ``split`` a
stratified 80/20 split with seed 0 is derived, so "test" always means the same samples.

:func:`present` turns raw samples into the model's ``input_shape`` for its
``input_kind``: flat vectors, images (centred zero-padding up to the model's size, e.g.
MNIST 28×28 -> 32×32 for CIFAR-style nets) or sequences (image rows as time steps).

A *token* ``.npz`` (for models whose first layer is an embedding) holds integer arrays
instead: ``input_ids`` ``[N, L]``, optionally ``attention_mask`` ``[N, L]`` (0/1),
``token_type_ids`` ``[N, L]``, ``labels`` ``[N]`` (without them the data is unlabeled:
distillation and cosine-to-reference metrics, no accuracy) and ``split``. The arrays are
stacked into one int64 array ``[N, k, L]`` in :data:`~tedepr_cli.surgery.TOKEN_ARRAYS` order
(``input_ids`` alone stays ``[N, L]``); :func:`tedepr_cli.surgery.call_args` hands them to
the model's forward by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import BadInput, InputNotFound, opt
from .safeload import open_npz
from .surgery import TOKEN_ARRAYS

SPLITS = ("train", "test", "all")
NO_LABEL = -1  # the label of every sample of an unlabeled (token) data set


@dataclass
class ArrayData:
    """Raw samples and labels held in memory."""

    x: np.ndarray
    y: np.ndarray
    split: np.ndarray
    path: str
    input_names: tuple[str, ...] = ()  # token data: the arrays stacked in x (TOKEN_ARRAYS order)
    labeled: bool = True

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, which: str) -> ArrayData:
        if which not in SPLITS:
            raise BadInput(f"split must be one of {', '.join(SPLITS)}, got {which!r}")
        if which == "all":
            return self
        keep = self.split == (1 if which == "test" else 0)
        if not keep.any():
            raise BadInput(f"{self.path} has no samples in the {which!r} split")
        return ArrayData(self.x[keep], self.y[keep], self.split[keep], self.path, self.input_names,
                         self.labeled)

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0


def stratified_split(y: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """0/1 test flags with ``test_fraction`` of every class in the test split."""
    rng = np.random.default_rng(seed)
    flags = np.zeros(len(y), dtype=np.uint8)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        flags[idx[: int(round(len(idx) * test_fraction))]] = 1
    return flags


def load_npz(path: str | Path) -> ArrayData:
    """Read and validate an ``.npz`` data file (never unpickles: ``allow_pickle=False``)."""
    p = Path(path)
    if not p.exists():
        raise InputNotFound(f"data file {p} does not exist")
    if p.is_dir():
        raise InputNotFound(f"data {p} is a directory, expected an .npz file")
    with open_npz(p, "data file") as f:
        keys = set(f.files)
        if "x" not in keys and "input_ids" in keys:
            return _token_npz(p, {k: f[k] for k in keys})
        if not {"x", "y"} <= keys:
            raise BadInput(f"{p} must hold arrays 'x' and 'y' (found: {sorted(keys)})")
        x, y = f["x"], f["y"]
        split = f["split"] if "split" in keys else None
    if len(y) == 0 or x.ndim == 0 or len(x) == 0:
        raise BadInput(f"{p} holds no samples")
    if y.ndim != 1 or len(y) != len(x):
        raise BadInput(f"{p}: y must be 1-D with one label per sample "
                       f"(x has {len(x)} samples, y has shape {y.shape})")
    if not np.issubdtype(y.dtype, np.integer):
        raise BadInput(f"{p}: labels y must be integers, got {y.dtype}")
    if y.min() < 0:
        raise BadInput(f"{p}: labels must be >= 0, found {int(y.min())}")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise BadInput(f"{p}: x must be numeric, got {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise BadInput(f"{p}: x contains NaN or Inf")
    if split is None:
        split = stratified_split(y)
    elif split.shape != y.shape or not np.isin(split, (0, 1)).all():
        raise BadInput(f"{p}: 'split' must hold one 0 (train) or 1 (test) per sample")
    return ArrayData(x, y.astype(np.int64), split.astype(np.uint8), str(p))


def _token_npz(p: Path, arrays: dict[str, np.ndarray]) -> ArrayData:
    """A token data set from the arrays of ``p`` (see the module docstring)."""
    unknown = sorted(set(arrays) - {*TOKEN_ARRAYS, "labels", "split"})
    if unknown:
        raise BadInput(f"{p}: a token .npz holds {', '.join(TOKEN_ARRAYS)}, labels and split; found "
                       f"also {unknown}")
    ids = arrays["input_ids"]
    if ids.ndim != 2 or not len(ids) or not ids.shape[1]:
        raise BadInput(f"{p}: input_ids must be [samples, tokens] with at least one of each, got shape "
                       f"{ids.shape}")
    stack = []
    for name in TOKEN_ARRAYS:
        a = arrays.get(name)
        if a is None:
            if name == "attention_mask" and "token_type_ids" in arrays:
                a = np.ones_like(ids)  # stacked in order: the mask is all ones
            else:
                continue
        if a.shape != ids.shape or not np.issubdtype(a.dtype, np.integer):
            raise BadInput(f"{p}: {name} must be an integer array of the shape of input_ids {ids.shape}, got "
                           f"{a.dtype} {a.shape}")
        if a.min() < 0:
            raise BadInput(f"{p}: {name} must be >= 0, found {int(a.min())}")
        if name == "attention_mask" and a.max() > 1:
            raise BadInput(f"{p}: attention_mask must hold 0/1, found {int(a.max())}")
        stack.append((name, a.astype(np.int64)))
    names = tuple(n for n, _ in stack)
    x = stack[0][1] if len(stack) == 1 else np.stack([a for _, a in stack], axis=1)
    y = arrays.get("labels")
    labeled = y is not None
    if y is None:
        y = np.full(len(ids), NO_LABEL, dtype=np.int64)
    elif (y.ndim != 1 or len(y) != len(ids) or not np.issubdtype(y.dtype, np.integer)
          or y.min() < 0):
        raise BadInput(f"{p}: labels must be one integer >= 0 per sample ({len(ids)} samples), got "
                       f"{y.dtype} {y.shape}")
    split = arrays.get("split")
    if split is None:
        split = stratified_split(y)
    elif split.shape != y.shape or not np.isin(split, (0, 1)).all():
        raise BadInput(f"{p}: 'split' must hold one 0 (train) or 1 (test) per sample")
    return ArrayData(x, y.astype(np.int64), split.astype(np.uint8), str(p), names, labeled)


def present_tokens(x: np.ndarray, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Token arrays ``x`` (``[N, L]`` ids or ``[N, k, L]`` stacked) as int64 model inputs:
    no scaling, no normalization; the length ``L`` must be the model's."""
    if not np.issubdtype(x.dtype, np.integer):
        raise BadInput(f"a model that takes token ids needs integer samples (a token .npz: input_ids"
                       f"[, attention_mask, token_type_ids, labels]), got {x.dtype} samples")
    s, want = tuple(x.shape[1:]), tuple(input_shape)
    if s[-1:] != want[-1:] or len(s) not in (len(want), len(want) + 1):
        raise BadInput(f"token samples of shape {s} do not match the model's input of {want} token ids "
                       f"(pass the {opt('input-shape')} the data has)")
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))


def _as_float(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if x.dtype == np.uint8:
        return t.to(torch.float32) / 255.0
    return t.to(torch.float32)


def present(x: np.ndarray, input_shape: tuple[int, ...], kind: str) -> torch.Tensor:
    """Raw samples ``x`` (N, ...) as float32 model inputs of shape (N, *input_shape)
    (``tokens``: int64 ids, :func:`present_tokens`)."""
    if kind == "tokens":
        return present_tokens(x, input_shape)
    t = _as_float(x)
    n, s = t.shape[0], tuple(t.shape[1:])
    want = tuple(input_shape)
    if kind == "flat":
        if math.prod(s) != math.prod(want):
            raise BadInput(f"samples of shape {s} ({math.prod(s)} values) cannot feed a model "
                           f"expecting {math.prod(want)} features")
        return t.reshape(n, *want)
    if kind == "sequence":
        if len(s) == 3:  # images C,H,W -> rows as time steps, channels folded into features
            t = t.permute(0, 2, 1, 3).reshape(n, s[1], s[0] * s[2])
            s = tuple(t.shape[1:])
        if s != want:
            raise BadInput(f"samples of shape {s} do not match the model's sequence shape "
                           f"{want} (time steps, features)")
        return t
    if kind != "image":
        raise BadInput(f"unknown input kind {kind!r}")
    c, h, w = want
    if len(s) == 1:
        side = math.isqrt(s[0] // c) if s[0] % c == 0 else 0
        if side * side * c != s[0]:
            raise BadInput(f"flat samples of {s[0]} values are not square {c}-channel images")
        t, s = t.reshape(n, c, side, side), (c, side, side)
    elif len(s) == 2:
        t, s = t.unsqueeze(1), (1, *s)
    elif len(s) == 3 and s[0] != c and s[2] == c:  # N,H,W,C -> N,C,H,W
        t = t.permute(0, 3, 1, 2)
        s = tuple(t.shape[1:])
    if len(s) != 3 or s[0] != c:
        raise BadInput(f"samples of shape {s} do not match the model's input {want}: channel "
                       f"count differs (set in_channels in {opt('arch-kwargs')})")
    if s[1] > h or s[2] > w:
        raise BadInput(f"samples of size {s[1]}x{s[2]} are larger than the model's input "
                       f"{h}x{w} (set input_size in {opt('arch-kwargs')})")
    if (s[1], s[2]) != (h, w):
        top, left = (h - s[1]) // 2, (w - s[2]) // 2
        t = torch.nn.functional.pad(t, (left, w - s[2] - left, top, h - s[1] - top))
    return t.contiguous()


def check_labels(y: np.ndarray | torch.Tensor, num_classes: int, where: str) -> None:
    """Labels must index the model's outputs."""
    top = int(y.max()) if len(y) else -1
    if top >= num_classes:
        raise BadInput(f"{where}: label {top} is out of range for a model with "
                       f"{num_classes} outputs (set num_classes in {opt('arch-kwargs')})")
