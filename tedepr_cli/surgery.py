"""Module surgery: replacing one submodule of a model by name (the one place that does it:
tensorization swaps layers in, the execution planner swaps planned modules in), and running a
model in eval mode without changing the caller's train/eval flags."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model``'s submodule ``name`` (dotted, e.g. ``layer1.0.conv1``) is;
    returns the module it replaced. Raises ``AttributeError`` if ``name`` does not exist."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the ``with`` block; afterwards every submodule gets back its
    own train/eval flag (``model.train(was)`` would flatten a mix, e.g. frozen BatchNorm in a
    training model)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in flags:
            m.training = was
