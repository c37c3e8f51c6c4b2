"""The README's exit-code table is the code's (errors.EXIT_CODES), and the CLI really exits
with each code, on one line of stderr in the table's words, Click's own usage errors included."""

from __future__ import annotations

import re

import pytest
import torch

from tedepr_cli.errors import EXIT_CODES, TedeprError

from .conftest import LENET300, MNIST, ROOT, run_cli


def test_readme_exit_code_table_matches_code():
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- exit-codes:start -->")[1].split("<!-- exit-codes:end -->")[0]
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", block, flags=re.M))
    assert {int(k): v for k, v in rows.items()} == EXIT_CODES


def _labels() -> dict[int, set[str]]:
    """code -> the labels its errors print (``tedepr: <label>: message``)."""
    out: dict[int, set[str]] = {1: {"internal error"}, 130: {"interrupted"}}
    todo = [TedeprError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls is not TedeprError:
            out.setdefault(cls.exit_code, set()).add(cls.label)
    return out


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("codes") / "pruned"
    r = run_cli("prune", LENET300, "--arch", "lenet300", "--sparsity", "0.995", "--data", MNIST, "-o", out)
    assert r.exit_code == 0, r.stderr
    return out


GATE = ["--batch", "1", "--iters", "2", "--warmup", "0", "--engines", "dense-torch,tedepr"]


def _provoke(code: int, pruned, tmp, monkeypatch):
    """Run the CLI so that it exits with ``code``; returns typer's Result."""
    if code == 0:
        return run_cli("zoo")
    if code == 1:  # a bug: any exception that is not a TedeprError
        import tedepr_cli.zoo as zoo

        monkeypatch.setattr(zoo.MODELS, "get", lambda *a: 1 / 0)
        return run_cli("zoo")
    if code == 2:  # Click's own error, not one of ours (test_cli covers both kinds)
        return run_cli("prune", LENET300, "--no-such-option")
    if code == 3:
        return run_cli("info", tmp / "missing.pt", "--arch", "lenet300")
    if code == 4:
        return run_cli("info", LENET300)  # a state_dict without --arch
    if code == 5:
        torch.save(torch.nn.Linear(2, 2), tmp / "module.pt")
        return run_cli("info", tmp / "module.pt")
    if code == 6:
        (tmp / "exists").mkdir()
        return run_cli("decompose", LENET300, "--arch", "lenet300", "-o", tmp / "exists")
    if code == 7:  # magnitude pruning of a freshly initialized net without the path guard
        from tedepr_cli.zoo import MODELS

        torch.manual_seed(0)
        torch.save(MODELS.get("lenet300")().state_dict(), tmp / "init.pt")
        return run_cli("prune", tmp / "init.pt", "--arch", "lenet300", "--sparsity", "0.99", "--no-decompose",
                       "--criterion", "magnitude", "--no-path-guard", "-o", tmp / "o")
    if code == 8:  # any float difference fails a zero tolerance
        return run_cli("export", pruned, "--to", "onnx", "--batch-sizes", "1", "--atol", "0", "--rtol", "0",
                       "-o", tmp / "o")
    if code == 9:
        return run_cli("finetune", pruned, "--data", MNIST, "-o", tmp / "o", "--lr", "1e30", "--optimizer",
                       "sgd", "--epochs", "2", "--limit-train", "256")
    if code == 10:
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        return run_cli("finetune", pruned, "--data", MNIST, "-o", tmp / "o", "--device", "cuda")
    if code == 11:
        return run_cli("bench", pruned, *GATE, "--fail-if-slower", "1e-6")
    if code == 12:
        return run_cli("bench", pruned, *GATE, "--max-size", "1")
    if code == 13:
        return run_cli("bench", pruned, *GATE, "--min-speedup", "1e6")
    if code == 130:  # Ctrl-C while the artifact is written
        import tedepr_cli.artifact as artifact

        def interrupted(*a, **k):
            raise KeyboardInterrupt

        monkeypatch.setattr(artifact, "save_file", interrupted)
        return run_cli("decompose", LENET300, "--arch", "lenet300", "-o", tmp / "o")
    raise AssertionError(f"no way to provoke exit code {code}: add one")


@pytest.mark.parametrize("code", sorted(EXIT_CODES))
def test_every_documented_exit_code_is_what_the_cli_does(code, pruned, tmp_path, monkeypatch):
    r = _provoke(code, pruned, tmp_path, monkeypatch)
    assert r.exit_code == code, (r.exit_code, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    if code == 0:
        return
    last = r.stderr.splitlines()[-1]
    assert any(last.startswith(f"tedepr: {label}") for label in _labels()[code]), r.stderr
    assert not any(ln.startswith(("Usage:", "Try '", "Error:")) for ln in r.stderr.splitlines()), r.stderr
    if code != 9:  # a diverged run keeps its last good epoch (by design); others write nothing
        assert not (tmp_path / "o").exists()


def test_every_error_class_has_a_documented_code():
    assert set(_labels()) <= set(EXIT_CODES)
