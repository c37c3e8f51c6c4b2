"""Compact storage layouts decode bit for bit, and the smallest layout is chosen."""

from __future__ import annotations

import pytest
import torch

from tedepr_cli.errors import BadInput
from tedepr_cli.storage import decode, encode, stored_bytes


def _case(shape, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    m = torch.rand(shape, generator=g) < density
    return w * m, m


@pytest.mark.parametrize("layout", ["csr", "coo", "bitmask", "delta", "auto"])
@pytest.mark.parametrize("shape,density", [((300, 784), 0.005), ((1, 28, 10, 8), 0.3),
                                           ((64,), 0.5), ((5, 7), 0.0), ((5, 7), 1.0)])
def test_round_trip_is_bit_exact(layout, shape, density):
    w, m = _case(shape, density)
    if layout == "csr" and len(shape) < 2:
        pytest.skip("csr needs 2 dims")
    tensors, enc = encode({"w": w, "b": torch.ones(3)}, {"w": m}, layout=layout)
    state, masks = decode(tensors, enc)
    assert torch.equal(state["w"], w) and torch.equal(masks["w"], m)
    assert torch.equal(state["b"], torch.ones(3)) and "b" not in masks


def test_sparse_layout_is_small():
    w, m = _case((300, 784), 0.005)
    tensors, enc = encode({"w": w}, {"w": m})
    nnz = int(m.sum())
    # values (4 B) + 2-byte column indices + 301 row pointers (2 B)
    assert stored_bytes(tensors) <= nnz * 4 + nnz * 2 + 301 * 2
    assert enc["w"]["layout"] in ("csr", "coo", "delta")


def test_dense_mask_prefers_bitmask():
    w, m = _case((100, 100), 0.9)
    _, enc = encode({"w": w}, {"w": m})
    assert enc["w"]["layout"] == "bitmask"


def test_corrupt_encoding_is_bad_input():
    w, m = _case((10, 10), 0.5)
    tensors, enc = encode({"w": w}, {"w": m}, layout="coo")
    tensors["w::coo.index"] = tensors["w::coo.index"][:-1]
    with pytest.raises(BadInput):
        decode(tensors, enc)
    tensors, enc = encode({"w": w}, {"w": m}, layout="coo")
    enc["w"]["shape"] = [5, 5]
    with pytest.raises(BadInput):
        decode(tensors, enc)
    with pytest.raises(BadInput, match="missing"):
        decode({}, enc)


def test_mask_shape_must_match():
    with pytest.raises(BadInput):
        encode({"w": torch.zeros(3, 3)}, {"w": torch.ones(3, dtype=torch.bool)})


def test_varint_round_trip_and_malformed():
    import numpy as np

    from tedepr_cli.storage import leb128_decode, leb128_encode

    v = np.array([0, 1, 127, 128, 300, 16383, 16384, 2**40], dtype=np.int64)
    enc = leb128_encode(v)
    assert len(enc) == 1 + 1 + 1 + 2 + 2 + 2 + 3 + 6
    assert np.array_equal(leb128_decode(enc, len(v)), v)
    with pytest.raises(BadInput):
        leb128_decode(enc[:-1], len(v))


def test_delta_layout_is_about_a_byte_per_entry_at_extreme_sparsity():
    w, m = _case((300, 784), 0.005)
    tensors, enc = encode({"w": w}, {"w": m}, layout="delta")
    nnz = int(m.sum())
    assert tensors["w::delta.gaps"].numel() <= 1.7 * nnz
