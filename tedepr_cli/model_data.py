"""Data prepared for a model: the one place a ``--data`` path becomes samples shaped, scaled
and normalized the way a model expects.

Every command and stage that feeds a model (``prune`` scoring batches, ``finetune``,
``eval``, ``bench --data``, ``decompose --data``, ``export --data``, ``info``) goes through
:func:`open_for_model`, so all of them honour the preprocessing recorded in the model's
manifest (``data.preprocess``: the normalization the model was trained with) and agree on
accuracy for the same run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .datasets import Dataset, Preprocess, Split, check_classes, make_split, open_dataset, resolve_preprocess
from .datasets.base import ArraySource, ConcatSource
from .errors import BadInput, opt
from .evaluate import num_outputs
from .logs import log
from .surgery import TOKEN_ARRAYS, first_embedding


class ModelLike(Protocol):
    """What this module needs of a model holder (an :class:`~tedepr_cli.artifact.Artifact`)."""

    model: nn.Module
    meta: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    @property
    def input_kind(self) -> str: ...


def recorded_preprocess(art: ModelLike) -> dict[str, Any] | None:
    """The preprocessing the model's manifest records (None for a model never trained here)."""
    return (art.meta.get("data") or {}).get("preprocess")


def open_for_model(data: str | Path | Dataset, art: ModelLike, *, normalize: str = "auto",
                   augment: bool | None = False, seed: int = 0, strict: bool = False
                   ) -> tuple[Dataset, Preprocess]:
    """Open ``data`` (any ``--data`` layout, ``[reader:]PATH``, or a dataset already opened
    with :func:`~tedepr_cli.datasets.open_dataset`) for ``art``'s model: checks
    that its labels fit the model's outputs and resolves the preprocessing
    (``normalize="auto"``: the recorded statistics, else the data family's default; see
    :func:`tedepr_cli.datasets.resolve_preprocess`). Raises ``InputNotFound``/``BadInput``."""
    ds = data if isinstance(data, Dataset) else open_dataset(data)
    if art.input_kind == "tokens" or ds.input_names:
        check_tokens(ds, art)
    if ds.labeled:
        check_classes(ds, num_outputs(art.model, art.input_shape))
    pre = resolve_preprocess(ds, art.input_shape, art.input_kind, normalize=normalize, augment=augment,
                             seed=seed, recorded=recorded_preprocess(art), strict=strict)
    return ds, pre


def check_tokens(ds: Dataset, art: ModelLike) -> None:
    """Token data for a model whose first layer is an embedding (a token ``.npz``, or an
    ``.npz`` whose ``x`` holds integer ids ``[N, L]``), every id inside its vocabulary (an id
    past it would index out of the table): :class:`BadInput` otherwise."""
    emb = first_embedding(art.model)
    if emb is None or art.input_kind != "tokens":
        raise BadInput(f"{ds.path} holds token ids ({', '.join(ds.input_names)}), but the model's first "
                       "layer is not an embedding: it takes float inputs")
    vocab = int(emb.num_embeddings)
    for which, src in ds.splits.items():
        if not len(src):
            continue
        arrays = isinstance(src, ArraySource | ConcatSource)
        if not arrays or (not ds.input_names and (len(src.sample_shape) != 1
                                                  or not np.issubdtype(src.dtype, np.integer))):
            raise BadInput(f"{ds.path}: the model takes token ids (its first layer is an embedding); pass "
                           f"a token .npz ({', '.join(TOKEN_ARRAYS)}[, labels, split]) or an .npz whose x "
                           f"holds integer ids [samples, tokens] as {opt('data')}")
        x = np.asarray(src.take(np.arange(len(src))))
        ids = x if x.ndim == 2 else x[:, 0]
        top = int(ids.max())
        if top >= vocab:
            raise BadInput(f"{ds.path} ({which}): token id {top} is out of range for the model's embedding "
                           f"of {vocab} ids (0..{vocab - 1})")


def split_for(art: ModelLike, data: str | Path | Dataset, which: str = "test", *, normalize: str = "auto",
              strict: bool = False) -> Split:
    """The ``which`` split (``train``/``test``/``all``) of ``data`` presented for ``art``'s
    model with its evaluation preprocessing (no augmentation)."""
    ds, pre = open_for_model(data, art, normalize=normalize, strict=strict)
    return make_split(ds, which, art.input_shape, art.input_kind, pre, strict=strict)


def tensors_for(art: ModelLike, data: str | Path | Dataset, which: str = "test"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole ``which`` split as ``(x, y)`` tensors ready for ``art``'s model (in memory:
    stream large data through :func:`split_for` instead)."""
    return _all(split_for(art, data, which))


def load_split(path: str | Path, which: str, input_shape: tuple[int, ...], kind: str, num_classes: int,
               recorded: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tensors_for` without a model at hand: the ``which`` split of ``path`` for a
    model of ``input_shape``/``kind`` with ``num_classes`` outputs, normalized as
    ``recorded`` says (or the data family's default)."""
    ds = open_dataset(path)
    check_classes(ds, num_classes)
    pre = resolve_preprocess(ds, input_shape, kind, augment=False, recorded=recorded)
    return _all(make_split(ds, which, input_shape, kind, pre))


def _all(split: Split) -> tuple[torch.Tensor, torch.Tensor]:
    b = split.load(np.arange(len(split)))
    if b.skipped:
        log.warning(f"skipped {b.skipped} unreadable sample(s), e.g. {b.error}")
    return b.x, b.y
