"""The CLI's commands, one module per stage; importing this package registers them on
:data:`tedepr_cli.cli.app`, in pipeline order (the order `tedepr --help` lists them)."""
# isort: skip_file

from . import info, compress, train, export, bench, run, kernels  # noqa: F401
