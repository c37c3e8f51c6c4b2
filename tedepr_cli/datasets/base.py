"""What every reader returns: a :class:`Dataset` of named splits, each a *source* of raw
samples addressable by index, with all labels known up front (so splitting, stratifying
and label checks never decode a sample).

Two kinds of source: :class:`ArraySource` (rows of one array, in memory or memory-mapped:
indexing reads only the rows asked for) and :class:`ItemSource` (one file per sample,
decoded only when a batch needs it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadInput


@dataclass
class ArraySource:
    """Samples that are rows of ``x`` (``rows`` selects and orders them; None = all)."""

    x: np.ndarray
    labels: np.ndarray
    origin: str
    rows: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Raw samples ``ids`` (positions in this source) as one array."""
        rows = ids if self.rows is None else self.rows[ids]
        return np.asarray(self.x[rows])

    @property
    def mapped(self) -> bool:
        return isinstance(self.x, np.memmap) or isinstance(getattr(self.x, "base", None), np.memmap)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    @property
    def dtype(self) -> str:
        return str(self.x.dtype)


@dataclass
class ItemSource:
    """Samples stored one per file; ``kind`` is ``image`` (decoded with Pillow) or ``clip``
    (a ``.npy``/``.npz`` array of frame features)."""

    files: list[Path]
    labels: np.ndarray
    origin: str
    kind: str

    def __len__(self) -> int:
        return len(self.labels)


def class_dirs(d: Path) -> list[Path]:
    """The class folders of ``d`` (sorted names, hidden ones skipped, as torchvision's ImageFolder)."""
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_class_folders(d: Path, classes: list[str], list_files: Callable[[Path], list[Path]],
                       what: str, origin: str, kind: str) -> ItemSource:
    """One file per sample from ``d/<class>/``, labelled by the training ``classes``.

    A class the training split lacks, or a class folder without any ``what``, is bad input:
    the model could not predict it, or the folder was left empty by mistake.
    """
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    index = {c: i for i, c in enumerate(classes)}
    for c in class_dirs(d):
        if c.name not in index:
            raise BadInput(f"{c}: class {c.name!r} is not among the {len(classes)} training classes")
        got = list_files(c)
        if not got:
            empty.append(c.name)
        files += got
        labels += [index[c.name]] * len(got)
    if empty:
        more = f" and {len(empty) - 5} more" if len(empty) > 5 else ""
        raise BadInput(f"{d}: class folder(s) with no {what}: {', '.join(empty[:5])}{more}")
    return ItemSource(files, np.asarray(labels, np.int64), origin, kind)


@dataclass
class ConcatSource:
    """Two or more array sources read as one (``--split all`` over separate files)."""

    parts: list[ArraySource]
    labels: np.ndarray = field(init=False)
    origin: str = field(init=False)

    def __post_init__(self) -> None:
        self.labels = np.concatenate([p.labels for p in self.parts])
        self.origin = " + ".join(p.origin for p in self.parts)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        part = np.searchsorted(self._starts, ids, side="right") - 1
        out = None
        for k, p in enumerate(self.parts):
            sel = np.flatnonzero(part == k)
            if not len(sel):
                continue
            got = p.take(ids[sel] - self._starts[k])
            if out is None:
                out = np.empty((len(ids), *got.shape[1:]), dtype=got.dtype)
            out[sel] = got
        assert out is not None
        return out

    @property
    def mapped(self) -> bool:
        return any(p.mapped for p in self.parts)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.parts[0].sample_shape

    @property
    def dtype(self) -> str:
        return self.parts[0].dtype


Source = ArraySource | ItemSource | ConcatSource

#: families decide the standard preprocessing (see :mod:`.transforms`)
FAMILIES = ("cifar10", "cifar100", "imagenet", "mnist", "generic", "sequence", "tokens")


@dataclass
class Dataset:
    """A labelled data set as a reader found it: ``train`` and ``test`` sources, class
    names where the format has them, and notes on what was inferred."""

    reader: str
    family: str
    path: str
    splits: dict[str, Source]
    classes: list[str] | None = None
    class_names: list[str] | None = None
    derived_split: bool = False
    notes: list[str] = field(default_factory=list)
    describe_sample: Callable[[], dict[str, Any]] | None = None
    input_names: tuple[str, ...] = ()  # token data: the int arrays stacked per sample
    labeled: bool = True  # False: every label is -1 (token data without labels)

    @property
    def num_classes(self) -> int:
        if not self.labeled:
            return 0
        if self.classes is not None:
            return len(self.classes)
        return int(max(int(s.labels.max()) for s in self.splits.values() if len(s)) + 1)

    def split(self, which: str) -> Source:
        """The ``train``, ``test`` or ``all`` source."""
        if which not in ("train", "test", "all"):
            raise BadInput(f"split must be one of train, test, all, got {which!r}")
        if which != "all":
            if which not in self.splits or not len(self.splits[which]):
                raise BadInput(f"{self.path} has no samples in the {which!r} split")
            return self.splits[which]
        parts = [self.splits[k] for k in ("train", "test") if k in self.splits and len(self.splits[k])]
        if len(parts) == 1:
            return parts[0]
        a, b = parts
        if isinstance(a, ItemSource) and isinstance(b, ItemSource):
            return ItemSource(a.files + b.files, np.concatenate([a.labels, b.labels]),
                              f"{a.origin} + {b.origin}", a.kind)
        if isinstance(a, ArraySource) and isinstance(b, ArraySource) and a.x is b.x \
                and a.rows is not None and b.rows is not None:
            rows = np.concatenate([a.rows, b.rows])
            order = np.argsort(rows, kind="stable")  # file order, as the array holds them
            return ArraySource(a.x, np.concatenate([a.labels, b.labels])[order], f"{a.origin} + {b.origin}",
                               rows[order])
        return ConcatSource([a, b])  # type: ignore[list-item]


def validate_labels(y: Any, where: str, n: int | None = None) -> np.ndarray:
    """Integer, non-negative, 1-D labels (one per sample when ``n`` is given) as int64."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise BadInput(f"{where}: labels must be 1-D, got shape {y.shape}")
    if n is not None and len(y) != n:
        raise BadInput(f"{where}: {n} samples but {len(y)} labels")
    if len(y) and not np.issubdtype(y.dtype, np.integer):
        raise BadInput(f"{where}: labels must be integers, got {y.dtype}")
    if len(y) and y.min() < 0:
        raise BadInput(f"{where}: labels must be >= 0, found {int(y.min())}")
    return y.astype(np.int64)
