"""Garbage NumPy / PyTorch files wherever tedepr reads one: one line naming the file and
what is wrong (exit 4), never the libraries' advice to load unsafely (``allow_pickle=True``,
``weights_only=False``); and every such read goes through :mod:`tedepr_cli.safeload`."""

from __future__ import annotations

import ast
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tedepr_cli.errors import BadInput

from .conftest import LENET300, MNIST, ROOT, run_cli

UNSAFE_ADVICE = ("allow_pickle", "weights_only", "pickle.load", "unsafe", "trusted source")


def _garbage(kind: str, good: bytes, tmp: Path, name: str) -> Path:
    """A bad file of ``kind`` named ``name``: random bytes, a text file renamed, a
    truncated copy of a good file, or an empty file."""
    data = {"random": random.Random(7).randbytes(3000),
            "text": b"x,y\n1,2\nthis is a CSV file, renamed\n",
            "truncated": good[: len(good) // 3],
            "empty": b""}[kind]
    p = tmp / name
    p.write_bytes(data)
    return p


KINDS = ("random", "text", "truncated", "empty")


def _one_clean_line(r, path: Path) -> str:
    assert r.exit_code == BadInput.exit_code, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tedepr: bad input: "), r.stderr
    assert str(path) in lines[0], lines[0]
    assert not any(a in lines[0] for a in UNSAFE_ADVICE), lines[0]
    return lines[0]


def _clean(e: BaseException, path: Path) -> None:
    text = str(e)
    assert str(path) in text and "\n" not in text, text
    assert not any(a in text for a in UNSAFE_ADVICE), text


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_checkpoint(tmp_path, kind):
    p = _garbage(kind, LENET300.read_bytes(), tmp_path, "model.pt")
    line = _one_clean_line(run_cli("info", p, "--arch", "lenet300"), p)
    assert ("truncated or damaged" if kind == "truncated" else "not a PyTorch file") in line


def test_plain_pickle_checkpoint_is_bad_input_without_unsafe_advice(tmp_path):
    p = tmp_path / "dict.pt"
    p.write_bytes(pickle.dumps({"a": [1, 2]}))  # a pickle, but no torch.save file
    _one_clean_line(run_cli("info", p, "--arch", "lenet300"), p)


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_data_npz(tmp_path, kind):
    p = _garbage(kind, MNIST.read_bytes(), tmp_path, "data.npz")
    out = tmp_path / "out"
    # default verbosity (no -q): still one line, no progress line before the error
    line = _one_clean_line(run_cli("prune", LENET300, "--arch", "lenet300", "--sparsity", "0.99",
                                   "--no-decompose", "--data", p, "-o", out), p)
    assert ("truncated or damaged" if kind == "truncated" else "not a NumPy .npz archive") in line
    assert not out.exists()


def test_object_arrays_in_npz_are_refused_not_unpickled(tmp_path):
    p = tmp_path / "obj.npz"
    np.savez(p, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    line = _one_clean_line(run_cli("prune", LENET300, "--arch", "lenet300", "--sparsity", "0.99",
                                   "--no-decompose", "--data", p, "-o", tmp_path / "out", "-q"), p)
    assert "object (pickled) arrays" in line


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_npy_data_directory(tmp_path, kind):
    d = tmp_path / "npydir"
    d.mkdir()
    np.save(d / "y.npy", np.zeros(8, dtype=np.int64))
    good = (tmp_path / "good.npy")
    np.save(good, np.zeros((8, 784), dtype=np.float32))
    p = _garbage(kind, good.read_bytes(), d, "x.npy")
    _one_clean_line(run_cli("prune", LENET300, "--arch", "lenet300", "--sparsity", "0.99", "--no-decompose",
                            "--data", d, "-o", tmp_path / "out", "-q"), p)


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_clip(tmp_path, kind):
    from tedepr_cli.datasets.readers import load_clip

    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((5, 3), dtype=np.float32))
    for suffix in (".npz", ".npy"):
        p = _garbage(kind, good.read_bytes(), tmp_path, f"clip{suffix}")
        with pytest.raises(BadInput) as e:
            load_clip(p)
        _clean(e.value, p)


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_export_samples(tmp_path, kind):
    from tedepr_cli.export import validate_dir

    good = tmp_path / "good.npy"
    np.save(good, np.zeros((2, 784), dtype=np.float32))
    d = tmp_path / "export"
    d.mkdir()
    np.save(d / "sample_outputs.npy", np.zeros((2, 10), dtype=np.float32))
    p = _garbage(kind, good.read_bytes(), d, "sample_inputs.npy")
    with pytest.raises(BadInput) as e:
        validate_dir(d)
    _clean(e.value, p)


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_resume_state(tmp_path, kind):
    from tedepr_cli.train import STATE_FILE, _load_state

    good = tmp_path / "good.pt"
    torch.save({"epoch": 1, "model": {"w": torch.zeros(3)}}, good)
    p = _garbage(kind, good.read_bytes(), tmp_path, STATE_FILE)
    with pytest.raises(BadInput) as e:
        _load_state(tmp_path)
    _clean(e.value, p)


# the one call that unpickles objects, behind --trust-pickle (and torch.export.load, whose
# pickled members loading._check_pt2 first checks through safeload)
ALLOWED = {("loading.py", "torch.load"), ("loading.py", "torch.export.load")}
LOADERS = {"np.load", "numpy.load", "torch.load", "torch.export.load", "st_load", "load_file",
           "safetensors.torch.load", "safetensors.torch.load_file", "pickle.load", "pickle.loads"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_every_file_loader_goes_through_safeload():
    """np.load / torch.load / safetensors' loaders are called in safeload.py only (and the
    explicit --trust-pickle load in loading.py): one place decides how a file is read and
    what a bad one is told."""
    found = []
    for f in sorted((ROOT / "tedepr_cli").rglob("*.py")):
        if f.name == "safeload.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and _dotted(node.func) in LOADERS
                    and (f.name, _dotted(node.func)) not in ALLOWED):
                found.append(f"{f.relative_to(ROOT)}:{node.lineno} {_dotted(node.func)}")
    assert not found, found
