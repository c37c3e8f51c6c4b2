"""Real data sets in their standard on-disk layouts (``--data``).

``--data`` takes a path, optionally prefixed with the reader to use when the layout is
ambiguous: ``npz:``, ``cifar10:``, ``cifar100:``, ``mnist-idx:``, ``imagefolder:``,
``seqdir:``. Without a prefix the layout is detected and a log line names the reader.

=============== ===========================================================================
reader          layout
=============== ===========================================================================
npz             ``.npz`` with x, y[, split]; or a directory with x.npy, y.npy[, split.npy]
                (memory-mapped)
cifar10         ``data_batch_1..5``, ``test_batch``, ``batches.meta`` (restricted unpickler)
cifar100        ``train``, ``test``, ``meta`` (fine labels; restricted unpickler)
mnist-idx       ``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, ``t10k-*``
imagefolder     ``train/<class>/*.png|jpg``, ``val/<class>/...`` or Tiny-ImageNet's
                ``val/images`` + ``val_annotations.txt``; decoded lazily with Pillow
seqdir          ``[train|test/]<class>/*.npy|npz`` clips, or a ``labels.csv`` listing them
=============== ===========================================================================
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput, InputNotFound, UsageError, opt
from ..fsutil import expand_user
from ..logs import log
from .base import ArraySource, ConcatSource, Dataset
from .imagefolder import has_images, read_imagefolder
from .pipeline import (
    NORMALIZE_CHOICES,
    Batch,
    Preprocess,
    Split,
    check_classes,
    epoch_batches,
    iterate,
    make_split,
    resolve_preprocess,
    sequential,
)
from .readers import (
    CIFAR10_DIR,
    CIFAR100_DIR,
    CLIP_EXT,
    LABEL_FILES,
    find_idx,
    load_clip,
    read_cifar,
    read_mnist_idx,
    read_npz,
    read_seqdir,
)

__all__ = ["READERS", "NORMALIZE_CHOICES", "Batch", "Dataset", "Preprocess", "Split", "check_classes",
           "describe_dataset", "epoch_batches", "iterate", "make_split", "open_dataset", "parse_spec",
           "resolve_preprocess", "sequential"]


READERS: dict[str, Callable[[Path], Dataset]] = {
    "npz": read_npz,
    "cifar10": lambda p: read_cifar(p, 10),
    "cifar100": lambda p: read_cifar(p, 100),
    "mnist-idx": read_mnist_idx,
    "imagefolder": read_imagefolder,
    "seqdir": read_seqdir,
}

LOOKED_FOR = ("an .npz file (x, y[, split]) or x.npy + y.npy; CIFAR-10 batches (data_batch_1..5, "
              "test_batch); CIFAR-100 (train, test, meta); MNIST IDX (train-images-idx3-ubyte[.gz], "
              "train-labels-idx1-ubyte[.gz]); image class folders ([train/]<class>/*.png|jpg); "
              "sequence clips ([train/]<class>/*.npy|npz or labels.csv)")


def parse_spec(spec: str | Path) -> tuple[str | None, Path]:
    """``reader:path`` -> (reader, path); a plain path -> (None, path). A ``~`` at the start
    of the path, with or without the prefix, is the user's home (:func:`expand_user`)."""
    s = str(expand_user(spec))
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9_-]+):(.+)", s)
    if m:
        name = m.group(1).lower()
        if name in READERS:
            return name, Path(m.group(2))
        if not Path(s).exists():
            raise UsageError(f"{opt('data')} {s}: unknown reader {m.group(1)!r}; choose one of "
                             f"{', '.join(READERS)} (e.g. cifar10:/data/cifar-10-batches-py)")
    return None, Path(s)


def _dir_has(d: Path, ext: tuple[str, ...], limit: int = 3) -> bool:
    if not d.is_dir():
        return False
    for c in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))[:limit]:
        if any(p.suffix.lower() in ext for p in c.rglob("*")):
            return True
    return False


def detect(path: Path) -> tuple[str, str]:
    """(reader, why) for a path given without a reader prefix."""
    if path.is_file():
        if path.suffix.lower() == ".npz" or zipfile.is_zipfile(path):
            return "npz", ".npz file"
        raise BadInput(f"{path} is a file but not an .npz; {opt('data')} also takes a directory holding "
                       f"{LOOKED_FOR}")
    p = path
    if (p / "data_batch_1").is_file() or (p / "test_batch").is_file() or (p / CIFAR10_DIR).is_dir():
        return "cifar10", "CIFAR-10 python batches"
    if ((p / "meta").is_file() and ((p / "train").is_file() or (p / "test").is_file())) \
            or (p / CIFAR100_DIR).is_dir():
        return "cifar100", "CIFAR-100 python files"
    if find_idx(p, "train-images") or find_idx(p, "t10k-images"):
        return "mnist-idx", "MNIST IDX files"
    if (p / "x.npy").is_file() and (p / "y.npy").is_file():
        return "npz", "x.npy + y.npy, memory-mapped"
    if any((p / n).is_file() for n in LABEL_FILES):
        return "seqdir", "clips listed in a labels file"
    base = p / "train" if (p / "train").is_dir() else p
    if has_images(base):
        return "imagefolder", "class folders of images"
    if _dir_has(base, CLIP_EXT):
        return "seqdir", "class folders of .npy/.npz clips"
    raise BadInput(f"{path}: unknown data layout; looked for {LOOKED_FOR}. Name the reader with a "
                   f"prefix, e.g. imagefolder:{path}")


def open_dataset(spec: str | Path) -> Dataset:
    """Read the data set ``spec`` names (``[reader:]path``) with the right reader."""
    reader, path = parse_spec(spec)
    if not path.exists():
        raise InputNotFound(f"data {path} does not exist")
    why = None
    if reader is None:
        reader, why = detect(path)
    elif reader != "npz" and not path.is_dir():
        raise BadInput(f"{reader}:{path}: the {reader} reader takes a directory")
    ds = READERS[reader](path)
    if why is not None:  # after the read: a file the reader refuses gets its one error line only
        log.info(f"data {path}: {reader} reader ({why})")
    return ds


def _sample(ds: Dataset) -> dict[str, Any]:
    src = ds.splits["train"]
    if isinstance(src, ArraySource | ConcatSource):
        return {"sample_shape": list(src.sample_shape), "dtype": src.dtype,
                "storage": "memory-mapped" if src.mapped else "in memory"}
    if src.kind == "image":
        d = ds.describe_sample() if ds.describe_sample else {}
        return {**d, "storage": "image files, decoded per item"}
    lengths, shape, dtype = set(), None, None
    for f in src.files[:8]:
        try:
            a = load_clip(f)
        except BadInput:
            continue
        lengths.add(a.shape[0])
        shape, dtype = list(a.shape), str(a.dtype)
    return {"sample_shape": shape, "dtype": dtype, "storage": "clip files, read per item",
            "time_steps_vary": len(lengths) > 1}


def describe_dataset(ds: Dataset) -> dict[str, Any]:
    """A JSON-ready description: reader, splits with counts (per class too), classes,
    sample shape and dtype, and notes on what was inferred."""
    k = ds.num_classes
    splits = {}
    for name, src in ds.splits.items():
        labeled = len(src) > 0 and bool((np.asarray(src.labels) >= 0).all())  # -1: no label
        counts = np.bincount(src.labels, minlength=k).tolist() if labeled else None
        splits[name] = {"count": len(src), "from": src.origin, "class_counts": counts}
    return {"path": ds.path, "reader": ds.reader, "family": ds.family, "classes": k,
            "class_names": ds.class_names or ds.classes, "splits": splits, **_sample(ds),
            "derived_test_split": ds.derived_split, "notes": ds.notes}

