"""Readers for array-shaped formats: ``.npz`` (and a directory of ``x.npy``/``y.npy``,
memory-mapped), CIFAR-10/100 "python version" batches (restricted unpickler), MNIST IDX
files (memory-mapped unless gzipped) and per-clip sequence features (UCF11-style).
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..data import load_npz, stratified_split
from ..errors import BadInput
from ..safeload import load_npy, open_npz
from .base import ArraySource, Dataset, ItemSource, class_dirs, scan_class_folders, validate_labels
from .safepickle import load_data_pickle


def split_pool(x_or_files: Any, labels: np.ndarray, origin: str, kind: str | None = None
               ) -> dict[str, Any]:
    """Train/test sources from one labelled pool: stratified 80/20 with seed 0, like an
    ``.npz`` without ``split`` (so "test" always means the same samples)."""
    flags = stratified_split(labels).astype(bool)
    tr, te = np.flatnonzero(~flags), np.flatnonzero(flags)
    if kind is None:
        return {"train": ArraySource(x_or_files, labels[tr], f"{origin} (80 %)", tr),
                "test": ArraySource(x_or_files, labels[te], f"{origin} (20 %)", te)}
    return {"train": ItemSource([x_or_files[i] for i in tr], labels[tr], f"{origin} (80 %)", kind),
            "test": ItemSource([x_or_files[i] for i in te], labels[te], f"{origin} (20 %)", kind)}


# ---------------------------------------------------------------------------- npz / npy
def read_npz(path: Path) -> Dataset:
    """An ``.npz`` file with x, y[, split], or a directory with x.npy, y.npy[, split.npy]
    (x memory-mapped: larger-than-memory data streams)."""
    if path.is_dir():
        return _read_npy_dir(path)
    d = load_npz(path)
    rows = np.arange(len(d.y))
    tr, te = rows[d.split == 0], rows[d.split == 1]
    splits = {"train": ArraySource(d.x, d.y[tr], "split == 0", tr),
              "test": ArraySource(d.x, d.y[te], "split == 1", te)}
    if d.input_names:
        notes = [] if d.labeled else ["no labels: distillation and cosine to a reference, no accuracy"]
        return Dataset("npz", "tokens", str(path), splits, input_names=d.input_names, labeled=d.labeled,
                       notes=notes)
    return Dataset("npz", "generic", str(path), splits)


def _read_npy_dir(path: Path) -> Dataset:
    if not ((path / "x.npy").is_file() and (path / "y.npy").is_file()):
        raise BadInput(f"{path}: a data directory for the npz reader needs x.npy and y.npy")
    x = load_npy(path / "x.npy", "data array", mmap_mode="r")
    y = load_npy(path / "y.npy", "data array")
    split = load_npy(path / "split.npy", "data array") if (path / "split.npy").is_file() else None
    if x.ndim == 0 or len(x) == 0:
        raise BadInput(f"{path}/x.npy holds no samples")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise BadInput(f"{path}/x.npy must be numeric, got {x.dtype}")
    y = validate_labels(y, f"{path}/y.npy", len(x))
    notes = ["x.npy is memory-mapped: samples are read per batch"]
    if split is None:
        return Dataset("npz", "generic", str(path), split_pool(x, y, "x.npy"), derived_split=True,
                       notes=notes + ["no split.npy: stratified 80/20 test split with seed 0"])
    if split.shape != y.shape or not np.isin(split, (0, 1)).all():
        raise BadInput(f"{path}/split.npy must hold one 0 (train) or 1 (test) per sample")
    rows = np.arange(len(y))
    tr, te = rows[split == 0], rows[split == 1]
    splits = {"train": ArraySource(x, y[tr], "split == 0", tr),
              "test": ArraySource(x, y[te], "split == 1", te)}
    return Dataset("npz", "generic", str(path), splits, notes=notes)


# ---------------------------------------------------------------------------- CIFAR
CIFAR10_DIR, CIFAR100_DIR = "cifar-10-batches-py", "cifar-100-python"


def _plain_keys(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise BadInput(f"{where}: a CIFAR batch is a dict, found {type(d).__name__}")
    return {(k.decode("latin-1") if isinstance(k, bytes) else str(k)): v for k, v in d.items()}


def _names(v: Any) -> list[str]:
    return [s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in v]


def _cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _plain_keys(load_data_pickle(path), str(path))
    if "data" not in d or label_key not in d:
        raise BadInput(f"{path}: a CIFAR batch needs 'data' and '{label_key}' (found {sorted(d)})")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        shape = getattr(x, "shape", None)
        raise BadInput(f"{path}: 'data' must be a uint8 array of N x 3072 (32x32 RGB planes), got "
                       f"{type(x).__name__} {shape}")
    y = validate_labels(np.asarray(d[label_key]), str(path), len(x))
    return x.reshape(-1, 3, 32, 32), y


def read_cifar(path: Path, which: int) -> Dataset:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100
    (``train``, ``test``, ``meta``; fine labels), as extracted from the python tarballs."""
    sub = path / (CIFAR10_DIR if which == 10 else CIFAR100_DIR)
    root = sub if sub.is_dir() else path
    reader = f"cifar{which}"
    if which == 10:
        train_files = sorted(root.glob("data_batch_*"), key=lambda p: (len(p.name), p.name))
        test_file, meta_file, label_key, names_key = root / "test_batch", root / "batches.meta", \
            "labels", "label_names"
        if not train_files:
            raise BadInput(f"{root}: no CIFAR-10 training batches (data_batch_1..5) found")
    else:
        train_files = [root / "train"] if (root / "train").is_file() else []
        test_file, meta_file, label_key, names_key = root / "test", root / "meta", "fine_labels", \
            "fine_label_names"
        if not train_files:
            raise BadInput(f"{root}: no CIFAR-100 'train' file found")
    if not test_file.is_file():
        raise BadInput(f"{root}: the CIFAR-{which} test file '{test_file.name}' is missing")
    xs, ys = zip(*(_cifar_batch(p, label_key) for p in train_files), strict=True)
    tx, ty = _cifar_batch(test_file, label_key)
    notes = []
    if which == 10 and len(train_files) < 5:
        notes.append(f"found {len(train_files)} of the 5 training batches")
    classes = None
    if meta_file.is_file():
        meta = _plain_keys(load_data_pickle(meta_file), str(meta_file))
        if names_key in meta and isinstance(meta[names_key], list):
            classes = _names(meta[names_key])
    if classes is None:
        notes.append(f"no {meta_file.name}: class names unknown")
        classes = [str(i) for i in range(10 if which == 10 else 100)]
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    names = ", ".join(p.name for p in train_files)
    ds = Dataset(reader, reader, str(root), {"train": ArraySource(x, y, names),
                                             "test": ArraySource(tx, ty, test_file.name)},
                 classes=classes, notes=notes)
    for s in ds.splits.values():
        if len(s) and int(s.labels.max()) >= len(classes):
            raise BadInput(f"{root}: label {int(s.labels.max())} but only {len(classes)} class names")
    return ds


# ---------------------------------------------------------------------------- MNIST IDX
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_NAMES = {"train": ("train-images", "train-labels"), "test": ("t10k-images", "t10k-labels")}


def find_idx(root: Path, stem: str) -> Path | None:
    """``train-images-idx3-ubyte`` (or ``.gz``, or the ``train-images.idx3-ubyte`` spelling)."""
    for d in (root, root / "raw"):
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if re.fullmatch(re.escape(stem) + r"[-.]idx\d-ubyte(\.gz)?", p.name) and p.is_file():
                return p
    return None


def read_idx(path: Path) -> np.ndarray:
    """An IDX array: memory-mapped when uncompressed, read into memory when gzipped."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                buf = f.read()
            head = buf[:4]
        else:
            with open(path, "rb") as f:
                head = f.read(4)
                buf = None
    except (OSError, EOFError) as e:
        raise BadInput(f"{path} is not a readable IDX file: {e}") from None
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
        raise BadInput(f"{path} is not an IDX file (bad magic number {head.hex()})")
    dtype, ndim = np.dtype(_IDX_DTYPES[head[2]]), head[3]
    offset = 4 + 4 * ndim
    if buf is None:
        with open(path, "rb") as f:
            f.seek(4)
            dims_raw = f.read(4 * ndim)
        size = path.stat().st_size
    else:
        dims_raw, size = buf[4:offset], len(buf)
    if len(dims_raw) != 4 * ndim:
        raise BadInput(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", dims_raw)
    need = offset + int(np.prod(dims)) * dtype.itemsize
    if size != need:
        raise BadInput(f"{path}: IDX header says {dims} ({need} bytes) but the file has {size} bytes")
    if buf is None:
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(dims))
    return np.frombuffer(buf, dtype=dtype, offset=offset).reshape(dims)


def read_mnist_idx(path: Path) -> Dataset:
    """MNIST-style IDX files (also Fashion-/K-MNIST, EMNIST with the same names)."""
    splits, notes = {}, []
    for split, (img_stem, lab_stem) in _IDX_NAMES.items():
        img, lab = find_idx(path, img_stem), find_idx(path, lab_stem)
        if img is None and lab is None:
            continue
        if img is None or lab is None:
            missing = lab_stem if lab is None else img_stem
            raise BadInput(f"{path}: found {(img or lab).name} but not {missing}-idx*-ubyte[.gz]")
        x = read_idx(img)
        if x.ndim < 2:
            raise BadInput(f"{img}: an image IDX file has at least 2 dimensions, got {x.ndim}")
        y = validate_labels(read_idx(lab), str(lab), len(x))
        splits[split] = ArraySource(x, y, f"{img.name}, {lab.name}")
        notes.append(f"{img.name}: " + ("memory-mapped" if isinstance(x, np.memmap) else "read into memory"))
    if not splits:
        raise BadInput(f"{path}: no MNIST IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte"
                       f"[.gz], t10k-...) found")
    if "train" not in splits:
        raise BadInput(f"{path}: IDX test files found but no train-images/train-labels")
    derived = "test" not in splits
    if derived:
        only = splits.pop("train")
        splits = split_pool(only.x, only.labels, only.origin)
        notes.append("no t10k files: stratified 80/20 test split with seed 0")
    return Dataset("mnist-idx", "mnist", str(path), splits, derived_split=derived, notes=notes)


# ---------------------------------------------------------------------------- sequences
CLIP_EXT = (".npy", ".npz")
LABEL_FILES = ("labels.csv", "labels.tsv", "labels.txt")


def load_clip(path: Path) -> np.ndarray:
    """One clip's features as a (T, F) array (trailing dimensions flattened into F)."""
    if path.suffix == ".npz":
        with open_npz(path, "clip") as f:
            keys = f.files
            key = "x" if "x" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise BadInput(f"{path}: a clip .npz holds one array or 'x' (found {sorted(keys)})")
            a = f[key]
    else:
        a = load_npy(path, "clip", mmap_mode="r")
    if not np.issubdtype(a.dtype, np.number):
        raise BadInput(f"{path}: clip features must be numeric, got {a.dtype}")
    if a.ndim == 1:
        a = a[None]
    if a.ndim > 2:
        a = a.reshape(a.shape[0], -1)
    if a.shape[0] == 0:
        raise BadInput(f"{path}: clip has no time steps")
    return np.asarray(a)


def _clips(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.suffix.lower() in CLIP_EXT and p.is_file())


def read_seqdir(path: Path) -> Dataset:
    """Per-clip features: ``[train|test/]<class>/*.npy|npz``, or clips listed in a labels
    file (``path,label[,split]`` per line; labels are class names or integers)."""
    for name in LABEL_FILES:
        if (path / name).is_file():
            return _seq_from_labels(path, path / name)
    notes: list[str] = []
    if (path / "train").is_dir():
        classes = [c.name for c in class_dirs(path / "train")]
        splits = {}
        for split, sub in (("train", "train"), ("test", "test"), ("test", "val")):
            if split in splits or not (path / sub).is_dir():
                continue
            splits[split] = _seq_split(path / sub, classes, sub)
        if "test" not in splits:
            pool = splits.pop("train")
            splits = split_pool(pool.files, pool.labels, "train/", "clip")
            notes.append("no test/ or val/: stratified 80/20 test split with seed 0")
        return Dataset("seqdir", "sequence", str(path), splits, classes=classes, notes=notes,
                       derived_split=bool(notes))
    classes = [c.name for c in class_dirs(path)]
    pool = _seq_split(path, classes, ".")
    return Dataset("seqdir", "sequence", str(path), split_pool(pool.files, pool.labels, "class folders",
                                                               "clip"),
                   classes=classes, derived_split=True,
                   notes=["no train/ and test/: stratified 80/20 test split with seed 0"])


def _seq_split(d: Path, classes: list[str], origin: str) -> ItemSource:
    src = scan_class_folders(d, classes, _clips, ".npy/.npz clips", f"{origin}/", "clip")
    if not src.files:
        raise BadInput(f"{d}: no class folders with .npy/.npz clips")
    return src


def _seq_from_labels(root: Path, lf: Path) -> Dataset:
    rows = []
    for n, line in enumerate(lf.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in re.split(r"[,\t]" if re.search(r"[,\t]", line) else r"\s+", line)]
        if len(parts) not in (2, 3):
            raise BadInput(f"{lf}:{n}: expected 'path,label[,split]', got {line!r}")
        if n == 1 and parts[0].lower() in ("path", "file", "clip") and parts[1].lower() == "label":
            continue
        rows.append((n, *parts))
    if not rows:
        raise BadInput(f"{lf} lists no clips")
    names = [r[2] for r in rows]
    if all(re.fullmatch(r"\d+", s) for s in names):
        classes, labels = None, [int(s) for s in names]
    else:
        classes = sorted(set(names))
        labels = [classes.index(s) for s in names]
    files = []
    for n, rel, *_ in rows:
        p = (root / rel).resolve()
        if not p.is_relative_to(root.resolve()):
            from ..errors import UnsafeInput

            raise UnsafeInput(f"{lf}:{n}: {rel!r} points outside {root}")
        if not p.is_file():
            raise BadInput(f"{lf}:{n}: clip {rel!r} does not exist")
        files.append(p)
    y = np.asarray(labels, np.int64)
    has_split = all(len(r) == 4 for r in rows)
    if has_split:
        which = [r[3].lower() for r in rows]
        bad = sorted({w for w in which if w not in ("train", "test", "val")})
        if bad:
            raise BadInput(f"{lf}: split must be train, test or val, found {bad}")
        tr = np.asarray([w == "train" for w in which])
        splits = {"train": ItemSource([files[i] for i in np.flatnonzero(tr)], y[tr], lf.name, "clip"),
                  "test": ItemSource([files[i] for i in np.flatnonzero(~tr)], y[~tr], lf.name, "clip")}
        notes = []
    else:
        splits = split_pool(files, y, lf.name, "clip")
        notes = [f"{lf.name} has no split column: stratified 80/20 test split with seed 0"]
    return Dataset("seqdir", "sequence", str(root), splits, classes=classes, notes=notes,
                   derived_split=not has_split)
