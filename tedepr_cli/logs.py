"""The ``tedepr`` logger the library reports through (notices, warnings).

The library never prints and never configures logging: the CLI attaches its stderr handler
(:func:`tedepr_cli.console.setup_logging`); a program importing tedepr sees these records
through the standard :mod:`logging` machinery like any other library's.
"""

import logging

log = logging.getLogger("tedepr")
