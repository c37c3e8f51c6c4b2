"""Build any tensorized module from its JSON spec (the manifest's tensorization plan)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import BadInput
from .embedding import TTEmbedding
from .tr import TRConv2d, TRLinear
from .tt import TTConv2d, TTLinear
from .wrappers import TensorizedLSTM, TensorizedMHA

FORMATS = ("tt", "tr")
_CLASSES = {("linear", "tt"): TTLinear, ("linear", "tr"): TRLinear,
            ("conv2d", "tt"): TTConv2d, ("conv2d", "tr"): TRConv2d, ("embedding", "tt"): TTEmbedding}
TENSORIZED = (TTLinear, TRLinear, TTConv2d, TRConv2d, TTEmbedding, TensorizedLSTM, TensorizedMHA)


def build_layer(spec: dict[str, Any]) -> nn.Module:
    """A tensorized module for ``spec``; malformed specs are :class:`BadInput`."""
    if not isinstance(spec, dict):
        raise BadInput("tensorization spec must be an object")
    kind = spec.get("type")
    try:
        if kind == "lstm":
            return TensorizedLSTM(spec)
        if kind == "mha":
            return TensorizedMHA(spec)
        cls = _CLASSES.get((kind, spec.get("format")))
        if cls is None:
            raise BadInput(f"unknown tensorized layer type/format {kind!r}/{spec.get('format')!r}")
        return cls(spec)
    except (KeyError, TypeError, ValueError) as e:
        raise BadInput(f"malformed tensorization spec ({type(e).__name__}: {e})") from None


def is_tensorized(m: nn.Module) -> bool:
    return isinstance(m, TENSORIZED)


def tensorized_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: spec}`` of every outermost tensorized module of ``model``: what an
    artifact's ``tensorization.layers`` stores and
    :func:`~tedepr_cli.tensorized.plan.rebuild` re-creates."""
    out: dict[str, dict[str, Any]] = {}
    for name, mod in model.named_modules():
        if is_tensorized(mod) and not any(name.startswith(f"{n}.") for n in out):
            out[name] = mod.spec()
    return out


def to_dense_layer(layer: nn.Module) -> nn.Module:
    """The dense ``nn.Linear``/``nn.Conv2d`` equal to a linear-chain tensorized Linear/Conv2d
    (its :meth:`~.base.TensorizedLayer.dense_weight` and bias), the ``nn.Embedding`` equal to
    a :class:`~.embedding.TTEmbedding` (its table, padding row zero), or the ``nn.LSTM`` equal to
    a ``TensorizedLSTM`` (:meth:`~.wrappers.TensorizedLSTM.dense_weights`): the reference a chain must
    equal, and the "rebuild W once" execution path. Raises ``ValueError`` for a nonlinear
    chain (no single dense weight)."""
    import torch

    from .conv import ChainConv2d

    if isinstance(layer, TensorizedLSTM):  # nn.LSTM with each W_ih rebuilt from its cores
        with torch.no_grad():
            weights = {n: w.detach() for n, w in layer.dense_weights().items()}
        w = weights["weight_hh_l0"]
        lstm = nn.LSTM(layer.ih[0].in_features, layer.hidden_size, layer.num_layers,
                       bias="bias_hh_l0" in weights, batch_first=layer.batch_first,
                       bidirectional=layer.bidirectional, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for n, t in weights.items():
                getattr(lstm, n).copy_(t)
        return lstm.train(layer.training)
    if isinstance(layer, TTEmbedding):
        with torch.no_grad():
            table = layer.weight.detach()
        emb = nn.Embedding(layer.num_embeddings, layer.embedding_dim, layer.padding_idx,
                           device=table.device, dtype=table.dtype)
        with torch.no_grad():
            emb.weight.copy_(table)
        return emb.train(layer.training)
    with torch.no_grad():
        w = layer.dense_weight().detach()
        if isinstance(layer, ChainConv2d):
            dense = nn.Conv2d(layer.in_features, layer.out_features, layer.kernel_size, layer.stride,
                              layer.padding, layer.dilation, bias=layer.bias is not None)
        else:
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense = dense.to(device=w.device, dtype=w.dtype)
        dense.weight.copy_(w)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias.detach())
    dense.train(layer.training)
    return dense
