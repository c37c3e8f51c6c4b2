"""The artifact format: manifest, history, overwrite rules and atomic saves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from tedepr_cli.arch import parse_arch
from tedepr_cli.artifact import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    is_artifact,
    load_artifact,
    save_artifact,
)
from tedepr_cli.errors import BadInput, OutputError
from tedepr_cli.loading import load_model

from .conftest import LENET300, ROOT


def _art():
    return load_model(LENET300, parse_arch("lenet300"))


def test_manifest_contents_and_history(tmp_path):
    art = _art()
    art.record("decompose", {"rank": 8, "path": tmp_path}, seed=3)
    out = save_artifact(art, tmp_path / "a")
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["schema"] == "tedepr-artifact" and m["schema_version"] == SCHEMA_VERSION
    assert m["arch"] == {"name": "lenet300", "kwargs": {}}
    assert m["input_shape"] == [784] and m["input_kind"] == "flat"
    h = m["history"][0]
    assert h["command"] == "decompose" and h["seed"] == 3 and h["options"]["rank"] == 8
    assert h["options"]["path"] == str(tmp_path) and "tool_version" in h
    assert "time" not in h  # no clock in an artifact unless SOURCE_DATE_EPOCH names one
    back = load_artifact(out)
    assert back.history == m["history"]


def test_single_file_artifact(tmp_path):
    out = save_artifact(_art(), tmp_path / "m.safetensors")
    assert out.is_file() and is_artifact(out)
    back = load_artifact(out)
    assert torch.equal(back.model.fc3.weight, _art().model.fc3.weight)


def test_refuses_to_overwrite_without_flag(tmp_path):
    target = tmp_path / "a"
    save_artifact(_art(), target)
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(OutputError, match="pass overwrite"):
        save_artifact(_art(), target)
    assert (target / "model.safetensors").read_bytes() == before
    art = _art()
    with torch.no_grad():
        art.model.fc3.bias.add_(1)
    save_artifact(art, target, overwrite=True)
    assert torch.equal(load_artifact(target).model.fc3.bias, art.model.fc3.bias)
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp or old copies left


def test_unwritable_output_is_output_error(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not (ro / "x").parent.stat().st_mode & 0o200 and __import__("os").geteuid() == 0:
            pytest.skip("root ignores directory permissions")
        with pytest.raises(OutputError):
            save_artifact(_art(), ro / "a")
    finally:
        ro.chmod(0o700)


def test_output_under_a_file_is_output_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        save_artifact(_art(), tmp_path / "f" / "a")


def _tamper(out, fn):
    m = json.loads((out / MANIFEST_FILE).read_text())
    fn(m)
    (out / MANIFEST_FILE).write_text(json.dumps(m))


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(schema_version=SCHEMA_VERSION + 1), "not supported"),
    (lambda m: m.update(schema_version="1"), "integer"),
    (lambda m: m.update(schema="other"), "not a tedepr artifact"),
    (lambda m: m.update(arch=5), "arch"),
    (lambda m: m.update(history={}), "history"),
])
def test_bad_manifests_are_refused(tmp_path, edit, match):
    from tedepr_cli.artifact import parse_manifest

    m = json.loads(save_artifact(_art(), tmp_path / "a").joinpath(MANIFEST_FILE).read_text())
    edit(m)
    with pytest.raises(BadInput, match=match):
        parse_manifest(json.dumps(m), "x")


def test_edited_side_manifest_is_detected(tmp_path):
    out = save_artifact(_art(), tmp_path / "a")
    _tamper(out, lambda m: m.update(input_shape=[10]))
    with pytest.raises(BadInput, match="differs"):
        load_artifact(out)


WRITER = textwrap.dedent("""
    import signal, sys, time
    # a job a non-interactive shell starts in the background inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt handler: restore the interactive default
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import tedepr_cli.artifact as A
    from tedepr_cli.arch import parse_arch
    from tedepr_cli.loading import load_model
    real = A.save_file
    def slow_save(*a, **k):
        real(*a, **k)
        print("writing", flush=True)  # the tensors are on disk, the rename has not happened
        time.sleep(600)  # far past the wait below: only the signal ends it in time
    A.save_file = slow_save
    art = load_model(sys.argv[1], parse_arch("lenet300"))
    A.save_artifact(art, sys.argv[2], overwrite=len(sys.argv) > 3)
""")


@pytest.mark.parametrize("sig,existing", [(signal.SIGKILL, False), (signal.SIGINT, False),
                                          (signal.SIGKILL, True)])
def test_killed_writer_leaves_no_partial_artifact(tmp_path, sig, existing):
    target = tmp_path / "out"
    if existing:
        save_artifact(_art(), target)
        before = (target / "model.safetensors").read_bytes()
    args = [sys.executable, "-c", WRITER, str(LENET300), str(target)] + (["x"] if existing else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, cwd=ROOT, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(sig)
    proc.wait(timeout=180)  # generous: interpreter shutdown with torch loaded took > 30 s under load
    if existing:  # the old version is intact
        assert (target / "model.safetensors").read_bytes() == before
        load_artifact(target)
    else:
        assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    if sig == signal.SIGINT:  # a clean interrupt removes its temporary
        assert leftovers == []
    else:  # kill -9 can only leave a hidden temporary, never the target
        assert all(n.startswith(".out.tmp-") for n in leftovers)
