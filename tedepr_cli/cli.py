"""The ``tedepr`` command line: thin Typer commands (:mod:`tedepr_cli.commands`) over the
library. Each command parses options, calls one library function and renders its result (a
rich table on stdout, or ``--json``); errors become one line on stderr and the exit code of
:mod:`tedepr_cli.errors` (``-v`` adds the traceback)."""

from __future__ import annotations

from .commands import app

__all__ = ["app", "main"]


def main() -> None:
    """Console-script entry point (errors and exit codes: :class:`~.commands.common.TedeprGroup`)."""
    app()
