"""Tensorized layers: the chain equals its dense weight, decomposition, init, FLOPs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tedepr_cli.tensorized.decomp import decompose_into, init_module, init_random
from tedepr_cli.tensorized.layers import build_layer
from tedepr_cli.tensorized.plan import chain_dims, full_rank, ranks_for


def _rand_cores(layer, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for c in layer.cores:
            c.copy_(torch.randn(c.shape, generator=g, dtype=c.dtype))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g, dtype=c.dtype))
    return layer


def _linear(fmt, ins, outs, r, bias=True, chain="linear"):
    spec = {"type": "linear", "format": fmt, "in_modes": ins, "out_modes": outs, "bias": bias,
            "chain": chain}
    spec["ranks"] = ranks_for(chain_dims(spec), r, ring=fmt == "tr")
    return _rand_cores(build_layer(spec).double())


def _conv(fmt, ins, outs, r, k=(3, 3), stride=(1, 1), pad=(1, 1), dil=(1, 1), bias=True):
    spec = {"type": "conv2d", "format": fmt, "in_modes": ins, "out_modes": outs, "bias": bias,
            "chain": "linear", "kernel_size": list(k), "stride": list(stride), "padding": list(pad),
            "dilation": list(dil), "input_hw": [9, 7]}
    spec["ranks"] = ranks_for(chain_dims(spec), r, ring=fmt == "tr")
    return _rand_cores(build_layer(spec).double())


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


LINEAR_CASES = [([4, 7], [3, 5], 3), ([2, 3, 5], [7, 1, 2], 4), ([28, 28], [15, 20], 8),
                ([1, 11], [13, 1], 2), ([5], [6], 3), ([2, 2, 2, 3], [3, 2, 2, 2], 5)]


@pytest.mark.parametrize("fmt", ["tt", "tr"])
@pytest.mark.parametrize("ins,outs,r", LINEAR_CASES)
def test_linear_chain_equals_dense_weight(fmt, ins, outs, r):
    layer = _linear(fmt, ins, outs, r)
    x = torch.randn(6, math.prod(ins), dtype=torch.float64)
    ref = F.linear(x, layer.dense_weight(), layer.bias)
    assert layer.dense_weight().shape == (math.prod(outs), math.prod(ins))
    assert rel(layer(x), ref) <= 1e-10
    # leading dimensions (as in a transformer) are kept
    assert layer(x.reshape(2, 3, -1)).shape == (2, 3, math.prod(outs))


@pytest.mark.parametrize("fmt", ["tt", "tr"])
@pytest.mark.parametrize("ins,outs,r,k,stride,pad,dil", [
    ([4, 2], [3, 5], 3, (3, 3), (1, 1), (1, 1), (1, 1)),
    ([2, 3, 2], [2, 2, 2], 4, (3, 1), (2, 1), (0, 1), (1, 1)),
    ([6], [10], 5, (5, 5), (2, 2), (2, 2), (2, 1)),
    ([16, 16], [16, 32], 8, (1, 1), (1, 1), (0, 0), (1, 1)),
])
def test_conv_chain_equals_dense_weight(fmt, ins, outs, r, k, stride, pad, dil):
    layer = _conv(fmt, ins, outs, r, k, stride, pad, dil)
    x = torch.randn(3, math.prod(ins), 9, 7, dtype=torch.float64)
    ref = F.conv2d(x, layer.dense_weight(), layer.bias, stride, pad, dil)
    assert rel(layer(x), ref) <= 1e-10


def _counted_flops(layer, x):
    with FlopCounterMode(display=False) as fc:
        layer(x)
    return fc.get_total_flops()


@pytest.mark.parametrize("fmt", ["tt", "tr"])
def test_flops_model_matches_torch_flop_counter(fmt):
    """chain_flops counts the mode-by-mode steps (what the compiled kernels run); the torch
    forward runs exactly them when a conv's merged sides are off, and fewer when on."""
    conv = _conv(fmt, [4, 2], [3, 5], 3)
    conv.merge = False
    for layer, x in [(_linear(fmt, [4, 7], [3, 5], 3), torch.randn(5, 28, dtype=torch.float64)),
                     (conv, torch.randn(5, 8, 9, 7, dtype=torch.float64))]:
        counted = _counted_flops(layer, x)
        assert counted == layer.chain_flops(5), (counted, layer.chain_flops(5))
    conv.merge = True
    assert conv.merged_sides() == (True, True)
    assert _counted_flops(conv, torch.randn(5, 8, 9, 7, dtype=torch.float64)) < conv.chain_flops(5)


@pytest.mark.parametrize("fmt", ["tt", "tr"])
@pytest.mark.parametrize("ins,outs,r,k,stride,pad", [
    ([4, 2], [3, 5], 3, (3, 3), (1, 1), (1, 1)),
    ([2, 3, 2], [2, 2, 2], 4, (3, 1), (2, 1), (0, 1)),
    ([16, 16], [16, 32], 8, (1, 1), (1, 1), (0, 0)),
])
@pytest.mark.parametrize("chain", ["linear", "nonlinear"])
def test_conv_merged_sides_compute_the_chain(fmt, ins, outs, r, k, stride, pad, chain):
    """Each side merged or not, one function: the merged 1x1 convs equal the mode-by-mode
    chain (the nonlinear chain too: its activations sit between the sides)."""
    spec = {"type": "conv2d", "format": fmt, "in_modes": ins, "out_modes": outs, "bias": True,
            "chain": chain, "kernel_size": list(k), "stride": list(stride), "padding": list(pad),
            "dilation": [1, 1], "input_hw": [9, 7]}
    spec["ranks"] = ranks_for(chain_dims(spec), r, ring=fmt == "tr")
    layer = _rand_cores(build_layer(spec).double()).eval()
    x = torch.randn(3, math.prod(ins), 9, 7, dtype=torch.float64)
    key = tuple(tuple(c.shape) for c in layer.cores)
    outs_by_choice = {}
    for sides in [(False, False), (True, False), (False, True), (True, True)]:
        layer._merged = (key, sides)
        outs_by_choice[sides] = layer(x)
    ref = outs_by_choice[(False, False)]
    for sides, y in outs_by_choice.items():
        assert rel(y, ref) <= 1e-10, sides


def test_conv_sides_merge_only_where_cheaper():
    """The choice follows the multiply-adds: a wide input side with small ranks merges; a
    side whose ranks exceed what the steps cost stays mode by mode."""
    cheap = _conv("tt", [4, 4], [4, 4], 2)
    assert cheap.merged_sides() == (True, True)
    # 512 channels, ranks 4 then 64 on both sides: per pixel the merged 512 x 64 matrices
    # cost 32,768 multiply-adds a side, the steps 10,240 (input) and 6,144 (output)
    spec = {"type": "conv2d", "format": "tt", "in_modes": [16, 32], "out_modes": [16, 32],
            "ranks": [1, 4, 64, 64, 4, 1], "bias": True, "chain": "linear", "kernel_size": [3, 3],
            "padding": [1, 1], "input_hw": [8, 8]}
    costly = _rand_cores(build_layer(spec).double()).eval()
    assert costly.merged_sides() == (False, False)
    spec["ranks"] = [1, 4, 64, 4, 4, 1]  # a rank-4 output side merges again
    assert build_layer(spec).merged_sides() == (False, True)


def test_exported_tt_conv_is_three_convs():
    """The ONNX of a TT conv layer with both sides merged: 1x1 conv, kxk conv, 1x1 conv (no
    per-pixel transposes or matmuls: what made the compressed ResNet-20 ONNX slower than
    dense onnxruntime)."""
    import onnx

    from tedepr_cli.export import to_onnx

    layer = _conv("tt", [4, 4], [4, 8], 3).float().eval()
    proto = to_onnx(layer, torch.randn(2, 16, 9, 7), 18)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 3 and "MatMul" not in ops and "Transpose" not in ops, ops
    layer.merge = False
    ops = [n.op_type for n in to_onnx(layer, torch.randn(2, 16, 9, 7), 18).graph.node]
    assert "MatMul" in ops, ops
    assert onnx.checker.check_model(proto) is None


def test_masked_flops_count_only_kept_entries():
    layer = _linear("tt", [4, 7], [3, 5], 3)
    masks = [torch.zeros_like(c, dtype=torch.bool) for c in layer.cores]
    masks[0].view(-1)[:5] = True
    assert layer.chain_flops(2, masks) == 2 * 5 * layer.core_uses(2)[0]


@pytest.mark.parametrize("fmt", ["tt", "tr"])
def test_nonlinear_chain_runs_and_has_no_dense_weight(fmt):
    layer = _linear(fmt, [4, 7], [3, 5], 3, chain="nonlinear").train()
    y = layer(torch.randn(8, 28, dtype=torch.float64))
    assert y.shape == (8, 15)
    with pytest.raises(ValueError):
        layer.dense_weight()
    conv = build_layer({"type": "conv2d", "format": fmt, "in_modes": [4, 2], "out_modes": [3, 5],
                        "ranks": ranks_for([4, 2, 9, 3, 5], 3, fmt == "tr"), "kernel_size": [3, 3],
                        "padding": [1, 1], "chain": "nonlinear", "input_hw": [6, 6]})
    assert conv(torch.randn(2, 8, 6, 6)).shape == (2, 15, 6, 6)


# ---------------------------------------------------------------------------- decomposition
@pytest.mark.parametrize("fmt,ins,outs", [("tt", [4, 6], [3, 5]), ("tt", [2, 3, 2], [2, 2, 3]),
                                          ("tr", [4, 6], [3, 5]), ("tr", [3, 4], [2, 5])])
def test_full_rank_decomposition_reconstructs_linear(fmt, ins, outs):
    w = torch.randn(math.prod(outs), math.prod(ins), dtype=torch.float64)
    spec = {"type": "linear", "format": fmt, "in_modes": ins, "out_modes": outs, "bias": False}
    dims = chain_dims(spec)
    spec["ranks"] = ranks_for(dims, full_rank(dims), ring=False)  # TR with r0 = 1: exact SVD
    spec["ranks"][0] = spec["ranks"][-1] = 1
    layer = build_layer(spec).double()
    err = decompose_into(layer, w)
    assert err <= 1e-5 and rel(layer.dense_weight(), w) <= 1e-5


@pytest.mark.parametrize("fmt", ["tt", "tr"])
def test_full_rank_decomposition_reconstructs_conv(fmt):
    w = torch.randn(6, 8, 3, 3, dtype=torch.float64)
    spec = {"type": "conv2d", "format": fmt, "in_modes": [2, 4], "out_modes": [2, 3],
            "kernel_size": [3, 3], "padding": [1, 1], "bias": False}
    dims = chain_dims(spec)
    spec["ranks"] = ranks_for(dims, full_rank(dims), ring=False)
    layer = build_layer(spec).double()
    assert decompose_into(layer, w) <= 1e-5


def test_low_rank_decomposition_error_is_reported_and_sensible():
    u, v = torch.randn(15, 2, dtype=torch.float64), torch.randn(2, 28, dtype=torch.float64)
    w = u @ v + 0.01 * torch.randn(15, 28, dtype=torch.float64)
    layer = _linear("tt", [4, 7], [3, 5], 2)
    err = decompose_into(layer, w)
    assert 0 < err < 1


def test_tr_rank_above_tensorly_limit_is_padded():
    layer = _linear("tr", [28, 28], [15, 20], 8)  # 8*8 > 28: tensorly's TR-SVD limit
    w = torch.randn(300, 784, dtype=torch.float64)
    err = decompose_into(layer, w)
    assert [tuple(c.shape) for c in layer.cores][0] == (8, 28, 8) and 0 < err < 1


@pytest.mark.parametrize("fmt,target", [("tt", "he"), ("tr", "lecun")])
def test_random_init_variance_matches_target(fmt, target):
    layer = _linear(fmt, [4, 7], [3, 5], 4).float()
    g = torch.Generator().manual_seed(1)
    variances = []
    for _ in range(300):
        want = init_random(layer, target, g)
        variances.append(float(layer.dense_weight().detach().var()))
    got = sum(variances) / len(variances)
    assert abs(got / want - 1) <= 0.10, (got, want)
    conv = _conv(fmt, [4, 2], [3, 5], 3).float()
    cv = []
    for _ in range(300):
        want = init_random(conv, target, g)
        cv.append(float(conv.dense_weight().detach().var()))
    assert abs(sum(cv) / len(cv) / want - 1) <= 0.10


# ---------------------------------------------------------------------------- LSTM, MHA
@pytest.mark.parametrize("fmt", ["tt", "tr"])
@pytest.mark.parametrize("bidirectional,layers,batch_first", [(False, 1, True), (True, 2, True),
                                                              (True, 1, False)])
def test_tensorized_lstm_matches_nn_lstm(fmt, bidirectional, layers, batch_first):
    torch.manual_seed(0)
    dense = nn.LSTM(12, 8, num_layers=layers, bidirectional=bidirectional,
                    batch_first=batch_first).double()
    dirs = 2 if bidirectional else 1
    ih = []
    for k in range(layers):
        n = 12 if k == 0 else 8 * dirs
        ins = [3, 4] if n == 12 else [4, n // 4]
        for _ in range(dirs):
            spec = {"type": "linear", "format": fmt, "in_modes": ins, "out_modes": [8, 4], "bias": True}
            spec["ranks"] = ranks_for(chain_dims(spec), 4, ring=fmt == "tr")
            ih.append(spec)
    spec = {"type": "lstm", "input_size": 12, "hidden_size": 8, "num_layers": layers,
            "bidirectional": bidirectional, "batch_first": batch_first, "bias": True, "ih": ih}
    t = build_layer(spec).double()
    init_module(t, dense, "random", "he", torch.Generator().manual_seed(0))
    # copy the tensorized W_ih back into the dense LSTM: both must then agree exactly
    with torch.no_grad():
        for idx, name in enumerate(t._suffixes()):
            getattr(dense, f"weight_ih_{name}").copy_(t.ih[idx].dense_weight())
            getattr(dense, f"bias_ih_{name}").copy_(t.ih[idx].bias)
            getattr(dense, f"weight_hh_{name}").copy_(getattr(t, f"weight_hh_{name}"))
            getattr(dense, f"bias_hh_{name}").copy_(getattr(t, f"bias_hh_{name}"))
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    out, (h, c) = t(x)
    ref, (hr, cr) = dense(x)
    assert rel(out, ref) <= 1e-10 and rel(h, hr) <= 1e-10 and rel(c, cr) <= 1e-10


@pytest.mark.parametrize("fmt", ["tt", "tr"])
def test_tensorized_mha_matches_nn_mha(fmt):
    torch.manual_seed(0)
    dense = nn.MultiheadAttention(16, 4, batch_first=True).double()

    def lin(n, m, outs):
        spec = {"type": "linear", "format": fmt, "in_modes": [4, 4], "out_modes": outs, "bias": True}
        spec["ranks"] = ranks_for(chain_dims(spec), 4, ring=fmt == "tr")
        return spec

    spec = {"type": "mha", "embed_dim": 16, "num_heads": 4, "batch_first": True,
            "in_proj": lin(16, 48, [12, 4]), "out_proj": lin(16, 16, [4, 4])}
    t = build_layer(spec).double()
    init_module(t, dense, "random", "he", torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense.in_proj_weight.copy_(t.in_proj.dense_weight())
        dense.in_proj_bias.copy_(t.in_proj.bias)
        dense.out_proj.weight.copy_(t.out_proj.dense_weight())
        dense.out_proj.bias.copy_(t.out_proj.bias)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    for kw in ({}, {"key_padding_mask": mask}, {"attn_mask": torch.ones(6, 6, dtype=torch.bool).triu(1)}):
        out, w = t(x, x, x, need_weights=True, **kw)
        ref, wr = dense(x, x, x, need_weights=True, **kw)
        assert rel(out, ref) <= 1e-10 and rel(w, wr) <= 1e-10
    y = torch.randn(2, 3, 16, dtype=torch.float64)  # cross-attention: separate q and k/v
    assert rel(t(y, x, x)[0], dense(y, x, x)[0]) <= 1e-10
