"""The package's shape: no import cycles, and a library that knows nothing of the CLI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tedepr_cli"
CLI_MODULES = ("tedepr_cli.cli", "tedepr_cli.console", "tedepr_cli.__main__", "tedepr_cli.commands")
UI_LIBRARIES = ("typer", "rich", "click")


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _runtime_imports(tree: ast.AST):
    """Every import statement, at any depth (lazy imports inside functions count: a cycle
    hidden in a function is still a cycle), except under ``if TYPE_CHECKING:``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(module -> package modules it imports, module -> top-level third-party names)."""
    mods = _modules()
    internal: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps, ext = set(), set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target
                           for a in node.names]
            else:
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods:
                    if t != name:
                        deps.add(t)
                else:
                    ext.add(t.split(".")[0])
        internal[name] = deps
        external[name] = ext
    return internal, external


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_no_import_cycle_inside_the_package():
    internal, _ = _graph()
    assert _cycle(internal) is None, " -> ".join(_cycle(internal))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _is_cli(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in CLI_MODULES)


def test_library_modules_never_import_typer_rich_or_click():
    """Directly, or through any package module they import."""
    internal, external = _graph()
    bad = []
    for name in internal:
        if _is_cli(name) or name == "tedepr_cli":
            continue
        seen, todo = set(), [name]
        while todo:
            m = todo.pop()
            if m in seen:
                continue
            seen.add(m)
            todo.extend(internal[m])
        hits = sorted({f"{m}: {e}" for m in seen for e in external[m] if e in UI_LIBRARIES})
        if hits:
            bad.append(f"{name} reaches {hits}")
    assert not bad, "\n".join(bad)


def test_importing_the_library_loads_no_cli_code():
    code = ("import sys, tedepr_cli, tedepr_cli.api, tedepr_cli.execution, tedepr_cli.export, "
            "tedepr_cli.train, tedepr_cli.bench.core, tedepr_cli.model_data\n"
            "tedepr_cli.prune\n"
            f"print(sorted(m for m in {UI_LIBRARIES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_library_names_options_as_parameters_and_the_cli_as_flags():
    """Library messages know no flags (``errors.opt``): a library caller reads the parameter
    name, the command line its flag."""
    from tedepr_cli.errors import UsageError, cli_flags, opt
    from tedepr_cli.pruning.prune import PruneOptions

    def message() -> str:
        try:
            PruneOptions(sparsity=2.0).validate()
        except UsageError as e:
            return str(e)
        raise AssertionError("validate() accepted sparsity 2.0")

    assert message().startswith("sparsity must be in (0, 1)")
    with cli_flags():
        assert message().startswith("--sparsity must be in (0, 1)")
        assert opt("no-decompose") == "--no-decompose"
    assert opt("no-decompose") == "decompose=False" and opt("min-density") == "min_density"


def test_no_library_string_spells_a_command_line_flag():
    """Outside docstrings and the CLI modules, string literals name options through
    ``errors.opt`` (so a library caller never reads ``--flag`` advice)."""
    import io
    import re
    import tokenize

    flag = re.compile(r"(?<![\w\-`.])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*\b")
    bad = []
    for name, path in _modules().items():
        if _is_cli(name) or name == "tedepr_cli.errors":
            continue
        src = path.read_text()
        tree = ast.parse(src)
        docs = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                docs.update(range(first.lineno, first.end_lineno + 1))
        for t in tokenize.generate_tokens(io.StringIO(src).readline):
            if t.type == tokenize.STRING and t.start[0] not in docs and flag.search(t.string):
                bad.append(f"{path.name}:{t.start[0]}: {t.string[:70]}")
    assert not bad, "\n".join(bad)
