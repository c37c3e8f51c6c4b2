"""Where tensors run: ``cpu`` or ``cuda``, one check and one error for every command.

``--device cuda`` on a machine without a usable GPU is refused the same way by ``bench``,
``finetune`` and ``export`` (:class:`~tedepr_cli.errors.EngineUnavailable`, exit 10).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import EngineUnavailable, UsageError, opt

DEVICES = ("cpu", "cuda")


def resolve(name: str) -> torch.device:
    """``cpu``, or the current CUDA device for ``cuda``. Raises UsageError for another
    name, EngineUnavailable when CUDA is asked for and torch sees no GPU."""
    if name not in DEVICES:
        raise UsageError(f"{opt('device')} must be cpu or cuda, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "torch sees no GPU"
        raise EngineUnavailable(f"{opt('device')} cuda: no CUDA device on this machine ({why})")
    return torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions inside the block (the flags are restored
    after it): a reference or an error check then measures float32, not TF32's 10-bit
    mantissa (cuDNN convolutions use TF32 by default)."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
