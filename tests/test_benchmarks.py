"""The experiment driver's --quick mode runs end to end (CI exercises it)."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def _quick(out):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "pai_compare.py"), "--quick", "--epochs", "1",
           "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_pai_compare_quick(tmp_path):
    r = _quick(tmp_path / "pai")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TEDEPR-TT" in r.stdout
    report = (tmp_path / "pai" / "report.md").read_text()
    for method in ("dense", "tt-tedepr", "tt-budget", "snip", "synflow"):
        assert f"| {method} |" in report
    assert len(list((tmp_path / "pai" / "runs").glob("*.json"))) == 5
    r = _quick(tmp_path / "pai")  # cached: a second run trains nothing
    assert r.returncode == 0 and "runs to do" not in r.stdout
