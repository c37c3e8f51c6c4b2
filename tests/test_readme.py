"""The README's shell examples run as written, in order, on a fresh copy of the repository.

Every ```bash block is read from README.md at test time (so a changed example is tested as
it now reads) and each `tedepr` command in it runs in a temporary copy of the repository
(its tracked and untracked-but-not-ignored files). Each must exit 0, and afterwards the copy
holds nothing new outside `runs/` and no file of the repository has changed.

Two documented exceptions, listed here and in the README's "Development" section:

* SKIP: commands the walk does not run (installing, the test suite itself, torchrun);
* SMALLER: smaller settings for the long examples, so the walk takes about a minute.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

#: command prefix -> why the walk does not run it
SKIP = {
    "python3 -m venv": "creates the environment the tests already run in",
    ".venv/bin/pip install": "installs tedepr, already installed where the tests run",
    ".venv/bin/python -m pytest": "the test suite itself",
    "torchrun": "two training processes; tests/test_train.py checks DDP against one process",
    "python3 -m pip download": "fetches wheels for the GPU machine (network)",
    "bash benchmarks/gpu_check.sh": "the GPU check; tests/test_gpu_check.py runs its CPU smoke mode",
}

#: (command prefix, regex, replacement, why): smaller settings for long examples
SMALLER = [
    ("tedepr finetune", r"--epochs \d+", "--epochs 2", "30 epochs take 10-30 s"),
    ("tedepr run", r"$", " --set finetune.epochs=1 --set bench.iters=5 --set bench.warmup=1",
     "the recipe trains 30 epochs and times 50 rounds"),
    ("tedepr bench", r"$", " --iters 5 --warmup 1", "100 timed rounds per engine and batch"),
]


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ```bash blocks, in order: comments dropped, `a && b`
    split, `.venv/bin/tedepr` written `tedepr`, SKIP left out and SMALLER applied."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s+)#.*$", "", line).strip()
            for cmd in filter(None, (c.strip() for c in line.split("&&"))):
                cmd = re.sub(r"^\.venv/bin/tedepr\b", "tedepr", cmd)
                if any(cmd.startswith(s) for s in SKIP):
                    continue
                assert cmd.startswith("tedepr "), (
                    f"README example {cmd!r} is neither a tedepr command nor in SKIP: add it to one")
                for prefix, pattern, repl, _ in SMALLER:
                    if cmd.startswith(prefix + " "):
                        cmd = re.sub(pattern, repl, cmd, count=1)
                out.append(cmd)
    return out


def _fresh_copy(dst: Path) -> Path:
    """The repository's files as a fresh checkout has them (plus new, not yet committed ones)."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the repository's files")
    r = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others",
                        "--exclude-standard"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"not a git checkout: {r.stderr.strip()}")
    for rel in filter(None, r.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] != "runs" and "__pycache__" not in p.parts}


def test_readme_commands_are_found_and_substituted():
    cmds = readme_commands((ROOT / "README.md").read_text())
    verbs = [c.split()[1] for c in cmds]
    for verb in ("prune", "decompose", "finetune", "eval", "export", "validate", "kernels", "plan", "bench",
                 "run"):
        assert verb in verbs, verb
    assert all("--epochs 2" in c for c in cmds if c.startswith("tedepr finetune"))
    assert not any(c.startswith(("torchrun", ".venv")) for c in cmds)
    assert readme_commands("```bash\n.venv/bin/tedepr zoo   # a comment\ntedepr a && tedepr b\n```\n") == \
        ["tedepr zoo", "tedepr a", "tedepr b"]


def test_readme_examples_run_in_order_on_a_fresh_copy(tmp_path):
    bindir = Path(sys.executable).parent
    if not (bindir / "tedepr").exists():
        pytest.skip(f"no tedepr console script beside {sys.executable}")
    repo = _fresh_copy(tmp_path / "repo")
    cmds = readme_commands((repo / "README.md").read_text())
    before_root, before = set(os.listdir(repo)), _snapshot(repo)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "OMP_NUM_THREADS": "1"}
    for cmd in cmds:
        r = subprocess.run(["bash", "-c", cmd], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"README example failed (exit {r.returncode}): {cmd}\n{r.stderr[-3000:]}"
    assert set(os.listdir(repo)) - before_root <= {"runs"}  # nothing left in the repository root
    assert _snapshot(repo) == before  # no file of the repository written
