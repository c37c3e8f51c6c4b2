"""From a :class:`~.base.Dataset` to model-ready batches: the :class:`Split` interface
that training and evaluation use, the preprocessing recipe, and deterministic batching.

``Split.batch(indices, epoch)`` returns ``(x, y)`` tensors for positions ``indices`` of the
split: raw samples are read (rows of an array, memory-mapped or not, or files decoded one
by one), presented in the model's ``input_shape``/``input_kind`` (:func:`..data.present`),
augmented (training splits only, randomness from ``seed + epoch + sample``) and
normalized. Small in-memory arrays without augmentation are presented once and cached,
which keeps the sample ``.npz`` as fast as a plain tensor.

:func:`epoch_batches` is the (DistributedSampler-style) sharding: every rank draws the
same permutation from ``seed`` and ``epoch`` alone and takes a strided share of each
global batch, so a resumed run, a single process and N ranks all see the same global
batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from ..data import present
from ..errors import BadInput, UsageError, opt
from ..logs import log
from . import transforms as T
from .base import ArraySource, ConcatSource, Dataset, ItemSource, Source

NORMALIZE_CHOICES = ("auto", "standard", "computed", "none")
CACHE_BYTES = 256 * 2**20  # present small in-memory arrays once
STATS_SAMPLES = 2048  # training samples --normalize computed looks at


@dataclass
class Preprocess:
    """How raw samples become model inputs; stored in the artifact manifest (``data``)."""

    family: str
    normalize: str  # none | standard | computed | recorded
    mean: list[float] | None = None
    std: list[float] | None = None
    augment: str | None = None  # the policy applied to training batches, or None
    seed: int = 0
    eval_view: str | None = None  # image files: how evaluation images reach the model size

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    skipped: int  # unreadable samples left out of this batch
    error: str | None  # the first such file and why


def _image_target(input_shape: tuple[int, ...], kind: str) -> tuple[int, int, int]:
    """(C, H, W) an image must be resized to before it is presented as ``kind``."""
    if kind == "image":
        c, h, w = input_shape
        return c, h, w
    if kind == "sequence":
        t, f = input_shape
        return 1, t, f
    n = math.prod(input_shape)
    for c in (1, 3):
        side = math.isqrt(n // c)
        if n % c == 0 and side * side * c == n:
            return c, side, side
    raise BadInput(f"a model with {n} flat inputs cannot take images (not C x S x S for C in 1, 3)")


def _channels(input_shape: tuple[int, ...], kind: str) -> int:
    if kind == "image":
        return input_shape[0]
    if kind == "sequence":
        return input_shape[-1]
    n = math.prod(input_shape)
    return 1 if math.isqrt(n) ** 2 == n else (3 if n % 3 == 0 else 1)


class Split:
    """One split of a data set as the model sees it: ``len``, ``labels`` and
    ``batch(indices, epoch) -> (x, y)``."""

    def __init__(self, source: Source, ids: np.ndarray, input_shape: tuple[int, ...], kind: str,
                 pre: Preprocess, train: bool = False, strict: bool = False, where: str = "") -> None:
        self.source, self.ids = source, np.asarray(ids, dtype=np.int64)
        self.input_shape, self.kind, self.pre = tuple(input_shape), kind, pre
        self.train, self.strict, self.where = train, strict, where
        self.labels_np = source.labels[self.ids]
        self.labels = torch.from_numpy(self.labels_np)
        self._cache: torch.Tensor | None = None
        self._checked_finite = isinstance(source, ArraySource) and not source.mapped

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def augment(self) -> str | None:
        return self.pre.augment if self.train else None

    def subset(self, positions: np.ndarray, train: bool | None = None) -> Split:
        """The samples at ``positions`` (e.g. a validation share), as a training split or not."""
        return Split(self.source, self.ids[np.asarray(positions, dtype=np.int64)], self.input_shape,
                     self.kind, self.pre, self.train if train is None else train, self.strict, self.where)

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor, epoch: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.load(indices, epoch)
        return b.x, b.y

    def load(self, indices: Sequence[int] | np.ndarray | torch.Tensor, epoch: int = 0) -> Batch:
        """Inputs and labels of positions ``indices``; unreadable files are skipped (and
        counted) unless the split is strict."""
        pos = np.asarray(indices.numpy() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        if isinstance(self.source, ItemSource):
            return self._load_items(pos, epoch)
        if self._cacheable():
            if self._cache is None:
                self._cache = self._present(self.ids, epoch)
            return Batch(self._cache[torch.from_numpy(pos)], self.labels[torch.from_numpy(pos)], 0, None)
        return Batch(self._present(self.ids[pos], epoch), self.labels[torch.from_numpy(pos)], 0, None)

    def _cacheable(self) -> bool:
        src = self.source
        return (isinstance(src, ArraySource) and not src.mapped and self.augment is None
                and len(self.ids) * math.prod(self.input_shape) * 4 <= CACHE_BYTES)

    def _present(self, sids: np.ndarray, epoch: int) -> torch.Tensor:
        assert isinstance(self.source, ArraySource | ConcatSource)
        x = present(self.source.take(sids), self.input_shape, self.kind)
        if not self._checked_finite and x.is_floating_point() and not torch.isfinite(x).all():
            raise BadInput(f"{self.where}: samples contain NaN or Inf")
        return self._finish(x, sids, epoch, arrays=True)

    def _finish(self, x: torch.Tensor, sids: np.ndarray, epoch: int, arrays: bool) -> torch.Tensor:
        aug = self.augment
        if aug is not None and arrays and aug.startswith("random-crop"):
            pad = 2 if "pad 2" in aug else 4
            x = T.crop_flip(x, sids, self.pre.seed, epoch, pad, flip=aug.endswith("flip"))
        if self.pre.mean is not None and self.pre.std is not None:
            x = T.normalize(x, self.pre.mean, self.pre.std, self.kind)
        return x.contiguous()

    def _load_items(self, pos: np.ndarray, epoch: int) -> Batch:
        src = self.source
        assert isinstance(src, ItemSource)
        samples, keep, skipped, first = [], [], 0, None
        for p in pos:
            sid = int(self.ids[p])
            f = src.files[sid]
            try:
                samples.append(self._image(f, sid, epoch) if src.kind == "image" else self._clip(f))
                keep.append(p)
            except _Unreadable as e:
                if self.strict:
                    raise BadInput(f"{f}: {e} (without {opt('strict-data')} unreadable files are "
                                   "skipped)") from None
                skipped += 1
                first = first or f"{f}: {e}"
        y = self.labels[torch.from_numpy(np.asarray(keep, dtype=np.int64))]
        if not samples:
            return Batch(torch.zeros(0, *self.input_shape), y, skipped, first)
        try:
            raw = np.stack(samples)
        except ValueError:
            shapes = sorted({s.shape for s in samples})
            raise BadInput(f"{self.where}: samples of different shapes {shapes[:3]} in one batch") from None
        x = present(raw, self.input_shape, self.kind)
        return Batch(self._finish(x, self.ids[np.asarray(keep, dtype=np.int64)], epoch, arrays=False),
                     y, skipped, first)

    def _image(self, f: Any, sid: int, epoch: int) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        c, h, w = _image_target(self.input_shape, self.kind)
        try:
            with Image.open(f) as im:
                im = im.convert("L" if c == 1 else "RGB")
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            why = str(e).splitlines()[0][:120] if str(e) else ""
            raise _Unreadable(f"unreadable image ({type(e).__name__}: {why})") from None
        if self.augment is not None:
            im = T.pil_train(im, (h, w), T.rng_for(self.pre.seed, epoch, sid))
        else:
            im = T.pil_eval(im, (h, w))
        a = np.asarray(im, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def _clip(self, f: Any) -> np.ndarray:
        from .readers import load_clip

        try:
            a = load_clip(f)
        except BadInput as e:
            raise _Unreadable(str(e).removeprefix(f"{f}: ").removeprefix(f"{f} ")) from None
        if self.kind == "sequence":
            a = T.resample_time(a, self.input_shape[0])
        return np.asarray(a, dtype=np.float32) if a.dtype == np.float64 else a


class _Unreadable(Exception):
    """One sample file could not be read."""


# ---------------------------------------------------------------------------- recipe
def resolve_preprocess(ds: Dataset, input_shape: tuple[int, ...], kind: str, *, normalize: str = "auto",
                       augment: bool | None = None, seed: int = 0, recorded: dict[str, Any] | None = None,
                       strict: bool = False) -> Preprocess:
    """The preprocessing for ``ds`` feeding a model of ``input_shape``/``kind``.

    ``normalize``: ``auto`` uses the statistics recorded in the model's manifest (the model
    was trained on them), else the family default (known constants for CIFAR-10/100 and
    image folders (ImageNet), none otherwise); ``standard`` the family's constants;
    ``computed`` per-channel mean/std of up to 2,048 seeded training samples; ``none``.
    ``augment``: None takes the family default (on for CIFAR and image folders).
    """
    if normalize not in NORMALIZE_CHOICES:
        raise UsageError(f"{opt('normalize')} must be one of {', '.join(NORMALIZE_CHOICES)}, got "
                         f"{normalize!r}")
    fam = ds.family
    if kind == "tokens":  # ids index an embedding: nothing to scale, crop or flip
        if augment:
            raise UsageError(f"{opt('augment')}: no augmentation is defined for token ids (use "
                             f"{opt('no-augment')})")
        if normalize in ("standard", "computed"):
            raise UsageError(f"{opt('normalize')} {normalize}: token ids are not normalized (use auto or "
                             "none)")
        return Preprocess(family=fam, normalize="none", seed=seed)
    train_src = ds.splits["train"]
    items = isinstance(train_src, ItemSource) and train_src.kind == "image"
    pre = Preprocess(family=fam, normalize="none", seed=seed,
                     eval_view="resize(shorter side = size/0.875) + centre crop; images at the model's "
                     "size kept" if items else None)
    # augmentation
    policy = T.augment_policy(fam)
    possible = policy is not None and (items or kind == "image")
    if augment:
        if fam == "sequence" or policy is None:
            raise UsageError(f"{opt('augment')}: no augmentation is defined for sequence features (use "
                             f"{opt('no-augment')})")
        if not possible:
            raise UsageError(f"{opt('augment')} crops and flips images, but this model takes {kind} inputs "
                             f"{tuple(input_shape)} (use {opt('no-augment')})")
        pre.augment = policy
    elif augment is None and fam in T.AUGMENTED_BY_DEFAULT and possible:
        pre.augment = policy
    # normalization
    if normalize == "auto" and recorded is not None and "normalize" in recorded:
        pre.normalize = "recorded" if recorded.get("mean") is not None else "none"
        pre.mean, pre.std = recorded.get("mean"), recorded.get("std")
        return pre
    if normalize == "auto":
        normalize = "standard" if fam in T.NORMALIZED_BY_DEFAULT else "none"
    if normalize == "standard":
        if fam not in T.STATS:
            raise UsageError(f"{opt('normalize')} standard: no standard statistics are known for "
                             f"{ds.reader} data "
                             f"(use computed or none)")
        mean, std = T.STATS[fam]
        if kind == "sequence":  # image rows as time steps: channels folded into the features
            ch = len(mean) if input_shape[-1] % len(mean) == 0 else 1
        else:
            ch = _channels(input_shape, kind)
        try:
            pre.mean, pre.std = T.channel_stats(mean, std, ch)
        except ValueError as e:
            raise BadInput(f"{opt('normalize')} standard: {e}") from None
        pre.normalize = "standard"
    elif normalize == "computed":
        pre.mean, pre.std = compute_stats(ds, input_shape, kind, seed, strict)
        pre.normalize = "computed"
    return pre


def compute_stats(ds: Dataset, input_shape: tuple[int, ...], kind: str, seed: int, strict: bool = False
                  ) -> tuple[list[float], list[float]]:
    """Per-channel (images), per-feature (sequences) or single (flat) mean/std of up to
    2,048 seeded training samples, as the model sees them (eval view, no normalization)."""
    src = ds.splits["train"]
    n = len(src)
    pick = np.sort(np.random.default_rng(seed).permutation(n)[:STATS_SAMPLES])
    raw = Split(src, np.arange(n), input_shape, kind, Preprocess(ds.family, "none", seed=seed),
                strict=strict, where=ds.path)
    s1 = s2 = None
    count = 0
    for i in range(0, len(pick), 256):
        x = raw.batch(pick[i:i + 256])[0].double()
        if kind == "image":
            v = x.transpose(0, 1).reshape(x.shape[1], -1)
        elif kind == "sequence":
            v = x.reshape(-1, x.shape[-1]).t()
        else:
            v = x.reshape(1, -1)
        s1 = v.sum(1) if s1 is None else s1 + v.sum(1)
        s2 = (v * v).sum(1) if s2 is None else s2 + (v * v).sum(1)
        count += v.shape[1]
    if s1 is None or count == 0:
        raise BadInput(f"{ds.path}: no readable training samples to compute statistics on")
    mean = s1 / count
    std = (s2 / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def make_split(ds: Dataset, which: str, input_shape: tuple[int, ...], kind: str, pre: Preprocess,
               train: bool = False, strict: bool = False) -> Split:
    """Split ``which`` (train/test/all) of ``ds`` presented for the model."""
    src = ds.split(which)
    return Split(src, np.arange(len(src)), input_shape, kind, pre, train=train, strict=strict,
                 where=f"{ds.path} ({which})")


def check_classes(ds: Dataset, outputs: int) -> None:
    """The model must have an output for every class of the data."""
    k = ds.num_classes
    if k > outputs:
        top = max(int(s.labels.max()) for s in ds.splits.values() if len(s))
        raise BadInput(f"{ds.path}: the data has {k} classes (labels up to {top}) but the model has "
                       f"{outputs} outputs: label {top} is out of range; build the model with "
                       f"{opt('arch-kwargs')} '{{\"num_classes\": {k}}}'")
    if ds.classes is not None and k < outputs:
        log.info(f"{ds.path}: {k} classes for a model with {outputs} outputs (outputs {k}..{outputs - 1} "
                 f"are never targets)")


# ---------------------------------------------------------------------------- batching
def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1
                  ) -> list[tuple[np.ndarray, int]]:
    """This rank's positions in each global batch of an epoch, with the global batch's size.

    The permutation depends only on ``seed`` and ``epoch`` (exact resume); rank r takes
    every world-th sample of each global batch, so the ranks' shares add up to exactly
    the single-process batch.
    """
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    perm = torch.randperm(n, generator=gen)
    out = []
    for b in range(math.ceil(n / batch_size)):
        idx = perm[b * batch_size:(b + 1) * batch_size]
        out.append((idx[rank::world].numpy(), len(idx)))
    return out


class _BatchSet(torch.utils.data.Dataset):
    """Batch k of a fixed list, loaded in a DataLoader worker."""

    def __init__(self, split: Split, batches: Sequence[np.ndarray], epoch: int) -> None:
        self.split, self.batches, self.epoch = split, batches, epoch

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> Batch:
        return self.split.load(self.batches[k], self.epoch)


def _as_is(b: Batch) -> Batch:
    return b


def iterate(split: Split, batches: Sequence[np.ndarray], epoch: int = 0, workers: int = 0) -> Iterator[Batch]:
    """The batches in order, loaded in this process (``workers=0``) or by a DataLoader with
    ``workers`` processes (the result is the same: no randomness depends on the worker)."""
    if workers <= 0 or len(batches) <= 1 or split._cacheable():  # cached arrays: nothing to read
        for b in batches:
            yield split.load(b, epoch)
        return
    loader = torch.utils.data.DataLoader(_BatchSet(split, batches, epoch), batch_size=None, shuffle=False,
                                         num_workers=workers, collate_fn=_as_is)
    for b in loader:
        yield Batch(*b)


def sequential(n: int, batch_size: int) -> list[np.ndarray]:
    """Positions 0..n-1 in batches (evaluation order)."""
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
