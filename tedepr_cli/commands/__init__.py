"""The CLI's commands, one module per stage; importing this package registers them on
:data:`~.common.app`, in pipeline order (the order `tedepr --help` lists them)."""
# isort: skip_file

from .common import app
from . import info, compress, train, export, bench, run, kernels  # noqa: F401

__all__ = ["app"]
