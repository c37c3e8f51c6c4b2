"""Module surgery: replacing one submodule of a model by name (the one place that does it:
tensorization swaps layers in, the execution planner swaps planned modules in), and running a
model in eval mode without changing the caller's train/eval flags."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .errors import BadInput, opt
from .tensorized.embedding import TTEmbedding

EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag, TTEmbedding)  # layers that take token ids


def swap_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model``'s submodule ``name`` (dotted, e.g. ``layer1.0.conv1``) is;
    returns the module it replaced. Raises ``AttributeError`` if ``name`` does not exist."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old


@contextmanager
def eval_mode(model: nn.Module, batch_stats: bool = False) -> Iterator[nn.Module]:
    """``model`` in eval mode for the ``with`` block (``batch_stats``: BatchNorm layers in
    train mode, normalizing with batch statistics and updating their running buffers: the
    caller saves those if it needs them); afterwards every submodule gets back its own
    train/eval flag (``model.train(was)`` would flatten a mix, e.g. frozen BatchNorm in a
    training model)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    if batch_stats:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    try:
        yield model
    finally:
        for m, was in flags:
            m.training = was


# ---------------------------------------------------------------------------- probe inputs
def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first leaf module holding parameters, in registration order (the layer the
    input meets first in a model written in the usual order), or None. An embedding counts
    as a leaf (a TT-embedding holds its cores in a child ``ParameterList``)."""
    for name, mod in model.named_modules():
        if isinstance(mod, EMBEDDINGS):
            return name, mod
        if not any(True for _ in mod.children()) and any(True for _ in mod.parameters(recurse=False)):
            return name, mod
    return None


def example_input(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, fill: str = "zeros",
                  generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """A probe input of ``(batch, *input_shape)`` in the dtype and range ``model`` expects.

    A model whose first layer (:func:`first_layer`) is an ``nn.Embedding``/``EmbeddingBag``
    or a TT-embedding takes token ids: ``int64`` in ``[0, num_embeddings)`` (``fill``: ``zeros`` -> id 0,
    ``ones`` -> id 1, ``rand`` -> uniform ids). Any other model takes ``dtype`` floats:
    zeros, ones, or uniform [0, 1) (``rand``). ``generator`` seeds ``rand``.
    """
    shape = (batch, *input_shape)
    first = first_layer(model)
    if first is not None and isinstance(first[1], EMBEDDINGS):
        vocab = int(first[1].num_embeddings)
        if fill == "rand":
            return torch.randint(0, vocab, shape, generator=generator, dtype=torch.int64)
        return torch.full(shape, min(1 if fill == "ones" else 0, vocab - 1), dtype=torch.int64)
    if fill == "rand":
        return torch.rand(shape, generator=generator, dtype=dtype)
    return (torch.ones if fill == "ones" else torch.zeros)(shape, dtype=dtype)


def is_token_model(model: nn.Module) -> bool:
    """Whether ``model`` takes integer token ids (its first layer is an embedding)."""
    first = first_layer(model)
    return first is not None and isinstance(first[1], EMBEDDINGS)


INPUT_KINDS = ("flat", "image", "sequence", "tokens")


def input_kind(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """How samples are presented to ``model`` (the one place the kind is derived):
    ``tokens`` for a model whose first layer is an embedding (int64 ids, no preprocessing),
    else by the per-sample rank: 1 -> ``flat`` features, 2 -> ``sequence`` (time steps x
    features), 3 -> ``image`` (C x H x W). A kind the model declares itself
    (``model.input_kind``, as the zoo models do) wins."""
    declared = getattr(model, "input_kind", None)
    if declared in INPUT_KINDS:
        return declared
    if is_token_model(model):
        return "tokens"
    return {1: "flat", 2: "sequence"}.get(len(input_shape), "image")


# ---------------------------------------------------------------------------- token inputs
#: the arrays a token dataset may hold, in the order they are stacked into one int64
#: tensor ``[N, k, L]`` (``input_ids`` alone stays ``[N, L]``)
TOKEN_ARRAYS = ("input_ids", "attention_mask", "token_type_ids")


def token_ids(x: Tensor) -> Tensor:
    """The ``input_ids`` of a token batch: ``x`` itself (``[N, L]``) or its first stacked
    array (``[N, k, L]`` with ``attention_mask``/``token_type_ids``, :data:`TOKEN_ARRAYS`)."""
    return x[:, 0] if x.dim() == 3 and not x.is_floating_point() else x


def call_args(model: nn.Module, x: Tensor) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    """``(args, kwargs)`` to call ``model`` on the batch ``x``.

    A float batch, or token ids ``[N, L]``, is the one positional argument. Stacked token
    arrays ``[N, k, L]`` (int64; :data:`TOKEN_ARRAYS` order) are passed by the names of the
    forward's parameters, as a Hugging Face-style ``forward(input_ids, attention_mask=None,
    token_type_ids=None)`` takes them: ``input_ids`` to the parameter of that name (else
    the first positional one), the others to parameters of their names (or ``**kwargs``);
    an array the forward has no parameter for is not passed (a single-input token model
    gets only ``input_ids``).
    """
    if x.dim() != 3 or x.is_floating_point():
        return (x,), {}
    fn = getattr(model, "module", model)  # DistributedDataParallel: the wrapped model's signature
    try:
        params = inspect.signature(fn.forward).parameters
    except (TypeError, ValueError):
        return (x[:, 0],), {}
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    kwargs: dict[str, Tensor] = {}
    for i, name in enumerate(TOKEN_ARRAYS[1:x.shape[1]], start=1):
        if name in named or var_kw:
            kwargs[name] = x[:, i]
    if "input_ids" in named:
        return (), {"input_ids": x[:, 0], **kwargs}
    return (x[:, 0],), kwargs


def feed(model: nn.Module, x: Tensor) -> Any:
    """``model``'s output on the batch ``x`` (:func:`call_args`: token arrays by name)."""
    args, kwargs = call_args(model, x)
    return model(*args, **kwargs)


def first_embedding(model: nn.Module) -> nn.Module | None:
    """The embedding that token ids meet first (:func:`first_layer`), or None."""
    first = first_layer(model)
    return first[1] if first is not None and isinstance(first[1], EMBEDDINGS) else None


def dry_forward(model: nn.Module, input_shape: tuple[int, ...]) -> Tensor:
    """One eval-mode, no-grad forward of :func:`example_input` (batch 1): the output.

    A forward that fails on this input (a shape the model cannot take: "Output size is too
    small" after too many poolings, a mismatched Linear, wrong dtype) raises
    :class:`~tedepr_cli.errors.BadInput` naming the input shape and the innermost layer
    that was running, with torch's first line. Train/eval flags are restored.
    """
    running: list[str] = []

    def enter(name: str):
        def pre(_m, _a):
            running.append(name)
        return pre

    def leave(name: str):
        def post(_m, _a, _o):
            if running and running[-1] == name:
                running.pop()
        return post

    handles = []
    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(enter(name)))
            handles.append(mod.register_forward_hook(leave(name)))
    try:
        with eval_mode(model), torch.no_grad():
            x = example_input(model, tuple(input_shape))
            return model(x)
    except (RuntimeError, ValueError, IndexError, TypeError, AssertionError) as e:
        where = ""
        if running:
            name = running[-1]
            where = f" in layer {name} ({type(model.get_submodule(name)).__name__})"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        shape = "x".join(map(str, input_shape))
        raise BadInput(f"the model's forward fails on inputs of shape {shape} (per sample){where}: "
                       f"{first}; pass the {opt('input-shape')} the model takes") from None
    finally:
        for h in handles:
            h.remove()
