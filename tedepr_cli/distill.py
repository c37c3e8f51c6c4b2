"""Knowledge distillation while fine-tuning: the dense model teaches its compressed student.

At 99-99.5 % sparsity the compressed models are capacity-bound (train ≈ test accuracy), and
the dense original's soft predictions carry more information per example than the labels
(Hinton et al. 2015). The loss is ``(1 − α)·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))``;
the ``T²`` keeps the soft term's gradient scale independent of the temperature.

A model that is not a classifier (a sentence encoder: its outputs are embeddings, not class
logits), or data without labels, is recovered by feature matching instead: the student's
outputs are pulled towards the teacher's on unlabeled inputs, by cosine (``1 − cos``, the
default without labels: sentence embeddings are compared by angle) or mean squared error
(as in the layer-wise distillation of tensor-compressed transformers, Yang et al. 2023,
here on the model's output only). ``--distill-loss`` picks one; ``kl`` (the soft-target
loss above) stays the default for labeled data.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .artifact import Artifact, is_artifact
from .errors import BadInput, opt
from .evaluate import num_outputs, sample_cosine
from .surgery import dry_forward

DISTILL_LOSSES = ("auto", "kl", "cosine", "mse")


def resolve_distill_loss(requested: str, labeled: bool) -> str:
    """The distillation loss to use: ``auto`` is ``kl`` with labels, ``cosine`` without."""
    if requested not in DISTILL_LOSSES:
        raise BadInput(f"{opt('distill-loss')} must be one of {', '.join(DISTILL_LOSSES)}, got {requested!r}")
    if requested == "auto":
        return "kl" if labeled else "cosine"
    return requested


def load_teacher(path: str | Path, student: Artifact, classes: bool = True, option: str = "teacher"
                 ) -> nn.Module:
    """The teacher network, frozen, in eval mode.

    A tedepr artifact or a ``.pt2`` program names its own architecture (any network with the
    student's input and classes may teach); a plain state_dict is read into the student's
    architecture (an import path too: building the student already trusted it), which is how
    the dense original of a compressed model is usually kept. ``classes``: the teacher must
    predict the student's classes (KL on logits); otherwise its outputs must have the
    student's shape (feature matching). Raises :class:`BadInput` for a teacher that does
    not fit (``option``: the command-line option named in the message).
    """
    from .loading import load_model

    p = Path(path)
    arch = None
    if is_artifact(p) and student.arch is not None and student.arch.is_import:
        arch = student.arch  # confirms the import path, if the teacher's artifact names the same one
    elif not is_artifact(p) and p.suffix.lower() != ".pt2":
        if student.arch is None:
            raise BadInput(f"{opt(option)} {p} holds only weights, and the student names no architecture "
                           "to read them into: pass the teacher as a tedepr artifact or a .pt2 program")
        # an import-path architecture was already trusted to build the student (``--arch``)
        arch = student.arch
    teacher = load_model(p, arch).model.eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    if not classes:
        try:
            got_shape = tuple(_first(dry_forward(teacher, student.input_shape)).shape[1:])
        except BadInput as e:
            raise BadInput(f"{opt(option)} {p} does not accept the student's inputs: {e}") from None
        want_shape = tuple(_first(dry_forward(student.model, student.input_shape)).shape[1:])
        if got_shape != want_shape:
            raise BadInput(f"{opt(option)} {p} outputs {got_shape} per sample, the student {want_shape}: "
                           "feature distillation needs outputs of the same shape")
        return teacher
    want = num_outputs(student.model, student.input_shape)
    try:
        got = num_outputs(teacher, student.input_shape)
    except Exception as e:  # a teacher that cannot take the student's inputs
        raise BadInput(f"{opt(option)} {p} does not accept the student's inputs "
                       f"{tuple(student.input_shape)}: {str(e).splitlines()[0]}") from None
    if got != want:
        raise BadInput(f"{opt(option)} {p} predicts {got} classes, the student {want}")
    return teacher


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                 ) -> torch.Tensor:
    """Per-example ``T²·KL(teacher ‖ student)`` at temperature ``T`` (shape ``[batch]``)."""
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits / t, dim=-1)
    return (t * t) * (log_t.exp() * (log_t - log_s)).sum(-1)


def _first(out):
    return out[0] if isinstance(out, tuple | list) else out


def feature_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-example feature-matching loss (shape ``[batch]``) between outputs of any shape
    ``[batch, ...]``: ``cosine`` = ``1 − cos`` of the flattened outputs, ``mse`` = mean squared
    difference. Raises ``ValueError`` for another ``kind``."""
    if kind == "cosine":
        return 1.0 - sample_cosine(student_out, teacher_out)
    if kind == "mse":
        return (student_out - teacher_out).pow(2).flatten(1).mean(1)
    raise ValueError(f"unknown feature loss {kind!r}")
