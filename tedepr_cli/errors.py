"""Error types and the exit codes they map to.

Every failure a user can cause is raised as a :class:`TedeprError` subclass; the CLI turns
it into one line on stderr and the class's exit code. The README's exit-code table is
generated from :data:`EXIT_CODES` and a test keeps the two in step, so this module is the
single source of truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_CLI_FLAGS: ContextVar[bool] = ContextVar("tedepr_cli_flags", default=False)


def opt(name: str) -> str:
    """How messages name an option: ``--name`` while the command line runs (inside
    :func:`cli_flags`), the library's parameter otherwise (``min-density`` -> ``min_density``,
    ``no-decompose`` -> ``decompose=False``). The library knows no flags: the CLI says how
    its options are spelled."""
    if _CLI_FLAGS.get():
        return f"--{name}"
    if name.startswith("no-"):
        return f"{name[3:].replace('-', '_')}=False"
    return name.replace("-", "_")


@contextmanager
def cli_flags() -> Iterator[None]:
    """Within the block, :func:`opt` spells options as command-line flags (the CLI's command
    wrapper runs every command in it); the previous setting is restored after."""
    token = _CLI_FLAGS.set(True)
    try:
        yield
    finally:
        _CLI_FLAGS.reset(token)


class TedeprError(Exception):
    """Base class of the errors a user can act on (never a bug in tedepr)."""

    exit_code = 1
    label = "error"


class UsageError(TedeprError):
    """Options that contradict each other or are out of range."""

    exit_code = 2
    label = "usage error"


class InputNotFound(TedeprError):
    """A path the user named does not exist or cannot be read."""

    exit_code = 3
    label = "input not found"


class BadInput(TedeprError):
    """A file exists but is not what it should be (format, keys, shapes, values)."""

    exit_code = 4
    label = "bad input"


class UnsafeInput(TedeprError):
    """Loading the input would run code from the file (pickles), or escape its directory."""

    exit_code = 5
    label = "unsafe input refused"


class OutputError(TedeprError):
    """The output exists (without --overwrite), or cannot be written."""

    exit_code = 6
    label = "output error"


class CollapseError(TedeprError):
    """Pruning would leave a layer with no path from input to output."""

    exit_code = 7
    label = "layer collapse"


class ValidationError(TedeprError):
    """An exported model disagrees with PyTorch beyond the tolerance."""

    exit_code = 8
    label = "validation failed"


class TrainingDiverged(TedeprError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""

    exit_code = 9
    label = "training diverged"


class EngineUnavailable(TedeprError):
    """A requested engine (compiled kernel, onnxruntime, CUDA, Triton) cannot run here."""

    exit_code = 10
    label = "engine unavailable"


class GateFailed(TedeprError):
    """Base of the benchmark CI gates; each gate has its own code."""

    exit_code = 11
    label = "gate failed"


class SlowerGateFailed(GateFailed):
    """`bench --fail-if-slower`: the compressed model is slower than allowed."""

    exit_code = 11
    label = "gate failed (slower)"


class SizeGateFailed(GateFailed):
    """`bench --max-size`: the artifact is larger than allowed."""

    exit_code = 12
    label = "gate failed (size)"


class SpeedupGateFailed(GateFailed):
    """`bench --min-speedup`: the speed-up is smaller than required."""

    exit_code = 13
    label = "gate failed (speed-up)"


# Codes that do not come from an exception class.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

#: code -> meaning, in the order the README lists them.
EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug in tedepr: please report it with the `-v` traceback)",
    UsageError.exit_code: "usage error: unknown, missing, malformed or contradictory options",
    InputNotFound.exit_code: "input not found or unreadable",
    BadInput.exit_code: "bad input: wrong format, keys, shapes, values or data",
    UnsafeInput.exit_code: "unsafe input refused (pickle without --trust-pickle, path escape)",
    OutputError.exit_code: "output exists (no --overwrite) or cannot be written",
    CollapseError.exit_code: "pruning would collapse a layer (no path left)",
    ValidationError.exit_code: "exported model failed validation against PyTorch",
    TrainingDiverged.exit_code: "training diverged (NaN/Inf loss); last good checkpoint kept",
    EngineUnavailable.exit_code: "requested engine unavailable on this machine",
    SlowerGateFailed.exit_code: "bench gate: slower than --fail-if-slower allows",
    SizeGateFailed.exit_code: "bench gate: larger than --max-size",
    SpeedupGateFailed.exit_code: "bench gate: speed-up below --min-speedup",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); outputs are complete or absent, never partial",
}
