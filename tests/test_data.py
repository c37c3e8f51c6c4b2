"""The data module reads .npz files and presents samples as each model needs them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tedepr_cli.data import check_labels, load_npz, present
from tedepr_cli.errors import BadInput, InputNotFound
from tedepr_cli.model_data import load_split

from .conftest import MNIST


def test_sample_split_is_fixed_and_stratified():
    d = load_npz(MNIST)
    assert d.x.shape == (5000, 28, 28) and d.x.dtype == np.uint8
    assert np.bincount(d.y[d.split == 1]).tolist() == [100] * 10
    assert len(d.subset("train")) == 4000 and len(d.subset("test")) == 1000


@pytest.mark.parametrize("shape,kind,want", [
    ((784,), "flat", (784,)),
    ((1, 28, 28), "image", (1, 28, 28)),
    ((1, 32, 32), "image", (1, 32, 32)),
    ((28, 28), "sequence", (28, 28)),
])
def test_present_layouts(shape, kind, want):
    x = np.random.default_rng(0).integers(0, 256, (4, 28, 28)).astype(np.uint8)
    t = present(x, shape, kind)
    assert t.shape == (4, *want) and t.dtype == torch.float32
    assert float(t.max()) <= 1.0


def test_padding_is_centred_and_values_kept():
    x = np.full((1, 28, 28), 255, np.uint8)
    t = present(x, (1, 32, 32), "image")
    assert t[0, 0, 2:30, 2:30].eq(1).all() and t[0, 0, :2].eq(0).all()


def test_nhwc_and_flat_images():
    x = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    assert present(x, (3, 8, 8), "image").shape == (2, 3, 8, 8)
    assert torch.equal(present(x.transpose(0, 3, 1, 2).reshape(2, -1), (3, 8, 8), "image"),
                       present(x, (3, 8, 8), "image"))


@pytest.mark.parametrize("shape,kind", [((3, 28, 28), "image"), ((1, 16, 16), "image"),
                                        ((100,), "flat"), ((28, 10), "sequence")])
def test_mismatched_shapes_are_clear_errors(shape, kind):
    x = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(BadInput):
        present(x, shape, kind)


def _npz(tmp_path, **arrays):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return p


def test_bad_files(tmp_path):
    with pytest.raises(InputNotFound):
        load_npz(tmp_path / "none.npz")
    with pytest.raises(BadInput, match="'x' and 'y'"):
        load_npz(_npz(tmp_path, a=np.zeros(3)))
    with pytest.raises(BadInput, match="no samples"):
        load_npz(_npz(tmp_path, x=np.zeros((0, 4)), y=np.zeros(0, int)))
    with pytest.raises(BadInput, match="integers"):
        load_npz(_npz(tmp_path, x=np.zeros((2, 4)), y=np.zeros(2)))
    with pytest.raises(BadInput, match="one label per sample"):
        load_npz(_npz(tmp_path, x=np.zeros((2, 4)), y=np.zeros(3, int)))
    with pytest.raises(BadInput, match="NaN"):
        load_npz(_npz(tmp_path, x=np.full((2, 4), np.nan), y=np.zeros(2, int)))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(BadInput):
        load_npz(tmp_path / "junk.npz")
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([object()], dtype=object), y=np.zeros(1, int))
    with pytest.raises(BadInput):  # object arrays would need pickle: refused
        load_npz(p)


def test_label_range_checked():
    with pytest.raises(BadInput, match="out of range"):
        check_labels(np.array([0, 12]), 10, "d")
    x, y = load_split(MNIST, "test", (784,), "flat", 10)
    assert x.shape == (1000, 784) and int(y.max()) == 9


def test_load_split_reads_every_layout_and_all_keeps_file_order(tmp_path):
    from .test_datasets import make_mnist_idx

    x, y = load_split(make_mnist_idx(tmp_path / "m"), "test", (1, 32, 32), "image", 10)
    assert x.shape == (10, 1, 32, 32) and y.tolist() == list(range(10))  # 28x28 centred in 32x32
    d = load_npz(MNIST)
    xa, ya = load_split(MNIST, "all", (784,), "flat", 10)
    assert torch.equal(ya, torch.from_numpy(d.y)) and torch.equal(xa, present(d.x, (784,), "flat"))
