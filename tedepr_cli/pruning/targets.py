"""What the fine grain may prune, and what each prunable tensor stands for.

Prunable: the cores of tensorized layers, and the weights of dense Linear and convolution
layers (Conv1d/2d/3d, grouped, transposed), recurrent ``weight_ih``/``weight_hh`` (LSTM, GRU,
RNN) and MultiheadAttention ``in_proj_weight``. Biases, normalization parameters and
embeddings are never pruned (as in SNIP/GraSP/SynFlow).

Tensors are grouped by layer. Each group knows how many weights the *dense original* layer
had (``dense_count``): the sparsity budget is always relative to the dense model
(DESIGN §2.2), whether or not the layer was decomposed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..masks import get_masks, plain_named_parameters, tied_parameters
from ..tensorized.base import TensorizedLayer
from ..tensorized.wrappers import TensorizedLSTM


@dataclass
class Group:
    """One prunable layer: its tensors (parameter names) and its dense weight count."""

    name: str
    kind: str  # "cores" or "dense"
    params: list[str]
    dense_count: int
    module: nn.Module | None = field(default=None, repr=False)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def prunable_groups(model: nn.Module) -> list[Group]:
    """Every prunable layer of ``model`` in module order. A tied tensor (one tensor used by
    several layers, :func:`~tedepr_cli.masks.tied_parameters`) is one group, under its
    first name: pruned once with one mask and counted once in the budget."""
    aliases = tied_parameters(model)
    groups = [g for g in _groups(model) if not any(n in aliases for n in g.params)]
    return groups


def _groups(model: nn.Module) -> list[Group]:
    groups: list[Group] = []
    for mname, mod in model.named_modules():
        if isinstance(mod, TensorizedLayer):
            groups.append(Group(mname, "cores", [_join(mname, f"cores.{i}") for i in range(len(mod.cores))],
                                mod.dense_params(), mod))
        elif isinstance(mod, nn.Linear | nn.modules.conv._ConvNd):  # Conv1d/2d/3d, grouped, transposed
            groups.append(Group(mname, "dense", [_join(mname, "weight")], mod.weight.numel(), mod))
        elif isinstance(mod, nn.RNNBase | TensorizedLSTM):  # LSTM, GRU, RNN
            for pname in _recurrent_weights(mod):
                groups.append(Group(_join(mname, pname), "dense", [_join(mname, pname)],
                                    getattr(mod, pname).numel(), mod))
        elif isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
            groups.append(Group(_join(mname, "in_proj_weight"), "dense",
                                [_join(mname, "in_proj_weight")], mod.in_proj_weight.numel(), mod))
    return groups


def _recurrent_weights(mod: nn.Module) -> list[str]:
    """The weight matrices of a (tensorized) LSTM/GRU/RNN in the module's own order; masked ones
    included (a mask moves a parameter out of ``named_parameters(recurse=False)``)."""
    if isinstance(mod, TensorizedLSTM):  # a chain W_hh: its cores are a layer of their own (hh.<i>)
        return [] if mod.hh_tensorized else [f"weight_hh_{s}" for s in mod._suffixes()]
    return [n for n in mod._flat_weights_names if n.startswith("weight_")]


def prunable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The prunable tensors by plain parameter name (a masked one: the tensor it trains)."""
    params = plain_named_parameters(model)
    return {n: params[n] for g in prunable_groups(model) for n in g.params}


def dense_prunable_count(model: nn.Module) -> int:
    """Prunable weights of the dense model this one came from (the budget's reference)."""
    return sum(g.dense_count for g in prunable_groups(model))


def kept_counts(model: nn.Module) -> dict[str, int]:
    """The weight counts every report gives (``prune``, ``export``, ``bench``, ``info``),
    one definition for all:

    - ``params``: every parameter of ``model`` (a tied tensor once);
    - ``kept``: the **stored entries** of the prunable tensors (the cores of tensorized
      layers, the dense weights; see :func:`prunable_groups`): a masked tensor counts the
      entries its mask keeps, an unmasked one all of its entries. The budget counts these,
      training updates them and the compact file stores them;
    - ``other``: the parameters outside the prunable tensors (biases, normalization,
      embeddings and other weights tedepr does not prune), stored whole;
    - ``effective_nonzero``: the non-zero entries of the dense weights the prunable layers
      compute with: each tensorized layer's dense weight rebuilt from its masked cores
      (``TensorizedLayer.dense_weight``), each masked dense weight as masked. A chain of a
      few stored core entries computes with many more effective weights (the sample
      LeNet-300-100 pruned with data to 99.5 %: 1,331 stored, 51,444 effective). A layer with no
      dense equivalent (a nonlinear chain) counts its non-zero core entries.
    """
    params = plain_named_parameters(model)
    masks = get_masks(model)
    groups = prunable_groups(model)
    prunable = {n for g in groups for n in g.params} | set(masks)
    total = sum(p.numel() for p in params.values())
    kept = sum(int(masks[n].sum()) if n in masks else params[n].numel() for n in prunable)
    effective = 0
    with torch.no_grad():
        for g in groups:
            if g.kind == "cores":
                try:
                    w = g.module.dense_weight()
                except (NotImplementedError, ValueError, AttributeError):  # a nonlinear chain
                    effective += sum(int(torch.count_nonzero(c)) for c in g.module.cores)
                    continue
            else:
                w = getattr(g.module, g.params[0].rsplit(".", 1)[-1])  # masked: the computed weight
            effective += int(torch.count_nonzero(w))
    return {"params": total, "kept": kept, "other": total - sum(params[n].numel() for n in prunable),
            "effective_nonzero": effective}
