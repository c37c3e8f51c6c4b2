"""CLI conventions: version, help, JSON on stdout, one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

from tedepr_cli import __version__

from .conftest import LENET300, ROOT, run_cli


def test_version_and_help():
    r = run_cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"tedepr {__version__}"
    r = run_cli("--help")
    assert r.exit_code == 0 and "decompose" in r.stdout and "prune" in r.stdout


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "tedepr_cli", "--version"], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0 and __version__ in r.stdout


def test_info_json_on_stdout_only():
    r = run_cli("info", LENET300, "--arch", "lenet300", "--json")
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["params"] == 266_610 and [x["name"] for x in d["layers"]] == ["fc1", "fc2", "fc3"]
    assert d["bytes_on_disk"] == LENET300.stat().st_size


def test_info_on_artifact_shows_history(tmp_path):
    from tedepr_cli.arch import parse_arch
    from tedepr_cli.artifact import save_artifact
    from tedepr_cli.loading import load_model

    art = load_model(LENET300, parse_arch("lenet300"))
    art.record("test-stage", {"k": 1}, seed=7)
    save_artifact(art, tmp_path / "a")
    r = run_cli("info", tmp_path / "a")
    assert r.exit_code == 0 and "test-stage" in r.stdout and "266,610" in r.stdout


def test_errors_are_one_line_with_exit_codes(tmp_path):
    r = run_cli("info", tmp_path / "missing.pt", "--arch", "lenet300")
    assert r.exit_code == 3 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_cli("info", LENET300)
    assert r.exit_code == 4 and "--arch" in r.stderr
    r = run_cli("info", LENET300, "--arch", "nosuchnet")
    assert r.exit_code == 4 and "lenet300" in r.stderr
    r = run_cli("info", LENET300, "--arch", "lenet300", "--arch-kwargs", "{bad")
    assert r.exit_code == 4 and "JSON" in r.stderr
    r = run_cli("info", LENET300, "--arch", "lenet300", "--arch-kwargs", '{"nope": 1}')
    assert r.exit_code == 4 and "nope" in r.stderr
    r = run_cli("info", LENET300, "--arch-kwargs", '{"a": 1}')
    assert r.exit_code == 2
    r = run_cli("info", "--bogus-flag")
    assert r.exit_code == 2


def test_verbose_shows_traceback(tmp_path):
    r = run_cli("info", tmp_path / "missing.pt", "--arch", "lenet300", "-v")
    assert r.exit_code == 3 and "Traceback" in r.stderr
