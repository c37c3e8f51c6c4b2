"""Output conventions shared by every command (DESIGN §6).

Results go to stdout (a rich table, or JSON with ``--json``); logs, warnings and progress
go to stderr; progress bars only on a TTY. The library logs through the ``tedepr`` logger
and never prints; this module is the only place that decides how things look.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table

from .logs import log  # noqa: F401  (re-exported: the CLI configures it)

# Tables are results: when piped (CI logs, files) do not squeeze them into 80 columns.
stdout = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
stderr = Console(stderr=True, soft_wrap=True)


class _StderrHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = {"WARNING": "warning: ", "ERROR": "error: "}.get(record.levelname, "")
        print(f"tedepr: {prefix}{record.getMessage()}", file=sys.stderr, flush=True)


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    """INFO by default, DEBUG with -v, only errors with -q."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose >= 1 else logging.INFO)
    log.handlers[:] = [_StderrHandler()]
    log.setLevel(level)
    log.propagate = False


def is_tty() -> bool:
    return sys.stderr.isatty()


def print_json(obj: Any) -> None:
    """Machine output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


class _Table(Table):
    """A rich Table that grows past a narrow console instead of cutting its cells: below
    the width its cells need (:func:`table` sets each column's ``min_width``) it is laid
    out at that width, and the console (``soft_wrap``, no cropping) lets the terminal
    wrap the long lines."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        need = sum(c.min_width or 0 for c in self.columns) + self._extra_width \
            + sum(self._get_padding_width(i) for i in range(len(self.columns)))
        if self.width is not None or options.max_width >= need:
            yield from super().__rich_console__(console, options)
            return
        self.width = need
        try:
            yield from super().__rich_console__(console, options.update(width=need))
        finally:
            self.width = None


def table(title: str | None, columns: list[str], rows: list[list[Any]],
          right: set[int] | None = None) -> Table:
    """A rich table; numeric columns listed in ``right`` are right-aligned.

    Nothing is cut to fit a narrow terminal ("1.87e…"): a numeric column is at least as
    wide as its widest value and never wraps; text wraps between words (a word longer
    than :data:`MAX_WORD` folds onto the next line) and never ends in an ellipsis. A
    table that cannot fit that way is printed wider than the terminal.
    """
    t = _Table(title=title, title_justify="left", header_style="bold")
    right = right if right is not None else set(range(1, len(columns)))
    cells = [[fmt(v) for v in r] for r in rows]
    for i, c in enumerate(columns):
        words = [w for text in (c, *(r[i] for r in cells)) for w in text.split()]
        if i in right:  # numbers: never wrapped, never cut
            need = max([len(w) for w in c.split()] + [len(r[i]) for r in cells])
            t.add_column(c, justify="right", no_wrap=True, overflow="fold", min_width=need)
        else:
            t.add_column(c, justify="left", overflow="fold",
                         min_width=min(max((len(w) for w in words), default=1), MAX_WORD))
    for r in cells:
        t.add_row(*r)
    return t


#: the longest word a text column keeps on one line; longer ones fold
MAX_WORD = 24


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3e}"
        return f"{v:.4g}"
    return str(v)


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
