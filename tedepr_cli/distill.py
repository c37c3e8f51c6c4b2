"""Knowledge distillation while fine-tuning: the dense model teaches its compressed student.

At 99-99.5 % sparsity the compressed models are capacity-bound (train ≈ test accuracy), and
the dense original's soft predictions carry more information per example than the labels
(Hinton et al. 2015). The loss is ``(1 − α)·CE(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))``;
the ``T²`` keeps the soft term's gradient scale independent of the temperature.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .artifact import Artifact, is_artifact
from .errors import BadInput, opt
from .evaluate import num_outputs


def load_teacher(path: str | Path, student: Artifact) -> nn.Module:
    """The teacher network, frozen, in eval mode.

    A tedepr artifact or a ``.pt2`` program names its own architecture (any network with the
    student's input and classes may teach); a plain state_dict is read into the student's
    architecture, which is how the dense original of a compressed model is usually kept.
    """
    from .loading import load_model

    p = Path(path)
    arch = None
    if not is_artifact(p) and p.suffix.lower() != ".pt2":
        if student.arch is None or student.arch.is_import:
            raise BadInput(f"{opt('teacher')} {p} holds only weights, and the student's architecture is not "
                           "a zoo model: pass the teacher as a tedepr artifact or a .pt2 program")
        arch = student.arch
    teacher = load_model(p, arch).model.eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    want = num_outputs(student.model, student.input_shape)
    try:
        got = num_outputs(teacher, student.input_shape)
    except Exception as e:  # a teacher that cannot take the student's inputs
        raise BadInput(f"{opt('teacher')} {p} does not accept the student's inputs "
                       f"{tuple(student.input_shape)}: {str(e).splitlines()[0]}") from None
    if got != want:
        raise BadInput(f"{opt('teacher')} {p} predicts {got} classes, the student {want}")
    return teacher


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
                 ) -> torch.Tensor:
    """Per-example ``T²·KL(teacher ‖ student)`` at temperature ``T`` (shape ``[batch]``)."""
    t = temperature
    log_s = F.log_softmax(student_logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits / t, dim=-1)
    return (t * t) * (log_t.exp() * (log_t - log_s)).sum(-1)
