"""A tiny sentence encoder written the way Hugging Face encoders are called: token ids and
an attention mask in, one pooled embedding per sentence out (not class logits). Used by
tests/test_tokens.py through ``--arch tests.token_models:encoder``; nothing here knows tedepr.
"""

from __future__ import annotations

import torch
from torch import nn

input_shape = (12,)  # 12 token ids per sentence


class TinyEncoder(nn.Module):
    """nn.Embedding + nn.TransformerEncoder + masked mean pooling, ``forward(input_ids,
    attention_mask=None)`` like a Hugging Face model."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.pool(self.encoder(self.embed(input_ids)), attention_mask)

    def pool(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Mean over the tokens the mask keeps (all without one), then the projection."""
        if attention_mask is None:
            return self.proj(h.mean(dim=1))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.proj((h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0))


def encoder(**kw) -> nn.Module:
    return TinyEncoder(**kw)


class PaddedEncoder(TinyEncoder):
    """The encoder as most users write it: torch's defaults (nested tensors enabled) and the
    padding mask passed to the encoder, whose eval-mode fast path then packs the batch into
    a NestedTensor."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 1) -> None:
        super().__init__(vocab, dim, heads, layers)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        pad = None if attention_mask is None else attention_mask == 0
        return self.pool(self.encoder(self.embed(input_ids), src_key_padding_mask=pad), attention_mask)


def padded_encoder(**kw) -> nn.Module:
    return PaddedEncoder(**kw)


class TypedEncoder(TinyEncoder):
    """The encoder with BERT's segment embedding: ``forward(input_ids, attention_mask=None,
    token_type_ids=None)``, the mask used in attention (a key padding mask) and pooling."""

    def __init__(self, vocab: int = 64, dim: int = 32, heads: int = 4, layers: int = 1) -> None:
        super().__init__(vocab, dim, heads, layers)
        self.segment = nn.Embedding(2, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids)
        if token_type_ids is not None:
            h = h + self.segment(token_type_ids)
        pad = None if attention_mask is None else attention_mask == 0
        return self.pool(self.encoder(h, src_key_padding_mask=pad), attention_mask)


def typed_encoder(**kw) -> nn.Module:
    return TypedEncoder(**kw)


class IdsFirstEncoder(TinyEncoder):
    """A forward whose first parameter is not called ``input_ids``: ``forward(ids,
    attention_mask=None)`` (the ids go to it positionally)."""

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        pad = None if attention_mask is None else attention_mask == 0
        return self.pool(self.encoder(self.embed(ids), src_key_padding_mask=pad), attention_mask)


def ids_first_encoder(**kw) -> nn.Module:
    return IdsFirstEncoder(**kw)
