"""What every command shares: the Typer app, the root group's error handling, the common
options and the :func:`command` decorator (logging, one-line errors, exit codes).

Each command parses options, calls one library function and renders its result (a rich
table on stdout, or ``--json``). Errors become one line on stderr and the exit code of
:mod:`tedepr_cli.errors`; ``-v`` adds the traceback.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperGroup

from ..console import setup_logging
from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, TedeprError, UsageError, cli_flags
from ..fsutil import expand_user
from ..version import __version__

try:  # typer >= 0.22 carries its own copy of Click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer runs on Click itself
    from click import exceptions as click_exceptions  # type: ignore[no-redef]

HELP = """\
tedepr - dual-grained model compression (TEDEPR, IEEE TPAMI 2024).

Pipeline: decompose (weights -> low-rank tensor-train/ring cores, coarse grain) ->
prune (score every core entry at initialization, keep the most trainable, fine grain) ->
finetune (masked training) -> export (compact safetensors, ONNX) -> bench (latency and
size against the dense original). Every stage reads and writes a self-describing
artifact directory; `tedepr prune model.pt --arch lenet300 --sparsity 0.995` runs the
one-shot path.
"""


def one_line(message: object) -> str:
    """``message`` with every run of whitespace (newlines included) collapsed to one space:
    each error is a single line on stderr, whatever the exception's text looks like."""
    return " ".join(str(message).split())


def _error(label: str, message: object) -> None:
    print(f"tedepr: {label}: {one_line(message)}", file=sys.stderr, flush=True)


class TedeprGroup(TyperGroup):
    """The root command group, with Click's own errors in tedepr's form.

    Click reports a missing argument, an unknown option or a value of the wrong type as a
    multi-line usage block; here each becomes one line ``tedepr: usage error: ...`` with
    exit code 2 (:class:`tedepr_cli.errors.UsageError`), like the errors the commands raise.
    ``--help``, ``--version`` and the help printed when no command is given are unchanged.
    Both the console script and in-process runners (``typer.testing.CliRunner``) come
    through :meth:`main`.
    """

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else EXIT_OK  # an int: the code of a typer.Exit
        except click_exceptions.NoArgsIsHelpError as e:  # `tedepr` alone: the help, as before
            e.show()
            code = e.exit_code
        except click_exceptions.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            _error(UsageError.label, f"{e.format_message().rstrip('.')}{hint}")
            code = UsageError.exit_code
        except click_exceptions.ClickException as e:  # e.g. a file Click could not open
            _error("error", e.format_message())
            code = e.exit_code
        except (typer.Abort, KeyboardInterrupt):
            print("tedepr: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(cls=TedeprGroup, help=HELP, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode=None)

F = TypeVar("F", bound=Callable[..., Any])

# ---------------------------------------------------------------------------- options
Verbose = Annotated[int, typer.Option("--verbose", "-v", count=True,
                                      help="More detail on stderr; tracebacks on errors.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Arch = Annotated[str | None, typer.Option(
    "--arch", help="Architecture of a state_dict: a zoo name (see `tedepr zoo`) or "
    "pkg.module:callable (imported: only name modules you trust).")]
ArchKwargs = Annotated[str | None, typer.Option(
    "--arch-kwargs", help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")]
InputShape = Annotated[str | None, typer.Option(
    "--input-shape", help="Per-sample input shape for an --arch import path, e.g. 3,32,32.")]
TrustPickle = Annotated[bool, typer.Option(
    "--trust-pickle", help="Allow loading pickled modules/objects. Unpickling runs code "
    "from the file: only for files you made or trust.")]
ConfirmArch = Annotated[str | None, typer.Option(
    "--arch", help="Confirm the artifact's import-path architecture (pkg.module:callable, as its "
    "manifest names it): only then is that module imported. Not needed for zoo models.")]
NonStrict = Annotated[bool, typer.Option(
    "--non-strict", help="Load a checkpoint whose keys do not all fit --arch: unexpected keys "
    "(e.g. a buffer like embeddings.position_ids) are ignored, missing ones keep the "
    "architecture's initialization; both are listed. Mis-shaped keys are still refused.")]
ModelPath = Annotated[Path, typer.Argument(
    help="Checkpoint (.pt/.pth/.safetensors state_dict, .pt2 program) or tedepr artifact.",
    metavar="PATH", show_default=False)]


def _version_cb(value: bool) -> None:
    if value:
        print(f"tedepr {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version_cb, is_eager=True, help="Show the version and exit.")]
        = False) -> None:
    """tedepr - dual-grained model compression."""


def command(fn: F) -> F:
    """Register ``fn`` as a command with tedepr's logging and error conventions."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = kwargs.get("verbose", 0) or 0
        setup_logging(verbose, kwargs.get("quiet", False))
        kwargs = {k: expand_user(v) if isinstance(v, Path) else v for k, v in kwargs.items()}  # ~, ~user
        try:
            with cli_flags():  # library messages name options as this command line spells them
                return fn(*args, **kwargs)
        except TedeprError as e:
            if verbose:
                traceback.print_exc(file=sys.stderr)
            _error(e.label, e)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            print("tedepr: interrupted; nothing partial was written", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except typer.Exit:
            raise
        except Exception as e:  # a bug: say so, show the traceback with -v
            if verbose:
                traceback.print_exc(file=sys.stderr)
            _error("internal error", f"{type(e).__name__}: {e} (run with -v for the traceback "
                   "and report it)")
            raise typer.Exit(EXIT_INTERNAL) from None

    return app.command(name=fn.__name__.rstrip("_").replace("_", "-"))(wrapper)  # type: ignore[return-value]


def _arch(arch: str | None, arch_kwargs: str | None, input_shape: str | None):
    from ..arch import parse_arch

    if arch is None:
        if arch_kwargs or input_shape:
            raise UsageError("--arch-kwargs/--input-shape need --arch")
        return None
    return parse_arch(arch, arch_kwargs, input_shape)


def _allow_import(arch: str | None) -> str | None:
    """The import path a command that only reads artifacts (plan, bench, validate) may
    import: the one the user typed with ``--arch`` (checked for form; a zoo name needs no
    confirmation). Whether it is the one the manifest names is checked on load."""
    if arch is None:
        return None
    spec = _arch(arch, None, None)
    return spec.name if spec.is_import else None


def _load(path: Path, arch: str | None, arch_kwargs: str | None, input_shape: str | None,
          trust_pickle: bool, non_strict: bool = False):
    from ..loading import load_model

    return load_model(path, _arch(arch, arch_kwargs, input_shape), trust_pickle=trust_pickle,
                      strict=not non_strict)


# ---------------------------------------------------------------------------- commands

Output = Annotated[Path, typer.Option("--output", "-o", help="Artifact to write (a directory, "
                                      "or a file ending in .safetensors).", show_default=False)]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (same seed => same result).")]
DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Data: .npz (x, y[, split]), a token .npz (input_ids[, attention_mask, labels]; "
    "labels optional) or [reader:]PATH for CIFAR, MNIST IDX, image folders, sequence features "
    "(README: Datasets).")]


Threads = Annotated[int, typer.Option(
    "--threads", help="CPU threads PyTorch computes with (results are reproducible for a fixed "
    "thread count).")]


def use_threads(threads: int) -> None:
    """Check ``--threads`` (UsageError below 1) and set the command's CPU threads: PyTorch's
    intra-op pool and the BLAS/LAPACK pool numpy computes with (tensorly's TT/TR-SVDs run
    there, and OpenBLAS would otherwise start one thread per core). Commands own the
    process; library functions that change either restore it."""
    import torch
    from threadpoolctl import threadpool_limits

    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")


def given_options(ctx: typer.Context) -> set[str]:
    """The parameters of the running command the user set (on the command line or from
    the environment), by their Python names: what a command must not confuse with a
    default it would otherwise fill in (``finetune --resume`` checks them against the run)."""
    sources = {name: ctx.get_parameter_source(name) for name in ctx.params}
    return {name for name, src in sources.items() if src is not None and src.name in ("COMMANDLINE",
                                                                                      "ENVIRONMENT")}


# what every report's weight counts mean (pruning.targets.kept_counts: one definition)
KEPT_NOTE = ("kept: stored entries of the prunable tensors (the cores of tensorized layers, dense "
             "weights) that the masks keep, as the budget counts them; effective non-zero: the non-zero "
             "entries of the dense weights those layers compute with (a chain's few stored entries "
             "multiply out to many more); other params: biases, norms, embeddings and other weights "
             "not pruned, stored whole")


def torch_seed(seed: int) -> None:
    """Seed every generator tedepr draws from."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
