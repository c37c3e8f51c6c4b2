"""Real dataset layouts (issue 11): tiny fixtures built here in each exact on-disk layout,
one training step on each through the CLI, the restricted CIFAR unpickler, streaming,
seeded augmentation and the bad-input errors."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import pickletools
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tedepr_cli.datasets import (
    epoch_batches,
    iterate,
    make_split,
    open_dataset,
    resolve_preprocess,
)
from tedepr_cli.datasets.safepickle import load_data_pickle
from tedepr_cli.errors import BadInput, UnsafeInput, UsageError

from .conftest import ROOT, run_cli

# ---------------------------------------------------------------------------- fixtures


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles as Python 2's cPickle did for the CIFAR "python version" files
    (protocol 2): every str/bytes as a py2 ``str`` (BINSTRING), numpy's array builder under
    its Python 2 name ``numpy.core.multiarray._reconstruct``. A plain Python 3 protocol-2
    pickle would instead reference ``_codecs.encode`` for every bytes object."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_str8(self, obj):
        obj = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str8
    dispatch[str] = save_str8

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        module = "numpy" if obj in (np.ndarray, np.dtype) else module
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def _cifar_records(n: int, classes: int, seed: int, label_key: str = "labels") -> dict:
    r = np.random.default_rng(seed)
    d = {"batch_label": f"batch {seed}", label_key: [int(v) for v in np.arange(n) % classes],
         "data": r.integers(0, 256, (n, 3072)).astype(np.uint8),
         "filenames": [f"img_{seed}_{i}.png" for i in range(n)]}
    if label_key == "fine_labels":
        d["coarse_labels"] = [v // 5 for v in d["fine_labels"]]
    return d


def make_cifar10(root: Path, per_batch: int = 4, test: int = 10) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for k in range(1, 6):
        (d / f"data_batch_{k}").write_bytes(py2_pickle(_cifar_records(per_batch, 10, k)))
    (d / "test_batch").write_bytes(py2_pickle(_cifar_records(test, 10, 9)))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (d / "batches.meta").write_bytes(py2_pickle({"label_names": names, "num_cases_per_batch": per_batch,
                                                 "num_vis": 3072}))
    return root


def make_cifar100(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "train").write_bytes(py2_pickle(_cifar_records(12, 100, 1, "fine_labels")))
    (root / "test").write_bytes(py2_pickle(_cifar_records(6, 100, 2, "fine_labels")))
    (root / "meta").write_bytes(py2_pickle({"fine_label_names": [f"c{i}" for i in range(100)],
                                            "coarse_label_names": [f"s{i}" for i in range(20)]}))
    return root


def _idx(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.astype(np.uint8).tobytes()


def make_mnist_idx(root: Path, n_train: int = 20, n_test: int = 10, gz: bool = False) -> Path:
    root.mkdir(parents=True)
    r = np.random.default_rng(0)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        imgs = _idx(r.integers(0, 256, (n, 28, 28)))
        labs = _idx(np.arange(n) % 10)
        if gz:
            (root / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(imgs))
            (root / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labs))
        else:
            (root / f"{stem}-images-idx3-ubyte").write_bytes(imgs)
            (root / f"{stem}-labels-idx1-ubyte").write_bytes(labs)
    return root


def _image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> None:
    r = np.random.default_rng(seed)
    a = r.integers(0, 256, (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, mode).save(path)


def make_imagefolder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4) -> Path:
    for k, c in enumerate(classes):
        for i in range(per_class):  # mixed sizes, formats and modes: decoded and resized per item
            ext, mode = (".png", "RGB") if i % 2 else (".jpg", "RGB" if i % 3 else "L")
            _image(root / "train" / c / f"{c}_{i}{ext}", (40 + 4 * i, 36 + 2 * k), 10 * k + i, mode)
        _image(root / "val" / c / f"{c}_val.png", (32, 32), 100 + k)
        _image(root / "val" / c / f"{c}_val2.jpg", (48, 40), 200 + k)
    return root


def make_tiny_imagenet(root: Path, wnids=("n01443537", "n01629819"), per_class: int = 3) -> Path:
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\n"
                                    "n01629819\tEuropean fire salamander, Salamandra salamandra\n"
                                    "n09999999\tunused\n")
    lines = []
    for k, w in enumerate(wnids):
        for i in range(per_class):
            _image(root / "train" / w / "images" / f"{w}_{i}.JPEG", (64, 64), 10 * k + i)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for i in range(2):
            name = f"val_{2 * k + i}.JPEG"
            _image(root / "val" / "images" / name, (64, 64), 50 + 2 * k + i)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    _image(root / "test" / "images" / "test_0.JPEG", (64, 64), 99)  # unlabelled: ignored
    return root


def make_seqdir(root: Path, classes=("walk", "run", "jump"), per_class: int = 3, features: int = 12) -> Path:
    r = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 1)):
        for k, c in enumerate(classes):
            for i in range(n):
                clip = r.standard_normal((6 + 2 * i + k, features)).astype(np.float32)  # lengths vary
                d = root / split / c
                d.mkdir(parents=True, exist_ok=True)
                if i % 2:
                    np.savez(d / f"{c}_{i}.npz", x=clip)
                else:
                    np.save(d / f"{c}_{i}.npy", clip)
    return root


# ---------------------------------------------------------------------------- helpers
def _checkpoint(tmp_path: Path, arch: str, kwargs: dict) -> Path:
    from tedepr_cli.zoo import MODELS

    torch.manual_seed(0)
    ck = tmp_path / f"{arch}.pt"
    torch.save(MODELS.get(arch)(**kwargs).state_dict(), ck)
    return ck


def _finetune(tmp_path: Path, arch: str, kwargs: dict, data: str, *extra: str, name: str = "ft"):
    ck = _checkpoint(tmp_path, arch, kwargs)
    r = run_cli("finetune", ck, "--arch", arch, "--arch-kwargs", json.dumps(kwargs), "--data", data,
                "-o", tmp_path / name, "--epochs", "1", "--batch-size", "8", "--val-fraction", "0", "--json",
                *extra)
    return r


def _trained(tmp_path: Path, r, data: str, name: str = "ft") -> dict:
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["epochs_run"] == 1 and 0 <= d["test_accuracy"] <= 1
    e = run_cli("eval", tmp_path / name, "--data", data, "--json")
    assert e.exit_code == 0, e.stderr
    assert json.loads(e.stdout)["accuracy"] == pytest.approx(d["test_accuracy"])  # same preprocessing
    return json.loads((tmp_path / name / "best" / "manifest.json").read_text())["data"]


# ---------------------------------------------------------------------------- one step on each layout
def test_cifar10_trains_through_the_cli(tmp_path):
    root = make_cifar10(tmp_path / "c10")
    r = _finetune(tmp_path, "resnet20", {"width": 0.25}, f"cifar10:{root}")
    data = _trained(tmp_path, r, str(root))  # eval auto-detects the same layout
    pre = data["preprocess"]
    assert data["reader"] == "cifar10" and data["class_names"][3] == "cat"
    assert pre["normalize"] == "standard" and pre["mean"] == [0.4914, 0.4822, 0.4465]
    assert pre["augment"] == "random-crop(pad 4)+flip"


def test_cifar100_fine_labels_and_class_count_mismatch(tmp_path):
    root = make_cifar100(tmp_path / "c100")
    r = _finetune(tmp_path, "resnet20", {"width": 0.25}, str(root))  # 10 outputs for 100 classes
    assert r.exit_code == 4 and "100 classes" in r.stderr and "10 outputs" in r.stderr
    assert '--arch-kwargs \'{"num_classes": 100}\'' in r.stderr and not (tmp_path / "ft").exists()
    kw = {"width": 0.25, "num_classes": 100}
    r = _finetune(tmp_path, "resnet20", kw, f"cifar100:{root}", "--no-augment")
    data = _trained(tmp_path, r, f"cifar100:{root}")
    assert data["classes"] == 100 and data["preprocess"]["augment"] is None
    assert data["preprocess"]["mean"] == [0.5071, 0.4865, 0.4409]


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_trains_through_the_cli(tmp_path, gz):
    root = make_mnist_idx(tmp_path / "mnist", gz=gz)
    ds = open_dataset(root)
    assert ds.reader == "mnist-idx" and len(ds.splits["train"]) == 20 and len(ds.splits["test"]) == 10
    assert ds.splits["train"].mapped is (not gz)  # plain IDX is memory-mapped
    if gz:  # the one-shot path: dense -> prune -> finetune on IDX
        ck = _checkpoint(tmp_path, "lenet300", {})
        p = run_cli("prune", ck, "--arch", "lenet300", "--sparsity", "0.99", "--criterion", "magnitude",
                    "-o", tmp_path / "p")
        assert p.exit_code == 0, p.stderr
        r = run_cli("finetune", tmp_path / "p", "--data", root, "-o", tmp_path / "ft", "--epochs", "1",
                    "--batch-size", "8", "--val-fraction", "0", "--json")
    else:
        r = _finetune(tmp_path, "lenet5", {}, f"mnist-idx:{root}")
    data = _trained(tmp_path, r, str(root))
    assert data["preprocess"]["normalize"] == "none" and data["preprocess"]["augment"] is None


def test_image_folder_trains_with_validation_and_workers(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    kw = {"width": 0.125, "num_classes": 3}
    ck = _checkpoint(tmp_path, "vgg11", kw)
    r = run_cli("finetune", ck, "--arch", "vgg11", "--arch-kwargs", json.dumps(kw), "--data", root,
                "-o", tmp_path / "ft", "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.25",
                "--workers", "1", "--json")
    data = _trained(tmp_path, r, f"imagefolder:{root}")
    assert data["reader"] == "imagefolder" and data["class_names"] == ["cat", "dog", "fox"]
    assert data["preprocess"]["augment"] == "random-resized-crop+flip"
    assert data["preprocess"]["mean"] == [0.485, 0.456, 0.406]
    assert "imagefolder reader" in r.stderr  # the auto-detected reader is named


def test_tiny_imagenet_layout_trains(tmp_path):
    root = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    ds = open_dataset(root)
    assert ds.classes == ["n01443537", "n01629819"]
    assert ds.class_names == ["goldfish", "European fire salamander"]
    assert [len(ds.splits[s]) for s in ("train", "test")] == [6, 4]
    assert ds.splits["test"].labels.tolist() == [0, 0, 1, 1]
    assert any("test/" in n for n in ds.notes)  # the unlabelled test/ is ignored, and said so
    r = _finetune(tmp_path, "resnet20", {"width": 0.25, "num_classes": 2}, str(root))
    _trained(tmp_path, r, str(root))


def test_sequence_clips_train_an_lstm(tmp_path):
    root = make_seqdir(tmp_path / "ucf")
    kw = {"seq_len": 8, "features": 12, "hidden": 16, "num_classes": 3}
    r = _finetune(tmp_path, "lstm", kw, f"seqdir:{root}")
    data = _trained(tmp_path, r, str(root))
    assert data["reader"] == "seqdir" and data["class_names"] == ["jump", "run", "walk"]
    # the same clips listed in a labels file (names as labels, a split column)
    flat = tmp_path / "listed"
    rows = ["path,label,split"]
    for f in sorted(root.rglob("*.np[yz]")):
        rel = f.relative_to(root)
        (flat / rel).parent.mkdir(parents=True, exist_ok=True)
        (flat / rel).write_bytes(f.read_bytes())
        rows.append(f"{rel},{rel.parts[1]},{rel.parts[0]}")
    (flat / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = open_dataset(flat)
    assert ds.reader == "seqdir" and ds.classes == ["jump", "run", "walk"]
    assert [len(ds.splits[s]) for s in ("train", "test")] == [9, 3]
    r = _finetune(tmp_path, "lstm", kw, str(flat), name="ft2")
    _trained(tmp_path, r, str(flat), name="ft2")


def test_sequence_array_npz_and_memory_mapped_npy_dir(tmp_path):
    r = np.random.default_rng(0)
    x, y = r.standard_normal((30, 8, 12)).astype(np.float32), np.arange(30) % 3
    np.savez(tmp_path / "seq.npz", x=x, y=y)
    kw = {"seq_len": 8, "features": 12, "hidden": 16, "num_classes": 3}
    _trained(tmp_path, _finetune(tmp_path, "lstm", kw, str(tmp_path / "seq.npz")), str(tmp_path / "seq.npz"))
    d = tmp_path / "big"
    d.mkdir()
    np.save(d / "x.npy", x)
    np.save(d / "y.npy", y)
    ds = open_dataset(d)
    assert ds.reader == "npz" and ds.splits["train"].mapped and ds.derived_split
    _trained(tmp_path, _finetune(tmp_path, "lstm", kw, f"npz:{d}", name="ft2"), str(d), name="ft2")


# ---------------------------------------------------------------------------- info
def test_info_describes_each_layout(tmp_path):
    cases = {
        "cifar10": (make_cifar10(tmp_path / "a"), {"train": 20, "test": 10}, [32 * 0 + 3, 32, 32]),
        "cifar100": (make_cifar100(tmp_path / "b"), {"train": 12, "test": 6}, [3, 32, 32]),
        "mnist-idx": (make_mnist_idx(tmp_path / "c", gz=True), {"train": 20, "test": 10}, [28, 28]),
        "imagefolder": (make_imagefolder(tmp_path / "d"), {"train": 12, "test": 6}, None),
        "seqdir": (make_seqdir(tmp_path / "e"), {"train": 9, "test": 3}, None),
    }
    for reader, (root, counts, shape) in cases.items():
        r = run_cli("info", "--data", root, "--json")
        assert r.exit_code == 0, r.stderr
        d = json.loads(r.stdout)
        assert d["reader"] == reader and {k: v["count"] for k, v in d["splits"].items()} == counts
        assert sum(d["splits"]["train"]["class_counts"]) == counts["train"]
        if shape:
            assert d["sample_shape"] == shape and d["dtype"] == "uint8"
    r = run_cli("info", "--data", cases["cifar10"][0])
    assert r.exit_code == 0 and "cifar10 reader" in r.stdout and "airplane" in r.stdout
    ck = _checkpoint(tmp_path, "resnet20", {"width": 0.25})
    r = run_cli("info", ck, "--arch", "resnet20", "--arch-kwargs", '{"width": 0.25}', "--data",
                cases["cifar100"][0], "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["data"]["fits_model"]["ok"] is False


# ---------------------------------------------------------------------------- safety
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling would create the marker file


def test_malicious_cifar_pickle_is_refused_and_never_runs(tmp_path):
    canary = tmp_path / "canary"
    pickle.loads(pickle.dumps(_Payload(canary), protocol=2)).close()
    assert canary.exists()  # the payload is real: a plain unpickler runs it

    root = make_cifar10(tmp_path / "c10")
    marker = tmp_path / "pwned"
    evil = _cifar_records(4, 10, 1)
    evil["labels"] = _Payload(marker)
    batch = root / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps(evil, protocol=2))
    for cmd in (("info", "--data", f"cifar10:{root}"),
                ("eval", _checkpoint(tmp_path, "resnet20", {"width": 0.25}), "--arch", "resnet20",
                 "--arch-kwargs", '{"width": 0.25}', "--data", root)):
        r = run_cli(*cmd)
        assert r.exit_code == 5, r.stderr
        assert "unsafe input refused" in r.stderr and "open" in r.stderr  # names the global
    assert not marker.exists()


def test_restricted_unpickler_admits_exactly_plain_data(tmp_path):
    real = py2_pickle(_cifar_records(3, 10, 1))
    globals_ = {arg for op, arg, _ in pickletools.genops(real) if op.name == "GLOBAL"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    (tmp_path / "ok").write_bytes(real)
    d = load_data_pickle(tmp_path / "ok")
    assert set(d) == {b"batch_label", b"labels", b"data", b"filenames"}  # Python 2 str -> bytes
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (3, 3072)
    for bad in (np.array([1, "x"], dtype=object), torch.zeros(2), {1, 2}):
        (tmp_path / "bad").write_bytes(pickle.dumps({"data": bad}, protocol=2))
        with pytest.raises(UnsafeInput):
            load_data_pickle(tmp_path / "bad")
    (tmp_path / "junk").write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(BadInput):
        load_data_pickle(tmp_path / "junk")


def test_cifar_batches_with_numpy_scalar_labels_load(tmp_path):
    """Labels written from numpy integers are numpy scalars in the pickle, under numpy 1.x's
    name (numpy.core.multiarray.scalar, as Python 2 / numpy 1 wrote them) or numpy 2.x's
    (numpy._core.multiarray.scalar, a plain Python 3 pickle today)."""
    root = make_cifar10(tmp_path / "c10", per_batch=4, test=10)
    d = root / "cifar-10-batches-py"
    old = _cifar_records(4, 10, 1)
    old["labels"] = [np.int64(v) for v in old["labels"]]
    (d / "data_batch_1").write_bytes(py2_pickle(old))
    new = _cifar_records(10, 10, 9)
    new["labels"] = [np.uint8(v) for v in np.arange(10)[::-1]]
    new["score"] = [np.float32(0.5), np.float64(1.5), np.complex64(1j), np.bool_(True), np.int8(-3)]
    (d / "test_batch").write_bytes(pickle.dumps(new, protocol=5))  # arrays as _frombuffer
    refs = {op.name + " " + str(arg) for op, arg, _ in pickletools.genops((d / "data_batch_1").read_bytes())}
    assert "GLOBAL numpy.core.multiarray scalar" in refs
    refs = [str(arg) for _, arg, _ in pickletools.genops((d / "test_batch").read_bytes())]
    assert "numpy._core.multiarray" in refs and "scalar" in refs
    back = load_data_pickle(d / "test_batch")
    assert back["score"] == new["score"] and [type(v) for v in back["score"]] == \
        [np.float32, np.float64, np.complex64, np.bool_, np.int8]
    r = run_cli("info", "--data", f"cifar10:{root}", "--json")
    assert r.exit_code == 0, r.stderr
    splits = json.loads(r.stdout)["splits"]
    assert splits["train"]["count"] == 20 and splits["test"]["class_counts"] == [1] * 10


def _op(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def _text(s: str) -> bytes:
    b = s.encode()
    return pickle.BINUNICODE + struct.pack("<I", len(b)) + b


def _raw(b: bytes) -> bytes:
    return pickle.SHORT_BINBYTES + bytes([len(b)]) + b


def _dtype(spec: str, flags: int | None = None) -> bytes:
    """``numpy.dtype(spec, False, True)``, then (``flags``) a BUILD that sets its state."""
    out = (_op("numpy", "dtype") + _text(spec) + pickle.NEWFALSE + pickle.NEWTRUE + pickle.TUPLE3
           + pickle.REDUCE)
    if flags is not None:
        out += (pickle.MARK + pickle.BININT1 + b"\x03" + _text("<") + pickle.NONE * 3
                + (pickle.BININT + struct.pack("<i", -1)) * 2 + pickle.BININT + struct.pack("<i", flags)
                + pickle.TUPLE + pickle.BUILD)
    return out


def _scalar_pickle(dtype: bytes, data: bytes, np_core: str = "numpy._core") -> bytes:
    """A CIFAR-shaped dict whose 'labels' hold one ``scalar(dtype, data)``."""
    return (pickle.PROTO + b"\x03" + pickle.EMPTY_DICT + pickle.MARK
            + _text("labels") + pickle.EMPTY_LIST + pickle.MARK
            + _op(f"{np_core}.multiarray", "scalar") + dtype + data + pickle.TUPLE2 + pickle.REDUCE
            + pickle.APPENDS + pickle.SETITEMS + pickle.STOP)


def _system(marker: Path) -> bytes:  # os.system("touch MARKER"), the payload a plain unpickler runs
    return _op("os", "system") + _text(f"touch {marker}") + pickle.TUPLE1 + pickle.REDUCE


@pytest.mark.parametrize("np_core", ["numpy.core", "numpy._core"])
def test_numpy_scalars_admit_numeric_dtypes_only(tmp_path, np_core):
    marker = tmp_path / "pwned"
    ok = _scalar_pickle(_dtype("i8"), _raw(struct.pack("<q", 7)), np_core)
    assert pickle.loads(ok)["labels"] == [7]  # the hand-made pickles are what numpy reads
    (tmp_path / "ok").write_bytes(ok)
    assert load_data_pickle(tmp_path / "ok")["labels"] == [np.int64(7)]
    with pytest.raises(TypeError):  # numpy refuses the object scalar, after the payload ran
        pickle.loads(_scalar_pickle(_dtype("O"), _system(marker), np_core))
    assert marker.exists()  # the payload is real: a plain unpickler runs it
    marker.unlink()
    evil = {
        # object dtype: numpy's scalar hands back whatever object the pickle built
        "object": (_scalar_pickle(_dtype("O"), _system(marker), np_core), "dtype of Python objects"),
        # a numeric dtype whose pickled state claims it holds objects
        "object-flags": (_scalar_pickle(_dtype("i8", flags=63), _raw(b"\x10" + b"\0" * 7), np_core),
                         "scalar whose dtype holds Python objects"),
        "str": (_scalar_pickle(_dtype("U1"), _raw(b"a\0\0\0"), np_core), "scalar of dtype <U1"),
        "datetime": (_scalar_pickle(_dtype("M8[s]"), _raw(b"\0" * 8), np_core), "scalar of dtype datetime"),
        "no-dtype": (_scalar_pickle(_text("i8"), _raw(b"\0" * 8), np_core), "not a dtype"),
        "system": (_scalar_pickle(_dtype("i8"), _system(marker), np_core), "os.system"),
        "eval": (pickle.PROTO + b"\x03" + _op("builtins", "eval") + _text(f"open('{marker}', 'w')")
                 + pickle.TUPLE1 + pickle.REDUCE + pickle.STOP, "builtins.eval"),
        # protocol 5's array builder with the same object-claiming dtype
        "frombuffer": (pickle.PROTO + b"\x05" + _op(f"{np_core}.numeric", "_frombuffer") + pickle.MARK
                       + _raw(b"\x10" + b"\0" * 7) + _dtype("i8", flags=63) + pickle.BININT1 + b"\x01"
                       + pickle.TUPLE1 + _text("C") + pickle.TUPLE + pickle.REDUCE + pickle.STOP,
                       "Python objects"),
        "load": (pickle.PROTO + b"\x03" + _op("numpy", "load") + pickle.STOP, "numpy.load"),
    }
    for name, (blob, fragment) in evil.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(UnsafeInput, match=fragment):
            load_data_pickle(tmp_path / name)
    (tmp_path / "short").write_bytes(_scalar_pickle(_dtype("i8"), _raw(b"\x01"), np_core))
    with pytest.raises(BadInput, match="malformed"):
        load_data_pickle(tmp_path / "short")
    # through the CLI, as a CIFAR training batch: exit 5, one line, nothing ran
    root = make_cifar10(tmp_path / "c10")
    for name in ("object", "object-flags", "system"):
        (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(evil[name][0])
        r = run_cli("info", "--data", f"cifar10:{root}")
        assert r.exit_code == 5, (name, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "unsafe input refused" in r.stderr
    assert not marker.exists()


# ---------------------------------------------------------------------------- bad input
def test_bad_layouts_are_clear_errors(tmp_path):
    (tmp_path / "misc").mkdir()
    (tmp_path / "misc" / "notes.txt").write_text("hi")
    r = run_cli("info", "--data", tmp_path / "misc")
    assert r.exit_code == 4 and "unknown data layout" in r.stderr and "data_batch_1" in r.stderr
    r = run_cli("info", "--data", tmp_path / "nothing")
    assert r.exit_code == 3
    r = run_cli("info", "--data", f"cifar11:{tmp_path}")
    assert r.exit_code == 2 and "unknown reader" in r.stderr
    root = make_imagefolder(tmp_path / "imgs")
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "readme.txt").write_text("no images here")
    r = run_cli("info", "--data", root)
    assert r.exit_code == 4 and "no images" in r.stderr and "empty" in r.stderr
    r = run_cli("info", "--data", f"cifar10:{root}")
    assert r.exit_code == 4 and "data_batch" in r.stderr
    m = make_mnist_idx(tmp_path / "m")
    (m / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.arange(7)))  # 10 images, 7 labels
    r = run_cli("info", "--data", m)
    assert r.exit_code == 4 and "10 samples but 7 labels" in r.stderr


def test_corrupt_images_are_skipped_with_a_count_or_fail_when_strict(tmp_path):
    root = make_imagefolder(tmp_path / "imgs")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    kw = {"width": 0.125, "num_classes": 3}
    r = _finetune(tmp_path, "vgg11", kw, str(root), "--batch-size", "16")
    assert r.exit_code == 0, r.stderr
    assert "skipped 1 unreadable sample" in r.stderr and "broken.png" in r.stderr
    r = _finetune(tmp_path, "vgg11", kw, str(root), "--strict-data", name="strict")
    assert r.exit_code == 4 and "broken.png" in r.stderr


def test_augment_needs_images_and_normalize_choices(tmp_path):
    root = make_seqdir(tmp_path / "ucf")
    kw = {"seq_len": 8, "features": 12, "hidden": 16, "num_classes": 3}
    r = _finetune(tmp_path, "lstm", kw, str(root), "--augment")
    assert r.exit_code == 2 and "augment" in r.stderr
    ds = open_dataset(root)
    with pytest.raises(UsageError):
        resolve_preprocess(ds, (8, 12), "sequence", normalize="standard")
    pre = resolve_preprocess(ds, (8, 12), "sequence", normalize="computed")
    assert len(pre.mean) == 12 and all(s > 0 for s in pre.std)
    x, _ = make_split(ds, "train", (8, 12), "sequence", pre).batch(np.arange(len(ds.splits["train"])))
    assert abs(float(x.mean())) < 0.5  # roughly standardized (time-resampled frames repeat)


# ---------------------------------------------------------------------------- determinism and scale
def test_augmentation_is_seeded_per_epoch_and_sample_and_worker_independent(tmp_path):
    ds = open_dataset(make_cifar10(tmp_path / "c10"))
    pre = resolve_preprocess(ds, (3, 32, 32), "image", seed=7)
    train = make_split(ds, "train", (3, 32, 32), "image", pre, train=True)
    idx = np.arange(8)
    a0, b0 = train.batch(idx, epoch=0)[0], train.batch(idx, epoch=0)[0]
    assert torch.equal(a0, b0) and not torch.equal(a0, train.batch(idx, epoch=1)[0])
    # a sample's view depends on its index only, not on the batch it is in
    assert torch.equal(train.batch(idx[::-1].copy(), epoch=0)[0], a0.flip(0))
    batches = [np.array([0, 5, 2]), np.array([7, 1]), np.array([3])]
    here = [b.x for b in iterate(train, batches, epoch=3)]
    workers = [b.x for b in iterate(train, batches, epoch=3, workers=2)]
    assert all(torch.equal(a, b) for a, b in zip(here, workers, strict=True))
    plain = make_split(ds, "train", (3, 32, 32), "image", pre, train=False).batch(idx)[0]
    assert not torch.equal(plain, a0)  # evaluation views are not augmented


def test_epoch_batches_shard_each_global_batch_exactly():
    single = epoch_batches(37, 8, seed=3, epoch=2)
    ranks = [epoch_batches(37, 8, seed=3, epoch=2, rank=r, world=3) for r in range(3)]
    for b, (whole, n) in enumerate(single):
        parts = [ranks[r][b][0] for r in range(3)]
        assert sorted(np.concatenate(parts).tolist()) == sorted(whole.tolist())
        assert all(ranks[r][b][1] == n for r in range(3))  # every rank scales by the global size
    assert not np.array_equal(single[0][0], epoch_batches(37, 8, seed=3, epoch=3)[0][0])


def test_resume_with_augmentation_is_exact(tmp_path):
    from tedepr_cli.arch import parse_arch
    from tedepr_cli.artifact import load_artifact
    from tedepr_cli.loading import load_model
    from tedepr_cli.train import TrainOptions, finetune

    root = make_cifar10(tmp_path / "c10")
    ck = _checkpoint(tmp_path, "resnet20", {"width": 0.25})
    art = load_model(ck, parse_arch("resnet20", '{"width": 0.25}'))
    opts = dict(epochs=3, batch_size=8, val_fraction=0, lr=0.01, seed=4)
    finetune(art, Path(f"cifar10:{root}"), tmp_path / "a", TrainOptions(**opts))

    def stop(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(art, Path(f"cifar10:{root}"), tmp_path / "b", TrainOptions(**opts), on_epoch=stop)
    finetune(art, Path(f"cifar10:{root}"), tmp_path / "b", TrainOptions(), resume=True)
    a, b = load_artifact(tmp_path / "a" / "last"), load_artifact(tmp_path / "b" / "last")
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


DDP_SCRIPT = """
import sys, pathlib
from tedepr_cli.arch import parse_arch
from tedepr_cli.loading import load_model
from tedepr_cli.train import TrainOptions, finetune
art = load_model(sys.argv[1], parse_arch("lenet5", '{"num_classes": 3}'))
opts = TrainOptions(epochs=1, batch_size=6, lr=0.01, seed=2, val_fraction=0, optimizer="sgd")
finetune(art, sys.argv[2], pathlib.Path(sys.argv[3]), opts)
"""


def test_ddp_on_streamed_image_folder_matches_single_process(tmp_path):
    """Lazily decoded, augmented image files under torchrun: 2 ranks == 1 process."""
    from tedepr_cli.artifact import load_artifact

    root = make_imagefolder(tmp_path / "imgs")
    ck = _checkpoint(tmp_path, "lenet5", {"num_classes": 3})  # grayscale 28x28 views; no BatchNorm
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [str(script), str(ck), str(root)]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(30500 + os.getpid() % 1000)]
    two = subprocess.run([*torchrun, *args, str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_artifact(tmp_path / "one" / "last"), load_artifact(tmp_path / "two" / "last")
    assert a.meta["data"]["preprocess"]["augment"] == "random-resized-crop+flip"
    for k, v in a.model.state_dict().items():
        assert torch.allclose(v, b.model.state_dict()[k], rtol=1e-4, atol=1e-6), k


def test_class_folder_errors_are_shared_by_image_and_clip_readers(tmp_path):
    """Both class-folder readers refuse an empty class folder and a class the training split lacks."""
    seq = make_seqdir(tmp_path / "ucf")
    (seq / "train" / "crawl").mkdir()
    r = run_cli("info", "--data", f"seqdir:{seq}")
    assert r.exit_code == 4 and "no .npy/.npz clips: crawl" in r.stderr
    seq = make_seqdir(tmp_path / "ucf2")
    (seq / "test" / "swim").mkdir()
    np.save(seq / "test" / "swim" / "a.npy", np.zeros((4, 12), np.float32))
    r = run_cli("info", "--data", f"seqdir:{seq}")
    assert r.exit_code == 4 and "'swim' is not among the 3 training classes" in r.stderr
    img = make_imagefolder(tmp_path / "imgs")
    extra = img / "val" / "zebra"
    extra.mkdir(parents=True)
    src = next((img / "train").rglob("*.png"))
    (extra / "z.png").write_bytes(src.read_bytes())
    r = run_cli("info", "--data", img)
    assert r.exit_code == 4 and "'zebra' is not among" in r.stderr
