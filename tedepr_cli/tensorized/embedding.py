"""``nn.Embedding`` as a TT-embedding (Khrulkov et al. 2019, "Tensorized Embedding Layers").

The table ``W`` (vocab × dim) is a TT-matrix over vocab modes ``v_1..v_d`` (the input
modes) and dim modes ``m_1..m_d`` (the output modes): cores ``G_k`` of shape
``(r_{k-1}, v_k, m_k, r_k)``, the layout of :class:`~.tt.TTLinear`, so the dense
``(dim, vocab)`` matrix is :func:`~.chain.tt_matrix_dense` of the cores. A vocab that
does not factor into balanced modes is padded up to ``∏ v_k`` rows; the padded rows are
never looked up (ids must be in ``[0, num_embeddings)``).

A lookup never builds the table: id ``i`` is split into its mixed-radix digits
``(i_1..i_d)`` (row-major, ``i = i_1 v_2⋯v_d + ⋯ + i_d``), the slices ``G_k[:, i_k]`` are
gathered and the chain ``G_1[:, i_1] G_2[:, i_2] ⋯ G_d[:, i_d]`` is contracted left to
right per token (batched matrix products), giving the ``dim`` features.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import TensorizedLayer
from .chain import tt_matrix_dense


def vocab_modes(vocab: int, d: int) -> list[int]:
    """``d`` near-balanced modes whose product is at least ``vocab``, with as little padding
    as that allows: every mode starts at ``ceil(vocab^(1/d))`` and each, from the first, is
    lowered while the product still covers ``vocab`` (30522, 3 -> ``[30, 32, 32]``,
    30720 rows)."""
    if vocab < 1 or d < 1:
        raise ValueError(f"cannot split a vocab of {vocab} into {d} modes")
    q = max(1, math.ceil(round(vocab ** (1.0 / d), 9)))
    while q ** d < vocab:
        q += 1
    modes = [q] * d
    for k in range(d):
        while modes[k] > 1 and math.prod(modes) // modes[k] * (modes[k] - 1) >= vocab:
            modes[k] -= 1
    return sorted(modes)


class TTEmbedding(TensorizedLayer):
    """``nn.Embedding(num_embeddings, embedding_dim, padding_idx)`` as a TT-matrix.

    Spec: ``in_modes`` (vocab modes, product ``>= num_embeddings``), ``out_modes`` (dim
    modes, product ``embedding_dim``), ``ranks`` (``[1, ..., 1]`` ends), ``num_embeddings``,
    ``padding_idx`` (None or a non-negative id). ``forward(ids)`` maps integer ids of any
    shape ``(...)`` to ``(..., embedding_dim)``; the row of ``padding_idx`` is zero (what
    ``nn.Embedding`` keeps there unless written to) and passes no gradient to the cores.
    Ids outside ``[0, num_embeddings)`` raise ``IndexError`` (checked in eager mode only).
    Parameters: ``Σ_k r_{k-1} v_k m_k r_k``.
    """

    kind = "embedding"
    format = "tt"

    def __init__(self, spec: dict[str, Any]) -> None:
        ins, outs, r = spec["in_modes"], spec["out_modes"], spec["ranks"]
        if len(ins) != len(outs):
            raise ValueError(f"TT-embedding needs as many vocab as dim modes: {ins} vs {outs}")
        if len(r) != len(ins) + 1 or r[0] != 1 or r[-1] != 1:
            raise ValueError(f"TT-embedding ranks must be [1, ..., 1] of length {len(ins) + 1}, got {r}")
        if spec.get("chain", "linear") != "linear" or spec.get("bias", False):
            raise ValueError("a TT-embedding has a linear chain and no bias")
        n = int(spec["num_embeddings"])
        if not 0 < n <= math.prod(ins):
            raise ValueError(f"num_embeddings {n} does not fit the vocab modes {ins}")
        pad = spec.get("padding_idx")
        if pad is not None and not 0 <= int(pad) < n:
            raise ValueError(f"padding_idx {pad} is not an id in [0, {n})")
        shapes = [(r[k], ins[k], outs[k], r[k + 1]) for k in range(len(ins))]
        super().__init__({**spec, "chain": "linear", "bias": False}, shapes, False)
        self.num_embeddings = n
        self.embedding_dim = math.prod(outs)
        self.padding_idx = None if pad is None else int(pad)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"{super().extra_repr()}")

    # -- lookup --------------------------------------------------------------------
    def digits(self, ids: Tensor) -> list[Tensor]:
        """The mixed-radix digits ``(i_1..i_d)`` of flat ids (row-major over the vocab modes)."""
        out: list[Tensor] = []
        rest = ids
        for v in reversed(self._spec["in_modes"]):
            out.append(torch.remainder(rest, v))
            rest = torch.div(rest, v, rounding_mode="floor")
        return out[::-1]

    def forward(self, ids: Tensor) -> Tensor:
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"a TT-embedding looks up integer ids, got {ids.dtype}")
        if not (torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
                or torch.compiler.is_compiling()) and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.num_embeddings:
                raise IndexError(f"index out of range in TT-embedding: ids {lo}..{hi}, vocab "
                                 f"{self.num_embeddings}")
        flat = ids.reshape(-1).to(torch.int64)
        cores = list(self.cores)
        state = None  # (N, P, r): features of the dim modes so far, rank channels last
        for core, digit in zip(cores, self.digits(flat), strict=True):
            r0, _, m, r1 = core.shape
            piece = core.index_select(1, digit).permute(1, 0, 2, 3).reshape(-1, r0, m * r1)
            state = piece if state is None else torch.bmm(state, piece)
            state = state.reshape(flat.shape[0], -1, r1)
        out = state.reshape(flat.shape[0], self.embedding_dim)
        if self.padding_idx is not None:
            out = out.masked_fill((flat == self.padding_idx)[:, None], 0.0)
        return out.reshape(*ids.shape, self.embedding_dim)

    def covering_ids(self) -> Tensor:
        """About ``max_k v_k`` distinct ids (int64, ascending) that between them look up every
        slice ``G_k[:, v]`` of every core that a valid id can reach: id ``j`` has digits
        ``(j mod v_1, ..., j mod v_d)``; where that id lies in the padded vocab, its leading
        digit dropped to 0 and, separately, the id clipped to ``num_embeddings - 1`` stand
        in for it. The probe of a data-free criterion, whose all-ones input would otherwise
        be one token id and score only the slices of one row."""
        ins, n = self._spec["in_modes"], self.num_embeddings
        strides = [math.prod(ins[k + 1:]) for k in range(len(ins))]
        j = torch.arange(max(ins), dtype=torch.int64)
        ids = sum((j % v) * s for v, s in zip(ins, strides, strict=True))
        bad = ids >= n
        dropped = ids[bad] - (j[bad] % ins[0]) * strides[0]
        clipped = torch.clamp(ids[bad], max=n - 1)
        return torch.unique(torch.cat([ids[~bad], dropped, clipped]))

    # -- weights -------------------------------------------------------------------
    def dense_weight(self) -> Tensor:
        """The TT-matrix as ``(embedding_dim, padded vocab)`` (the TTLinear layout; the
        padding row is not zeroed here)."""
        return tt_matrix_dense(list(self.cores))

    @property
    def weight(self) -> Tensor:
        """The table ``(num_embeddings, embedding_dim)`` that ``nn.Embedding.weight`` is:
        the padded rows dropped, the ``padding_idx`` row zero; computed on each read
        (differentiable), never stored."""
        w = self.dense_weight().T[: self.num_embeddings]
        if self.padding_idx is not None:
            keep = torch.ones(self.num_embeddings, 1, dtype=w.dtype, device=w.device)
            keep[self.padding_idx] = 0
            w = w * keep
        return w

    # -- accounting ----------------------------------------------------------------
    def dense_weight_shape_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    def core_uses(self, batch: int) -> list[float]:
        """Expected uses of each core entry for ``batch`` looked-up ids (uniform over the
        vocab): a lookup reads one slice ``G_k[:, i_k]`` (a ``1/v_k`` share of core ``k``)
        and multiplies it into a state of ``m_1⋯m_{k-1}`` features, so
        ``uses_k = batch · m_1⋯m_{k-1} / v_k`` (the first core's slice is copied: 0)."""
        ins, outs = self._spec["in_modes"], self._spec["out_modes"]
        return [0.0 if k == 0 else batch * math.prod(outs[:k]) / ins[k] for k in range(len(ins))]

    def chain_flops(self, batch: int, masks: list[Tensor] | None = None) -> int:
        return int(round(super().chain_flops(batch, masks)))

    def dense_flops(self, batch: int) -> int:
        """A dense lookup multiplies nothing; counted as one operation per copied feature
        (``batch · embedding_dim``) so the chain's work has a reference."""
        return batch * self.embedding_dim
