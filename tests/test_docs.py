"""The README's exit-code table is the code's (errors.EXIT_CODES)."""

from __future__ import annotations

import re

from tedepr_cli.errors import EXIT_CODES

from .conftest import ROOT


def test_readme_exit_code_table_matches_code():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- exit-codes:start -->")[1].split("<!-- exit-codes:end -->")[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", block, flags=re.M))
    assert {int(k): v for k, v in rows.items()} == EXIT_CODES
