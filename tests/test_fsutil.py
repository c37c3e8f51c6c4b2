"""What tedepr writes gets the modes a plain ``open``/``mkdir`` would give under the user's
umask (never mkstemp's or safetensors' 0600), and every path it takes expands ``~``."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest
import torch

from tedepr_cli.fsutil import atomic_output, current_umask, expand_user, output_mode

from .conftest import LENET300, MNIST, run_cli


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    items = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.lstat().st_mode) for p in items}


def _assert_usual_modes(root: Path, umask: int) -> None:
    for name, mode in _modes(root).items():
        want = (0o777 if (root.parent / name).is_dir() else 0o666) & ~umask
        assert mode == want, f"{name}: {oct(mode)}, expected {oct(want)} under umask {oct(umask)}"


def test_current_umask_reads_without_changing(umask):
    assert current_umask() == umask
    assert output_mode() == 0o666 & ~umask and output_mode(directory=True) == 0o777 & ~umask
    assert os.umask(umask) == umask  # unchanged by the reads above


def test_every_file_each_command_writes_has_the_umask_mode(tmp_path, umask):
    outs = {
        "decompose": ["decompose", LENET300, "--arch", "lenet300", "--rank", "4", "-o", tmp_path / "d"],
        "decompose-file": ["decompose", LENET300, "--arch", "lenet300", "--rank", "4",
                           "-o", tmp_path / "d.safetensors"],
        "prune": ["prune", LENET300, "--arch", "lenet300", "--sparsity", "0.99", "--criterion", "magnitude",
                  "-o", tmp_path / "p"],
        "finetune": ["finetune", tmp_path / "p", "--data", MNIST, "--epochs", "1", "--limit-train", "256",
                     "-o", tmp_path / "f"],
        "export": ["export", tmp_path / "p", "--to", "safetensors,onnx,onnx-sparse", "-o", tmp_path / "e"],
    }
    for name, argv in outs.items():
        r = run_cli(*argv, "-q")
        assert r.exit_code == 0, f"{name}: {r.stderr}"
    seen = set()
    for path in (Path(argv[-1]) for argv in outs.values()):
        _assert_usual_modes(path, umask)
        seen |= {p.name for p in (path.rglob("*") if path.is_dir() else [path])}
    # the files that used to come out 0600 are among those checked
    assert {"model.safetensors", "d.safetensors", "model.onnx", "model.sparse.onnx", "state.pt",
            "metrics.jsonl", "manifest.json", "export.json", "sample_inputs.npy"} <= seen


def test_recipe_outputs_have_the_umask_mode(tmp_path, umask, monkeypatch):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[model]\npath = "{LENET300}"\narch = "lenet300"\n\n'
                      '[prune]\nsparsity = 0.99\ncriterion = "magnitude"\n')
    r = run_cli("run", recipe, "-o", tmp_path / "run", "-q")
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "run" / "recipe.json").is_file() and (tmp_path / "run" / "pruned").is_dir()
    _assert_usual_modes(tmp_path / "run", umask)


def test_atomic_output_gives_writer_made_0600_files_the_usual_mode(tmp_path, umask):
    with atomic_output(tmp_path / "one.bin") as tmp:
        fd, made = tempfile.mkstemp(dir=tmp_path)  # 0600, as mkstemp and safetensors make them
        os.close(fd)
        os.replace(made, tmp)
    with atomic_output(tmp_path / "tree", directory=True) as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        fd, made = tempfile.mkstemp(dir=tmp / "sub")
        os.close(fd)
        os.replace(made, tmp / "sub" / "x")
        (tmp / "tool").write_text("#!/bin/sh\n")
        (tmp / "tool").chmod(0o700)  # an executable stays executable, by the umask
    assert stat.S_IMODE((tmp_path / "one.bin").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "tree").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "tree" / "sub").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "tree" / "sub" / "x").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "tree" / "tool").stat().st_mode) == 0o777 & ~umask


# ---------------------------------------------------------------------------- ~
def test_expand_user_expands_only_a_leading_tilde(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert expand_user("~") == tmp_path
    assert expand_user("~/x.npz") == tmp_path / "x.npz"
    assert expand_user(Path("~/a/b")) == tmp_path / "a" / "b"
    assert str(expand_user("npz:~/x.npz")) == f"npz:{tmp_path}/x.npz"
    assert str(expand_user("cifar10:~/c10")) == f"cifar10:{tmp_path}/c10"
    for same in ("x.npz", "/abs/x", "a~b", "dir/~x", "$HOME/x", "npz:$HOME/x", "npz:/a/~", "~nosuchuser9/x"):
        assert str(expand_user(same)) == same


def test_tilde_works_in_data_specs_and_model_paths(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "x.npz").write_bytes(MNIST.read_bytes())
    (home / "m.pt").write_bytes(LENET300.read_bytes())
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    for spec in ("npz:~/x.npz", "~/x.npz"):
        r = run_cli("info", "--data", spec)
        assert r.exit_code == 0, f"{spec}: {r.stderr}"
        assert str(home / "x.npz") in r.stdout
    r = run_cli("prune", "~/m.pt", "--arch", "lenet300", "--sparsity", "0.99", "--criterion", "snip",
                "--data", "npz:~/x.npz", "-o", "~/pruned", "-q")
    assert r.exit_code == 0, r.stderr
    assert (home / "pruned" / "model.safetensors").is_file()
    assert not (tmp_path / "~").exists()  # no directory literally named ~
    r = run_cli("eval", "~/pruned", "--data", "npz:~/x.npz", "-q")
    assert r.exit_code == 0, r.stderr
    r = run_cli("info", "--data", "npz:~/missing.npz")
    assert r.exit_code == 3 and str(home / "missing.npz") in r.stderr


# ---------------------------------------------------------------------------- --overwrite
def _user_dir(tmp_path: Path) -> Path:
    d = tmp_path / "mine"
    (d / "notes").mkdir(parents=True)
    (d / "thesis.tex").write_text("years of work")
    (d / "notes" / "a.txt").write_text("more")
    return d


@pytest.mark.parametrize("argv", [
    ["decompose", LENET300, "--arch", "lenet300"],
    ["prune", LENET300, "--arch", "lenet300", "--sparsity", "0.99", "--no-decompose"],
    ["export", LENET300, "--arch", "lenet300", "--to", "onnx"],
], ids=["decompose", "prune", "export"])
def test_overwrite_never_replaces_a_directory_tedepr_did_not_write(tmp_path, argv):
    """`-o ~/thesis --overwrite` replaced the whole directory with an artifact (the newcomer
    trial): exit 6 before any work, the directory untouched."""
    d = _user_dir(tmp_path)
    r = run_cli(*argv, "-o", d, "--overwrite", "-q")
    assert r.exit_code == 6, r.stderr
    assert "tedepr did not write" in r.stderr and str(d) in r.stderr
    assert (d / "thesis.tex").read_text() == "years of work" and (d / "notes" / "a.txt").exists()
    assert sorted(p.name for p in d.iterdir()) == ["notes", "thesis.tex"]


def test_bench_json_out_never_replaces_a_directory(tmp_path):
    d = _user_dir(tmp_path)
    art = tmp_path / "art"
    assert run_cli("decompose", LENET300, "--arch", "lenet300", "-o", art, "-q").exit_code == 0
    r = run_cli("bench", art, "--json-out", d, "--iters", "2", "--warmup", "0", "--no-memory", "-q")
    assert r.exit_code == 6 and "is a directory" in r.stderr, r.stderr
    assert (d / "thesis.tex").exists()
    r = run_cli("bench", art, "--json-out", art, "--iters", "2", "--warmup", "0", "--no-memory", "-q")
    assert r.exit_code == 6 and (art / "manifest.json").exists(), r.stderr  # not even a tedepr one


def test_overwrite_still_replaces_what_tedepr_wrote(tmp_path):
    from tedepr_cli.errors import OutputError
    from tedepr_cli.fsutil import check_output

    art = tmp_path / "art"
    assert run_cli("decompose", LENET300, "--arch", "lenet300", "-o", art, "-q").exit_code == 0
    assert run_cli("decompose", LENET300, "--arch", "lenet300", "-o", art, "--overwrite", "-q").exit_code == 0
    (tmp_path / "empty").mkdir()
    run_dir = tmp_path / "run"  # a finetune run, a `tedepr run` stopped before recipe.json
    (run_dir / "best").mkdir(parents=True)
    (run_dir / "state.pt").write_bytes(b"")
    (run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    stopped = tmp_path / "stopped"
    (stopped / "decomposed").mkdir(parents=True)
    (stopped / "decomposed" / "manifest.json").write_text((art / "manifest.json").read_text())
    single = tmp_path / "single"  # only the artifact's model.safetensors (manifest in its metadata)
    single.mkdir()
    (single / "model.safetensors").write_bytes((art / "model.safetensors").read_bytes())
    for ok in (art, tmp_path / "empty", run_dir, stopped, single):
        check_output(ok, overwrite=True)
    (stopped / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="did not write"):
        check_output(stopped, overwrite=True)


@pytest.mark.parametrize("name, content", [
    ("manifest.json", b'{"name": "My App", "start_url": "/"}'),  # a web app manifest
    ("manifest.json", b"not json"),
    ("model.safetensors", b"\x00" * 16),
    ("state.pt", b"PK\x03\x04 a user's own checkpoint"),  # no metrics.jsonl beside it
    ("metrics.jsonl", b'{"step": 1, "loss": 0.5}\n'),  # a hand-written training loop's log
])
def test_a_file_with_a_tedepr_name_but_not_its_content_is_a_users(tmp_path, name, content):
    """`--overwrite` went by file names: a directory holding any `manifest.json` (a web
    app, a browser extension) was replaced whole. The common names now need tedepr's
    content."""
    from safetensors.torch import save_file

    from tedepr_cli.errors import OutputError
    from tedepr_cli.fsutil import check_output

    d = _user_dir(tmp_path)
    (d / name).write_bytes(content)
    with pytest.raises(OutputError, match="did not write"):
        check_output(d, overwrite=True)
    other = tmp_path / "other"  # a real safetensors file, but not tedepr's
    other.mkdir()
    save_file({"w": torch.zeros(2)}, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(OutputError, match="did not write"):
        check_output(other, overwrite=True)
    r = run_cli("decompose", LENET300, "--arch", "lenet300", "-o", d, "--overwrite", "-q")
    assert r.exit_code == 6 and (d / "thesis.tex").exists() and (d / name).read_bytes() == content


def test_a_users_checkpoint_beside_a_users_log_is_still_a_users(tmp_path):
    """state.pt + metrics.jsonl is a common hand-written layout: the log's content decides."""
    from tedepr_cli.errors import OutputError
    from tedepr_cli.fsutil import check_output

    d = _user_dir(tmp_path)
    (d / "state.pt").write_bytes(b"PK\x03\x04 mine")
    (d / "metrics.jsonl").write_text("hello\n")
    with pytest.raises(OutputError, match="did not write"):
        check_output(d, overwrite=True)
    (d / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 0.3}\n')  # what finetune writes
    check_output(d, overwrite=True)


def test_bench_json_out_replaces_only_a_bench_report_and_only_with_overwrite(tmp_path):
    """`bench --json-out FILE` replaced any file (a user's notes) without asking."""
    art = tmp_path / "art"
    assert run_cli("decompose", LENET300, "--arch", "lenet300", "-o", art, "-q").exit_code == 0
    fast = ["--iters", "2", "--warmup", "0", "--no-memory", "-q", "--engines", "dense-torch", "--batch", "1"]
    notes = tmp_path / "notes.txt"
    notes.write_text("my precious notes")
    for extra in ([], ["--overwrite"]):
        r = run_cli("bench", art, "--json-out", notes, *fast, *extra)
        assert r.exit_code == 6 and notes.read_text() == "my precious notes", r.stderr
    assert "not a tedepr bench report" in r.stderr
    report = tmp_path / "b.json"
    assert run_cli("bench", art, "--json-out", report, *fast).exit_code == 0
    r = run_cli("bench", art, "--json-out", report, *fast)
    assert r.exit_code == 6 and "pass --overwrite" in r.stderr
    assert run_cli("bench", art, "--json-out", report, *fast, "--overwrite").exit_code == 0


def test_a_file_where_a_directory_goes_is_not_told_to_use_overwrite(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    r = run_cli("decompose", LENET300, "--arch", "lenet300", "-o", f, "-q")
    assert r.exit_code == 6 and "is a file; the output is a directory" in r.stderr
    assert "--overwrite" not in r.stderr and f.read_text() == "x"


def test_fsutil_markers_are_the_artifacts():
    from tedepr_cli import artifact, fsutil

    assert fsutil.ARTIFACT_SCHEMA == artifact.SCHEMA and fsutil.MANIFEST_KEY == artifact.META_MANIFEST


def test_tedepr_files_are_the_names_the_writers_use():
    from tedepr_cli.artifact import MODEL_FILE
    from tedepr_cli.fsutil import TEDEPR_FILES
    from tedepr_cli.train import METRICS_FILE, STATE_FILE

    assert {MODEL_FILE, STATE_FILE, METRICS_FILE, "manifest.json", "export.json"} <= set(TEDEPR_FILES)


def test_an_output_location_that_refuses_writes_is_found_before_work(tmp_path, monkeypatch):
    """Permission bits can say yes where the filesystem says no (a read-only mount, ACLs,
    root on NFS): the check tries to create a file there."""
    import errno

    from tedepr_cli.errors import OutputError
    from tedepr_cli.fsutil import check_output

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match="Read-only file system"):
        check_output(tmp_path / "out", overwrite=False)


@pytest.mark.parametrize("argv", [
    ["decompose", LENET300, "--arch", "lenet300"],
    ["export", LENET300, "--arch", "lenet300", "--to", "onnx"],
], ids=["decompose", "export"])
def test_overwrite_never_replaces_a_file_with_a_directory(tmp_path, argv):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    r = run_cli(*argv, "-o", f, "--overwrite", "-q")
    assert r.exit_code == 6 and "is a file; the output is a directory" in r.stderr, r.stderr
    assert f.read_text() == "mine"
    single = tmp_path / "a.safetensors"  # an artifact written as one file replaces one
    for _ in range(2):
        r = run_cli("decompose", LENET300, "--arch", "lenet300", "-o", single, "--overwrite", "-q")
        assert r.exit_code == 0 and single.is_file(), r.stderr


def test_hidden_entries_are_a_users_unless_tedepr_left_them(tmp_path):
    from tedepr_cli.errors import OutputError
    from tedepr_cli.fsutil import check_output

    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)  # only hidden entries: still someone's directory
    with pytest.raises(OutputError, match="did not write"):
        check_output(repo, overwrite=True)
    killed = tmp_path / "killed"  # what a kill -9 can leave inside a run directory
    killed.mkdir()
    (killed / ".state.pt.tmp-4242-0badcafe").write_bytes(b"")
    (killed / ".best.old-0badcafe").mkdir()
    check_output(killed, overwrite=True)
