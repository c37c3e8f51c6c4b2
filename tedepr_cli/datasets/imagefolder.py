"""Image-folder trees (ImageNet / Tiny-ImageNet layout), decoded lazily with Pillow.

``root/train/<class>/**/*.png|jpg`` gives the classes (sorted folder names, as
torchvision's ImageFolder) and the training images; the test split is ``root/val/`` (or
``root/test/``) in the same class-folder layout, or Tiny-ImageNet's ``val/images/*.JPEG``
with ``val/val_annotations.txt``. A root holding class folders directly is one pool split
80/20 (stratified, seed 0). ``words.txt`` (Tiny-ImageNet) supplies human class names.
Only file names are listed when opening: pixels are read per item, in the batch that
needs them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import BadInput, UnsafeInput
from .base import Dataset, ItemSource, class_dirs, scan_class_folders

IMAGE_EXT = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"})
TEST_DIRS = ("val", "test")


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXT


def images_under(d: Path) -> list[Path]:
    """Image files anywhere below ``d``, in a fixed (sorted) order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(d):
        dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
        out += [Path(dirpath) / f for f in sorted(filenames) if is_image(f) and not f.startswith(".")]
    return out


def has_images(d: Path) -> bool:
    """Whether some class folder below ``d`` holds an image (stops at the first one)."""
    for c in class_dirs(d):
        for _, _dirs, filenames in os.walk(c):
            if any(is_image(f) for f in filenames):
                return True
    return False


def _scan(d: Path, classes: list[str], origin: str) -> ItemSource:
    return scan_class_folders(d, classes, images_under, f"images ({', '.join(sorted(IMAGE_EXT))})",
                              origin, "image")


def _annotated(d: Path, classes: list[str]) -> ItemSource:
    """Tiny-ImageNet's ``val/images/*.JPEG`` + ``val/val_annotations.txt``."""
    ann = d / "val_annotations.txt"
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2:
            raise BadInput(f"{ann}:{n}: expected 'file<TAB>class[...]', got {line!r}")
        name, wnid = parts[0], parts[1]
        if wnid not in index:
            raise BadInput(f"{ann}:{n}: class {wnid!r} is not among the {len(classes)} training classes")
        p = d / "images" / name
        if not (p.resolve().is_relative_to(d.resolve()) and (d / name).resolve().is_relative_to(d.resolve())):
            raise UnsafeInput(f"{ann}:{n}: {name!r} points outside {d}")
        if not (p.is_file() or (d / name).is_file()):
            raise BadInput(f"{ann}:{n}: image {name!r} not found in {d / 'images'}")
        files.append(p if p.is_file() else d / name)
        labels.append(index[wnid])
    if not files:
        raise BadInput(f"{ann} lists no images")
    return ItemSource(files, np.asarray(labels, np.int64), f"{d.name}/val_annotations.txt", "image")


def _words(root: Path, classes: list[str]) -> list[str] | None:
    f = root / "words.txt"
    if not f.is_file():
        return None
    table = {}
    for line in f.read_text(errors="replace").splitlines():
        wnid, _, names = line.partition("\t")
        if names:
            table[wnid.strip()] = names.split(",")[0].strip()
    return [table.get(c, c) for c in classes] if any(c in table for c in classes) else None


def read_imagefolder(path: Path) -> Dataset:
    """The image-folder reader (see the module docstring for the layouts)."""
    from .readers import split_pool

    notes: list[str] = []
    train_dir = path / "train"
    if train_dir.is_dir():
        classes = [c.name for c in class_dirs(train_dir)]
        if not classes:
            raise BadInput(f"{train_dir}: no class folders (expected train/<class>/*.png|jpg)")
        splits = {"train": _scan(train_dir, classes, "train/")}
        for name in TEST_DIRS:
            d = path / name
            if not d.is_dir():
                continue
            labelled = (d / "val_annotations.txt").is_file() or any(c.name in classes for c in class_dirs(d))
            if not labelled:
                notes.append(f"{name}/ has no class folders or annotations (unlabelled): ignored")
            elif "test" in splits:
                notes.append(f"{name}/ ignored: val/ is the test split")
            elif (d / "val_annotations.txt").is_file():
                splits["test"] = _annotated(d, classes)
            else:
                splits["test"] = _scan(d, classes, f"{name}/")
        derived = "test" not in splits
        if derived:
            pool = splits.pop("train")
            splits = split_pool(pool.files, pool.labels, "train/", "image")
            notes.append("no labelled val/ or test/: stratified 80/20 test split of train/ with seed 0")
    else:
        classes = [c.name for c in class_dirs(path)]
        if not classes:
            raise BadInput(f"{path}: no class folders (expected [train/]<class>/*.png|jpg)")
        pool = _scan(path, classes, "class folders")
        splits = split_pool(pool.files, pool.labels, "class folders", "image")
        derived = True
        notes.append("no train/ and val/: stratified 80/20 test split with seed 0")
    if not len(splits["train"]):
        raise BadInput(f"{path}: no training images found")
    return Dataset("imagefolder", "imagenet", str(path), splits, classes=classes,
                   class_names=_words(path, classes), derived_split=derived, notes=notes,
                   describe_sample=lambda: _peek(splits["train"]))


def _peek(src: ItemSource, n: int = 8) -> dict[str, object]:
    """Shape of the first few training images (headers only)."""
    from PIL import Image, UnidentifiedImageError

    sizes, modes = set(), set()
    for f in src.files[:n]:
        try:
            with Image.open(f) as im:
                sizes.add(im.size)
                modes.add(im.mode)
        except (OSError, UnidentifiedImageError):
            continue
    if not sizes:
        return {"sample_shape": None, "dtype": "uint8", "image_modes": []}
    w, h = sorted(sizes)[0]
    c = 1 if modes <= {"L", "1", "P"} else 3
    return {"sample_shape": [h, w, c], "dtype": "uint8", "image_modes": sorted(modes),
            "sizes_vary": len(sizes) > 1}
