"""Initialize tensorized layers: from a pretrained dense weight, or random.

Pretrained: TT-SVD (Oseledets 2011, ``tensorly.decomposition.tensor_train``) or TR-SVD
(Zhao et al. 2016, ``tensorly.decomposition.tensor_ring``) of the dense weight reshaped to
the layer's modes. Ranks that the SVD cannot fill (a smaller full rank, tensorly's
``rank[0]·rank[1] <= dim`` limit of TR-SVD) are zero-padded, which changes nothing in the
product, so the layer keeps its planned shape.

Random: i.i.d. ``N(0, σ²)`` cores give ``Var W = σ^{2L} ∏_bonds r`` (L cores, one term
per path through the ranks); σ is chosen so ``Var W`` equals He (``2/fan_in``) or LeCun
(``1/fan_in``) of the dense layer. A TT-embedding's table targets ``Var W = 1``, the
``N(0, 1)`` of ``nn.Embedding``; from a pretrained table it is the TT-SVD of the table as
a ``(dim, vocab)`` matrix with zero rows for the padded vocab.
"""

from __future__ import annotations

import math

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import tensor_ring, tensor_train
from torch import Tensor, nn

from .base import TensorizedLayer
from .conv import ChainConv2d
from .embedding import TTEmbedding
from .tt import TTLinear
from .wrappers import TensorizedLSTM, TensorizedMHA

VARIANCE_TARGETS = {"he": 2.0, "lecun": 1.0}


def _pad_core(core: np.ndarray, shape: tuple[int, ...]) -> Tensor:
    out = np.zeros(shape, dtype=np.float64)
    out[tuple(slice(0, s) for s in core.shape)] = core
    return torch.from_numpy(out)


def _chain_tensor(layer: TensorizedLayer, w: Tensor) -> np.ndarray:
    """The dense weight as the tensor whose modes follow the layer's cores."""
    s = layer._spec
    ins, outs = list(s["in_modes"]), list(s["out_modes"])
    w = w.detach().to(torch.float64).cpu()
    if isinstance(layer, TTLinear | TTEmbedding):  # modes paired (n_k, m_k) per core
        d = len(ins)
        t = w.reshape(*outs, *ins)
        order = [x for k in range(d) for x in (d + k, k)]
        return t.permute(*order).reshape([n * m for n, m in zip(ins, outs, strict=True)]).numpy()
    if isinstance(layer, ChainConv2d):
        sp = math.prod(layer.kernel_size)
        t = w.reshape(*outs, *ins, sp)
        e, d = len(outs), len(ins)
        order = list(range(e, e + d)) + [e + d] + list(range(e))
        return t.permute(*order).contiguous().numpy()
    t = w.reshape(*outs, *ins)  # TR linear: (n..., m...)
    e, d = len(outs), len(ins)
    return t.permute(*(list(range(e, e + d)) + list(range(e)))).contiguous().numpy()


def decompose_into(layer: TensorizedLayer, weight: Tensor) -> float:
    """Set ``layer``'s cores from the dense ``weight``; returns the relative error
    ``‖W − Ŵ‖ / ‖W‖`` of the linear chain."""
    tensor = _chain_tensor(layer, weight)
    shapes = [tuple(c.shape) for c in layer.cores]
    ranks = layer.ranks
    prev = tl.get_backend()
    tl.set_backend("numpy")
    try:
        if layer.format == "tt":
            factors = tensor_train(tensor, rank=list(ranks)).factors
        else:
            factors = _tr_svd(tensor, list(ranks))
    finally:
        tl.set_backend(prev)
    with torch.no_grad():
        for core, f, shape in zip(layer.cores, factors, shapes, strict=True):
            core.copy_(_pad_core(np.asarray(f).reshape(f.shape[0], *shape[1:-1], f.shape[-1]),
                                 shape).to(core.dtype))
        approx = layer.dense_weight() if layer.chain == "linear" else _linear_part(layer)
        err = float(torch.linalg.norm(approx.double() - weight.double().reshape(approx.shape))
                    / max(float(torch.linalg.norm(weight.double())), 1e-30))
    return err


def _linear_part(layer: TensorizedLayer) -> Tensor:
    chain = layer.chain
    layer.chain = "linear"
    try:
        return layer.dense_weight()
    finally:
        layer.chain = chain


def _tr_svd(tensor: np.ndarray, ranks: list[int]) -> list[np.ndarray]:
    """TR-SVD started at the first mode whose unfolding can hold ``rank[m]·rank[m+1]``
    (tensorly's limit); if none can, at the largest mode with those two ranks shrunk (the
    padding restores the shape). With ``r_0 = 1`` this is TT-SVD, exact at full rank."""
    dims = tensor.shape
    r = list(ranks)
    total = math.prod(dims)

    def limit(m: int) -> int:
        return min(dims[m], total // dims[m])

    fits = [m for m in range(len(dims)) if r[m] * r[m + 1] <= limit(m)]
    mode = fits[0] if fits else int(np.argmax(dims))
    a, b = r[mode], r[mode + 1]
    while a * b > limit(mode):
        if a >= b:
            a -= 1
        else:
            b -= 1
    r[mode], r[mode + 1] = max(a, 1), max(b, 1)
    if mode == 0:
        r[-1] = r[0]
    if mode + 1 == len(dims):
        r[0] = r[-1] = r[mode + 1]
    return list(tensor_ring(tensor, rank=r, mode=mode).factors)


def init_random(layer: TensorizedLayer, target: str = "he", generator: torch.Generator | None = None,
                fan_in: int | None = None) -> float:
    """Variance-preserving random cores; returns the target ``Var W``."""
    if target not in VARIANCE_TARGETS:
        raise ValueError(f"init variance target must be one of {list(VARIANCE_TARGETS)}")
    if fan_in is None:
        fan_in = layer.in_features * (math.prod(layer.kernel_size) if isinstance(layer, ChainConv2d) else 1)
    var = VARIANCE_TARGETS[target] / fan_in
    ranks = layer.ranks
    n_cores = len(layer.cores)
    paths = math.prod(ranks[:n_cores])  # every bond of the chain/ring once
    sigma = (var / paths) ** (1.0 / (2 * n_cores))
    with torch.no_grad():
        for core in layer.cores:
            core.copy_(torch.randn(core.shape, generator=generator) * sigma)
        if layer.bias is not None:
            layer.bias.zero_()
    return var


def init_module(new: nn.Module, old: nn.Module | None, init: str, target: str,
                generator: torch.Generator | None) -> list[float]:
    """Initialize a tensorized replacement of ``old``; returns the relative errors of its
    decomposed matrices (pretrained) or an empty list (random)."""
    errors: list[float] = []
    if isinstance(new, TTEmbedding):
        if init == "pretrained":
            table = old.weight.detach()
            padded = table.new_zeros(new.in_features, new.embedding_dim)
            padded[: table.shape[0]] = table
            errors.append(decompose_into(new, padded.T))
        else:
            init_random(new, "lecun", generator, fan_in=1)
        return errors
    if isinstance(new, TensorizedLSTM):
        for idx, name in enumerate(new._suffixes()):
            lin = new.ih[idx]
            if init == "pretrained":
                errors.append(decompose_into(lin, getattr(old, f"weight_ih_{name}")))
                _copy(lin.bias, getattr(old, f"bias_ih_{name}", None))
            else:
                init_random(lin, target, generator)
            if new.hh_tensorized:  # W_hh as a chain: TT/TR-SVD of the checkpoint's, or random
                hh, w_hh = new.hh[idx], getattr(old, f"weight_hh_{name}")
                if init == "pretrained":
                    errors.append(decompose_into(hh, w_hh))
                else:  # the variance of nn.LSTM's U(±1/√H): 1/(3H)
                    init_random(hh, "lecun", generator, fan_in=3 * new.hidden_size)
            else:
                _copy_or_default(getattr(new, f"weight_hh_{name}"), getattr(old, f"weight_hh_{name}"), init,
                                 generator)
            b = getattr(new, f"bias_hh_{name}", None)
            if b is not None:
                _copy_or_zero(b, getattr(old, f"bias_hh_{name}", None), init)
        return errors
    if isinstance(new, TensorizedMHA):
        if init == "pretrained":
            errors.append(decompose_into(new.in_proj, old.in_proj_weight))
            _copy(new.in_proj.bias, old.in_proj_bias)
        else:
            init_random(new.in_proj, target, generator)
        if isinstance(new.out_proj, TensorizedLayer):
            if init == "pretrained":
                errors.append(decompose_into(new.out_proj, old.out_proj.weight))
                _copy(new.out_proj.bias, old.out_proj.bias)
            else:
                init_random(new.out_proj, target, generator)
        else:
            new.out_proj.load_state_dict(old.out_proj.state_dict())
        return errors
    if init == "pretrained":
        errors.append(decompose_into(new, old.weight))
        _copy(new.bias, getattr(old, "bias", None))
    else:
        init_random(new, target, generator)
    return errors


def _copy(dst: Tensor | None, src: Tensor | None) -> None:
    if dst is not None:
        with torch.no_grad():
            dst.copy_(src if src is not None else torch.zeros_like(dst))


def _copy_or_zero(dst: Tensor, src: Tensor | None, init: str) -> None:
    with torch.no_grad():
        dst.copy_(src if (init == "pretrained" and src is not None) else torch.zeros_like(dst))


def _copy_or_default(dst: Tensor, src: Tensor, init: str, generator: torch.Generator | None) -> None:
    """Dense hidden-to-hidden weights: copied (pretrained) or LSTM's default U(±1/√H)."""
    with torch.no_grad():
        if init == "pretrained":
            dst.copy_(src)
        else:
            bound = 1.0 / math.sqrt(dst.shape[1])
            dst.copy_(torch.rand(dst.shape, generator=generator) * 2 * bound - bound)
