"""Masks ride on the module: the one place where pruning masks are attached, read and folded.

A pruned tensor is a ``torch.nn.utils.parametrize`` parametrization of its parameter, as in
``torch.ao.pruning`` (``FakeSparsity``): every read of ``layer.weight`` (or ``layer.cores[k]``)
returns ``original * mask``. Gradients of pruned entries are therefore exactly zero, the
stored ``original`` is zeroed at the pruned positions when the mask is attached, and so any
optimizer (SGD with momentum and weight decay, Adam, AdamW, ...), AMP, gradient clipping or a
third-party trainer keeps pruned entries exactly ``0.0`` in memory -- no training loop has to
know about masks.

Names: masks are keyed by the *plain* parameter name the unpruned model has
(``fc1.weight``, ``fc1.cores.0``), never by the parametrization's internal names
(``fc1.parametrizations.weight.original``). :func:`plain_state_dict` gives the state dict
under those names with the masks folded in, which is what artifacts store
(:mod:`tedepr_cli.artifact`); :func:`attach_masks` re-attaches masks after a load.

Reference: PyTorch, ``torch.nn.utils.parametrize`` and ``torch.ao.pruning`` (``squash_mask``
is :func:`remove_masks` here).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

_PARAM_TAG = ".parametrizations."


class FixedMask(nn.Module):
    """Parametrization ``w -> w * mask`` with a fixed boolean ``mask`` (a buffer, so it moves
    with ``.to(device)`` and is saved in ``state_dict``)."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask

    def extra_repr(self) -> str:
        return f"kept={int(self.mask.sum())}/{self.mask.numel()}"


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = name.rpartition(".")
    try:
        return (model.get_submodule(mod_name) if mod_name else model), attr
    except AttributeError:
        raise KeyError(f"{name!r} is not a parameter of the model") from None


def _mask_of(module: nn.Module, attr: str) -> FixedMask | None:
    if not parametrize.is_parametrized(module, attr):
        return None
    for p in module.parametrizations[attr]:
        if isinstance(p, FixedMask):
            return p
    return None


def _own_class(module: nn.Module) -> None:
    """Give a parametrized ``module`` a class of its own.

    ``torch.nn.utils.parametrize`` keeps each parametrized tensor as a property on a class
    made for the module, and ``copy.deepcopy`` shares that class between the copies, so
    adding or removing a parametrization on one copy would add or delete the property on all
    of them (removing a mask from a copy broke the original's forward). Cloning the class
    first keeps every change to this module."""
    cls = module.__class__
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def attach_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Attach (or replace) the boolean ``masks`` on ``model``'s parameters, in place.

    ``masks`` maps plain parameter names to boolean tensors of the parameter's shape. The
    parameter's stored values are zeroed where the mask is ``False`` so that the trainable
    tensor, its gradient and every optimizer state derived from it stay zero there.

    A tensor shared by several parameters (tied weights, :func:`tied_parameters`) has one
    mask: given under any of its names, it is attached under all of them, so every layer
    that uses the tensor sees it masked.

    Raises ``KeyError`` for a name that is not a parameter of ``model`` and ``ValueError``
    for a mask of the wrong shape.
    """
    masks = with_tied_names(model, masks)
    for name, mask in masks.items():
        module, attr = _owner(model, name)
        existing = _mask_of(module, attr)
        current = getattr(module, attr, None)
        if not isinstance(current, Tensor):
            raise KeyError(f"{name!r} is not a parameter of the model")
        if tuple(mask.shape) != tuple(current.shape):
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, the parameter "
                             f"{tuple(current.shape)}")
        mask = mask.to(device=current.device, dtype=torch.bool)
        if existing is not None:
            existing.mask.copy_(mask)
            original = module.parametrizations[attr].original
        else:
            if parametrize.is_parametrized(module):
                _own_class(module)
            parametrize.register_parametrization(module, attr, FixedMask(mask), unsafe=True)
            original = module.parametrizations[attr].original
        with torch.no_grad():
            original.mul_(mask.to(original.dtype))


def mask_of(module: nn.Module, attr: str) -> Tensor | None:
    """The boolean mask attached to ``module``'s tensor ``attr`` (``"weight"``, or ``"0"`` for
    the first entry of a ``ParameterList`` such as a tensorized layer's ``cores``), or None when
    that tensor is not pruned. The live buffer: do not modify it in place."""
    fm = _mask_of(module, attr)
    return None if fm is None else fm.mask


def stored_and_mask(module: nn.Module, attr: str) -> tuple[Tensor, Tensor | None] | None:
    """``module``'s tensor ``attr`` as stored -- the trainable ``original`` of a masked one,
    the parameter itself otherwise -- and its boolean mask (None: not pruned); None when a
    parametrization other than one :class:`FixedMask` sits on it (its value is then not
    ``original * mask``). Reads compute nothing: a kernel that uses only the kept entries
    reads them here, and the gradient it returns at those entries is the masked tensor's
    (:mod:`tedepr_cli.kernels.chain_train`)."""
    # parametrize.is_parametrized(module, attr), without nn.Module.__getattr__ (a training
    # kernel asks once per core and step)
    plists = module._modules.get("parametrizations")
    if plists is None or attr not in plists:
        return getattr(module, attr), None
    plist = plists[attr]
    if len(plist) != 1 or not isinstance(plist[0], FixedMask):
        return None
    return plist.original, plist[0].mask


def _masked(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, FixedMask]]:
    """(plain name, owning module, attribute, mask) of every masked parameter, in module order."""
    for mod_name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for attr in module.parametrizations:
            fm = _mask_of(module, attr)
            if fm is not None:
                yield (f"{mod_name}.{attr}" if mod_name else attr), module, attr, fm


def get_masks(model: nn.Module) -> dict[str, Tensor]:
    """The boolean masks attached to ``model``, by plain parameter name (empty if unpruned);
    a tied tensor once, under its first name (:func:`tied_parameters`).

    The tensors returned are the live buffers: do not modify them in place."""
    aliases = tied_parameters(model)
    return {name: fm.mask for name, _, _, fm in _masked(model) if name not in aliases}


def is_pruned(model: nn.Module) -> bool:
    """True when at least one parameter of ``model`` carries a mask."""
    return next(_masked(model), None) is not None


def remove_masks(model: nn.Module) -> dict[str, Tensor]:
    """Fold every mask into its parameter (``squash_mask``) and remove the parametrization,
    in place. Returns the masks that were removed (plain names)."""
    removed = {}
    for name, module, attr, fm in list(_masked(model)):
        removed[name] = fm.mask.clone()
        _own_class(module)
        parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    return removed


def folded_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every mask folded in (plain parameters, no
    parametrization): for tracing, export and compiled kernels, where the mask multiply would
    only cost time. ``model`` itself is not changed."""
    out = copy.deepcopy(model)
    remove_masks(out)
    return out


def plain_name(name: str) -> str:
    """``a.parametrizations.weight.original`` -> ``a.weight`` (other names unchanged)."""
    if _PARAM_TAG not in name:
        return name
    head, _, tail = name.partition(_PARAM_TAG)
    attr = tail.split(".")[0]
    return f"{head}.{attr}" if head else attr


def plain_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` under the plain names, a masked parameter as the tensor it
    trains (its ``original``: zero where pruned, as long as the mechanism holds -- so a
    resume state shows it if it ever did not), the mask buffers left out
    (:func:`get_masks` has them)."""
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        if _PARAM_TAG in key:
            if not key.endswith(".original"):
                continue  # the parametrization's own buffers (the mask)
            out[plain_name(key)] = value
        else:
            out[key] = value
    return out


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """Tied weights: every plain parameter name that holds the same tensor as an earlier one
    (``dec.weight`` -> ``enc.weight`` when ``dec.weight is enc.weight``), mapped to that first
    name (module order, as ``named_parameters`` lists it). Empty for a model without ties.
    A tied tensor is pruned once, counted once, stored once and re-tied on load."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        plain = plain_name(name)
        canonical = first.setdefault(id(p), plain)
        if canonical != plain:
            out[plain] = canonical
    return out


def with_tied_names(model: nn.Module, by_name: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``by_name`` (plain parameter name -> value, e.g. a mask or a state entry)
    where each tied weight given under one of its names (:func:`tied_parameters`) is also
    given under the other: checkpoints and callers often name a tied tensor once."""
    out = dict(by_name)
    for alias, canonical in tied_parameters(model).items():
        if canonical in out and alias not in out:
            out[alias] = out[canonical]
        elif alias in out and canonical not in out:
            out[canonical] = out[alias]
    return out


def plain_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters by plain name (a masked parameter's ``original``)."""
    return {plain_name(n): p for n, p in model.named_parameters()}


def load_plain_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a state dict saved under plain names (:func:`plain_state_dict`) into ``model``,
    whose masked parameters keep their masks (values go into each ``original``; entries the
    mask prunes are re-zeroed). Raises ``KeyError`` on a missing or unexpected key."""
    own = model.state_dict()
    targets: dict[str, str] = {}  # plain name -> key in model.state_dict()
    for key in own:
        if _PARAM_TAG in key:
            if key.endswith(".original"):
                targets[plain_name(key)] = key
        else:
            targets[key] = key
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise KeyError(f"state does not fit the model: missing {missing}, unexpected {unexpected}")
    mask_buffers = {k: v for k, v in own.items() if _PARAM_TAG in k and not k.endswith(".original")}
    model.load_state_dict({**{targets[k]: v for k, v in state.items()}, **mask_buffers})
    with torch.no_grad():
        for _, module, attr, fm in _masked(model):
            original = module.parametrizations[attr].original
            original.mul_(fm.mask.to(original.dtype))
