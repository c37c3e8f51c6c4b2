"""Model loading: every input format, named key errors, and pickles that must not run."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tedepr_cli.arch import parse_arch
from tedepr_cli.artifact import load_artifact, save_artifact
from tedepr_cli.errors import BadInput, InputNotFound, UnsafeInput
from tedepr_cli.loading import load_model
from tedepr_cli.zoo import MODELS

from .conftest import LENET300, ZOO_CASES, run_cli, sample_inputs


def _model(name):
    torch.manual_seed(0)
    return MODELS.get(name)(**ZOO_CASES[name]).eval()


def _spec(name):
    import json

    return parse_arch(name, json.dumps(ZOO_CASES[name]))


def _export(model, path):
    x = torch.zeros(2, *model.input_shape)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(path))


@pytest.mark.parametrize("name", sorted(ZOO_CASES))
def test_every_zoo_model_loads_from_each_format_and_round_trips(name, tmp_path):
    model = _model(name)
    x, _ = sample_inputs(model, 16)
    with torch.no_grad():
        ref = model(x)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "m.safetensors"))
    _export(model, tmp_path / "m.pt2")
    for fname in ("m.pt", "m.safetensors", "m.pt2"):
        art = load_model(tmp_path / fname, _spec(name))
        with torch.no_grad():
            assert torch.equal(art.model(x), ref), fname
        out = save_artifact(art, tmp_path / f"art-{fname}")
        back = load_artifact(out)
        with torch.no_grad():
            assert torch.equal(back.model(x), ref), f"artifact from {fname}"
        assert back.arch == art.arch


def test_pt2_without_arch_runs_as_a_program(tmp_path):
    model = _model("lenet5")
    _export(model, tmp_path / "m.pt2")
    art = load_model(tmp_path / "m.pt2")
    x, _ = sample_inputs(model, 7)
    assert art.input_shape == (1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(art.model(x), model(x))
    with pytest.raises(BadInput, match="pass arch NAME"):
        save_artifact(art, tmp_path / "a")


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path):
    state = MODELS.get("lenet300")().state_dict()
    del state["fc2.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["fc3.weight"] = torch.zeros(5, 100)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(BadInput) as e:
        load_model(tmp_path / "bad.pt", parse_arch("lenet300"))
    msg = str(e.value)
    assert "missing keys: fc2.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "fc3.weight (file (5, 100), model (10, 100))" in msg


def test_nested_checkpoint_dict_is_accepted(tmp_path):
    model = _model("lenet300")
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "ck.pt")
    art = load_model(tmp_path / "ck.pt", parse_arch("lenet300"))
    assert torch.equal(art.model.fc1.weight, model.fc1.weight)


class Payload:
    """Unpickling this runs os.system: the classic malicious pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_does_not_run_without_trust(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"fc1.weight": torch.zeros(1), "evil": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeInput, match="trust_pickle"):
        load_model(tmp_path / "evil.pt", parse_arch("lenet300"))
    assert not marker.exists()
    r = run_cli("info", tmp_path / "evil.pt", "--arch", "lenet300")
    assert r.exit_code == UnsafeInput.exit_code
    assert "runs code" in r.stderr or "run code" in r.stderr
    assert not marker.exists()


def test_malicious_pickle_inside_pt2_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    _export(_model("lenet300"), tmp_path / "ok.pt2")
    evil = io.BytesIO()
    torch.save(Payload(marker), evil)
    with zipfile.ZipFile(tmp_path / "ok.pt2") as src, \
            zipfile.ZipFile(tmp_path / "evil.pt2", "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("sample_inputs/model.pt"):
                data = evil.getvalue()
            dst.writestr(item, data)
    with pytest.raises(UnsafeInput):
        load_model(tmp_path / "evil.pt2")
    assert not marker.exists()


def test_pickled_module_needs_trust_pickle(tmp_path):
    model = _model("lenet300")
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(UnsafeInput, match="pickled Python object"):
        load_model(tmp_path / "full.pt")
    art = load_model(tmp_path / "full.pt", trust_pickle=True)
    x = torch.rand(3, 784)
    with torch.no_grad():
        assert torch.equal(art.model(x), model(x))
    # with --arch, the trusted module's weights go into a buildable architecture
    art2 = load_model(tmp_path / "full.pt", parse_arch("lenet300"), trust_pickle=True)
    assert art2.arch.name == "lenet300"


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"PK\x03\x04broken"])
def test_corrupt_files_are_bad_input(tmp_path, content):
    for suffix in (".pt", ".safetensors", ".pt2"):
        p = tmp_path / f"x{suffix}"
        p.write_bytes(content)
        with pytest.raises(BadInput):
            load_model(p, parse_arch("lenet300"))


def test_truncated_checkpoint(tmp_path):
    data = LENET300.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadInput):
        load_model(tmp_path / "t.pt", parse_arch("lenet300"))


def test_missing_and_directory_inputs(tmp_path):
    with pytest.raises(InputNotFound):
        load_model(tmp_path / "nope.pt", parse_arch("lenet300"))
    with pytest.raises(InputNotFound):
        load_model(tmp_path, parse_arch("lenet300"))


def test_nan_weights_are_refused(tmp_path):
    state = MODELS.get("lenet300")().state_dict()
    state["fc2.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(BadInput, match="fc2.weight"):
        load_model(tmp_path / "nan.pt", parse_arch("lenet300"))


def test_import_path_arch(tmp_path, monkeypatch):
    pkg = tmp_path / "mynets.py"
    pkg.write_text(
        "import torch\n"
        "def tiny(width=4):\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.ReLU(),\n"
        "                            torch.nn.Linear(width, 3))\n"
        "    return m\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = parse_arch("mynets:tiny", '{"width": 5}', "6")
    from tedepr_cli.arch import build

    model = build(spec, allow_import=True)
    torch.save(model.state_dict(), tmp_path / "t.pt")
    art = load_model(tmp_path / "t.pt", spec)
    out = save_artifact(art, tmp_path / "art")
    # the manifest alone never imports user code ...
    with pytest.raises(UnsafeInput, match="import path"):
        load_artifact(out)
    # ... but naming it on the command line does
    back = load_model(out, spec)
    assert back.input_shape == (6,)
    assert Path(out / "manifest.json").exists()


def test_bad_files_get_one_stderr_line_not_torch_logging(tmp_path):
    """torch.export.load logs a traceback (on the stderr handler torch set up when it was
    imported, which an in-process runner does not capture) before it raises: run the real
    command and read the process's stderr."""
    import subprocess
    import sys

    from .conftest import ROOT

    with zipfile.ZipFile(tmp_path / "notes.pt2", "w") as z:  # a zip, but no torch.export archive
        z.writestr("notes.txt", "hello")
    with zipfile.ZipFile(tmp_path / "archive.pt2", "w") as z:  # archive-like, without its format
        z.writestr("archive/version", "1")
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage" * 40)
    for name, fragment in (("notes.pt2", "not in a subdirectory: notes.txt"),
                           ("archive.pt2", "archive_format"), ("garbage.pt", "truncated or damaged")):
        r = subprocess.run([sys.executable, "-m", "tedepr_cli", "info", str(tmp_path / name)],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert r.returncode == BadInput.exit_code, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tedepr: bad input: "), r.stderr
        assert fragment in lines[0] and "warnings above" not in lines[0]


def test_held_torch_logs_restores_every_torch_logger():
    import logging

    from tedepr_cli.safeload import held_torch_logs

    names = ["torch", *sorted(n for n, lg in logging.Logger.manager.loggerDict.items()
                              if n.startswith("torch.") and isinstance(lg, logging.Logger))]
    before = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate,
                  logging.getLogger(n).level) for n in names}
    with held_torch_logs() as held:
        logging.getLogger("torch.export").warning("inside")
        logging.getLogger("torch.some.new.child").error("new child")
    assert [r.getMessage() for r in held] == ["inside", "new child"]
    after = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate,
                 logging.getLogger(n).level) for n in names}
    assert after == before
