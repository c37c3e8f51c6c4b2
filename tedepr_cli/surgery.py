"""Module surgery: replacing one submodule of a model by name (the one place that does it:
tensorization swaps layers in, the execution planner swaps planned modules in)."""

from __future__ import annotations

from torch import nn


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model``'s submodule ``name`` (dotted, e.g. ``layer1.0.conv1``) is;
    returns the module it replaced. Raises ``AttributeError`` if ``name`` does not exist."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old
