"""CLI conventions: version, help, JSON on stdout, one-line errors with exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tedepr_cli import __version__

from .conftest import LENET300, MNIST, ROOT, run_cli


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


def _one_error_line(r, label: str) -> str:
    """The single error line of a failed run: ``tedepr: <label>: ...``, nothing multi-line."""
    lines = r.stderr.splitlines()
    assert [ln for ln in lines if ln.startswith(f"tedepr: {label}: ")] == lines[-1:], r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert not any(ln.startswith(("Usage:", "Try '", "Error:")) for ln in lines), r.stderr  # Click's box
    return lines[-1]


def test_errors_are_one_line_with_exit_codes(tmp_path):
    r = run_cli("info", tmp_path / "missing.pt", "--arch", "lenet300")
    assert r.exit_code == 3 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_cli("info", LENET300)
    assert r.exit_code == 4 and "--arch" in r.stderr
    r = run_cli("info", LENET300, "--arch-kwargs", '{"a": 1}')
    assert r.exit_code == 2
    r = run_cli("info", LENET300, "--arch", "lenet300", "--arch-kwargs", '{"nope": 1}')
    assert r.exit_code == 4 and "nope" in r.stderr  # the kwargs reach the builder: the model rejects them


@pytest.mark.parametrize("argv,fragment", [
    # option values: the README's table says 2, whoever checks them
    (["info", LENET300, "--arch", "nosuchnet"], "lenet300"),  # the choices are listed
    (["info", LENET300, "--arch", "nosuch.module:fn"], "cannot import"),
    (["info", LENET300, "--arch", "lenet300", "--arch-kwargs", "{bad"], "JSON"),
    (["info", LENET300, "--arch", "lenet300", "--input-shape", "a,b"], "--input-shape"),
    (["eval", LENET300, "--arch", "lenet300", "--data", MNIST, "--split", "val"], "--split"),
    # Click's own errors: one line in tedepr's form, not Click's usage box
    (["info", "--bogus-flag"], "No such option: --bogus-flag"),
    (["eval"], "Missing argument 'PATH'"),
    (["prune", LENET300, "--steps", "abc"], "--steps"),
    (["prune", LENET300, "--sparsity"], "requires an argument"),
    (["nosuchcommand"], "No such command"),
])
def test_usage_errors_exit_2_on_one_line(argv, fragment):
    r = run_cli(*argv)
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    assert fragment in _one_error_line(r, "usage error") and r.stdout == ""


def test_help_and_bare_command_still_show_help():
    r = run_cli("prune", "--help")
    assert r.exit_code == 0 and "--sparsity" in r.stdout
    r = run_cli()
    assert r.exit_code == 2 and "Commands" in r.stderr  # Click's convention: help, exit 2


def test_multi_line_messages_become_one_line(monkeypatch):
    """An internal error (a bug) or a library error whose text spans lines is still one line."""
    import tedepr_cli.zoo as zoo
    from tedepr_cli.errors import BadInput

    def boom(*a, **k):
        raise RuntimeError("first line\n  second line\n\nthird")

    monkeypatch.setattr(zoo.MODELS, "get", boom)
    r = run_cli("zoo")
    assert r.exit_code == 1
    assert _one_error_line(r, "internal error").startswith(
        "tedepr: internal error: RuntimeError: first line second line third (run with -v")

    def bad(*a, **k):
        raise BadInput("a\nb")

    monkeypatch.setattr(zoo.MODELS, "get", bad)
    r = run_cli("zoo")
    assert r.exit_code == 4 and _one_error_line(r, "bad input") == "tedepr: bad input: a b"


def test_verbose_shows_traceback(tmp_path):
    r = run_cli("info", tmp_path / "missing.pt", "--arch", "lenet300", "-v")
    assert r.exit_code == 3 and "Traceback" in r.stderr


def test_every_option_and_argument_has_help_text():
    import typer.main

    from tedepr_cli.cli import app

    group = typer.main.get_command(app)
    missing = [f"{name}: {'/'.join(getattr(p, 'opts', None) or [p.name])}"
               for name, cmd in [("tedepr", group), *group.commands.items()] for p in cmd.params
               if not (getattr(p, "help", None) or "").strip()]
    assert missing == []


def test_prune_help_lists_every_scope():
    from tedepr_cli.pruning.prune import SCOPES

    text = " ".join(run_cli("prune", "--help").stdout.split())
    assert all(s in text for s in SCOPES), text


@pytest.mark.parametrize("width", [200, 80, 40])
def test_tables_never_cut_numbers_or_names(width):
    """A narrow terminal wraps text between words but never ends a value in an ellipsis."""
    import io

    from rich.console import Console

    from tedepr_cli.console import fmt, table

    rows = [["dense-torch", 49.4, 4.947, 1.87e-05, 2.024e4, "1.00x [1.00-1.00]", 266_200,
             "kept dense: the factorized form would not be smaller"],
            ["tedepr", 9.254, 2.403, 0.123, 1.081e5, "5.15x [5.10-6.33]", 1_331, "-"]]
    buf = io.StringIO()
    Console(file=buf, width=width, soft_wrap=True).print(
        table("t", ["engine", "median", "IQR", "rel.err", "samples/s", "speed-up vs dense", "kept", "note"],
              rows, right={1, 2, 3, 4, 5, 6}))
    text = buf.getvalue()
    assert "…" not in text
    for r in rows:
        for v in r[:-1]:
            assert fmt(v) in text, (fmt(v), text)


@pytest.fixture
def restore_threads():
    """The CLI sets the process's thread pools (the command owns it): put them back."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits(limits=None):  # restores the BLAS pools on exit
        yield
    torch.set_num_threads(before)


def _threads_seen():
    import torch
    from threadpoolctl import threadpool_info

    blas = {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}
    return torch.get_num_threads(), blas


@pytest.mark.parametrize("threads", [1, 2])
def test_every_computing_command_takes_threads(tmp_path, monkeypatch, restore_threads, threads):
    """decompose and export had no --threads (prune, eval and finetune did): each bounds
    PyTorch's pool and numpy's BLAS (the TT-SVDs) to it while the library works."""
    import tedepr_cli.decompose as dec
    import tedepr_cli.export as exp

    seen = {}

    def spy(module, name):
        real = getattr(module, name)

        def wrapped(*a, **kw):
            seen[name] = _threads_seen()
            return real(*a, **kw)

        monkeypatch.setattr(module, name, wrapped)

    spy(dec, "decompose")
    spy(exp, "export")
    def other_pools():  # what a previous command or the machine left: not the value asked for
        import torch
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(threads + 1)
        threadpool_limits(limits=threads + 1, user_api="blas")

    base = ["--arch", "lenet300", "--threads", str(threads)]
    other_pools()
    r = run_cli("decompose", LENET300, *base, "--rank", "4", "-o", tmp_path / "d")
    assert r.exit_code == 0, r.stderr
    other_pools()
    r = run_cli("export", LENET300, *base, "--to", "safetensors", "-o", tmp_path / "e")
    assert r.exit_code == 0, r.stderr
    assert seen == {"decompose": (threads, {threads}), "export": (threads, {threads})}
    for cmd in (["decompose", LENET300, "-o", tmp_path / "x"], ["export", LENET300, "-o", tmp_path / "x"],
                ["prune", LENET300, "--sparsity", "0.9", "-o", tmp_path / "x"],
                ["eval", LENET300, "--data", MNIST]):
        r = run_cli(*cmd, "--arch", "lenet300", "--threads", "0")
        assert r.exit_code == 2 and "--threads must be >= 1" in r.stderr, (cmd, r.stderr)
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("cmd", ["decompose", "bench"])
def test_data_is_opened_and_logged_once(tmp_path, cmd):
    """`decompose --data` logged "data ...: npz reader" twice (it opened the data for the
    model before and after), `bench --data --baseline` three times: once now."""
    if cmd == "decompose":
        args = ["decompose", LENET300, "--arch", "lenet300", "--rank", "4", "-o", tmp_path / "d"]
    else:
        art = tmp_path / "p"
        assert run_cli("prune", LENET300, "--arch", "lenet300", "--sparsity", "0.99", "--criterion",
                       "magnitude", "-o", art).exit_code == 0
        args = ["bench", art, "--baseline", LENET300, "--iters", "2", "--warmup", "1", "--batch", "1",
                "--engines", "dense-torch,chain-torch", "--no-memory"]
    r = run_cli(*args, "--data", MNIST, "--json")
    assert r.exit_code == 0, r.stderr
    assert [ln for ln in r.stderr.splitlines() if "npz reader" in ln] == [f"tedepr: data {MNIST}: npz reader "
                                                                         "(.npz file)"], r.stderr
    d = json.loads(r.stdout)
    acc = d["summary"]["accuracy_after"] if cmd == "decompose" else d["accuracy"]["baseline"]
    assert 0 < acc <= 1  # and the data was used
