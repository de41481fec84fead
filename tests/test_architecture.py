"""The house rules, checked on the source: imports run one way, no circles, no private names.

Walks every module of the package with ``ast`` (module-level *and* function-level
imports, ``importlib.import_module`` calls included) and fails on

* a circle in the import graph (a function-level import does not hide one);
* a module taking a private (``_name``) name from another module of the package,
  by ``from x import _name`` or by ``module._name`` on an imported module;
* an import against the layers (entry modules -> cli -> ui -> serve -> engine ->
  checkpoint -> model -> kernels -> foundation), the rule ``lint-imports``
  checks too (pyproject.toml), here with function-level imports counted;

and checks that the README's layout table names every module of the package.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qnext_mlx"

ENTRY_MODULES = ("generate", "convert", "server", "chat", "app", "plan", "doctor")
LAYERS: List[Set[str]] = [
    {f"qnext_mlx.{m}" for m in ENTRY_MODULES},
    {"qnext_mlx.cli"},
    {"qnext_mlx.ui"},
    {"qnext_mlx.serve"},
    {"qnext_mlx.engine"},
    {"qnext_mlx.checkpoint"},
    {"qnext_mlx.model"},
    {"qnext_mlx.kernels"},
    {"qnext_mlx.atomic", "qnext_mlx.errors", "qnext_mlx.version"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "demo_model" not in p.parts}


MODULES = all_modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def resolve(importer: str, module: Optional[str], level: int) -> str:
    """The absolute name of ``from <level dots><module> import ...`` inside ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str) -> Iterator[Tuple[str, List[str], int]]:
    """``(target module, imported names, line)`` for every import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text(), filename=str(MODULES[name]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            yield resolve(name, node.module, node.level), [a.name for a in node.names], node.lineno
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            target = node.args[0].value
            if target.startswith("."):
                level = len(target) - len(target.lstrip("."))
                target = resolve(name, target.lstrip(".") or None, level)
            yield target, [], node.lineno


def edges_of(name: str) -> Iterator[Tuple[str, int]]:
    """Modules of the package that ``name`` imports (a ``from pkg import sub`` counts as ``pkg.sub``)."""
    for target, names, line in imports_of(name):
        if target not in MODULES:
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
        others = [n for n in names if f"{target}.{n}" not in MODULES]
        yield from ((s, line) for s in subs)
        if others or not names:
            yield target, line


def room_of(name: str) -> Optional[Tuple[int, str]]:
    """``(layer index, room)`` of a module: the room is the package or module it belongs to."""
    for i, layer in enumerate(LAYERS):
        for room in layer:
            if name == room or name.startswith(room + "."):
                return i, room
    return None


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One circle of ``graph`` (as a list of modules), or None."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_circle():
    graph = {name: {t for t, _ in edges_of(name)} - {name} for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_run_one_way_between_the_rooms():
    """A module imports its own room and lower layers only (siblings in one layer are independent)."""
    wrong = []
    for name in MODULES:
        here = room_of(name)
        for target, line in edges_of(name):
            there = room_of(target)
            if here is None or there is None or there[1] == here[1]:
                continue
            if there[0] <= here[0]:
                wrong.append(f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)
    outside = [name for name in MODULES if name != "qnext_mlx" and room_of(name) is None]
    assert not outside, f"modules outside every room: {outside}"


def private_uses(name: str) -> Iterator[str]:
    """``from x import _y`` and ``x._y`` on modules of the package other than ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    module_aliases: Dict[str, str] = {}
    for target, names, line in imports_of(name):
        if target not in MODULES or target == name:
            continue
        for n in names:
            if n.startswith("_") and not n.startswith("__"):
                yield f"{MODULES[name].relative_to(ROOT)}:{line} takes {target}.{n}"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = resolve(name, node.module, node.level)
            for a in node.names:
                if f"{base}.{a.name}" in MODULES:
                    module_aliases[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    module_aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = module_aliases.get(node.value.id)
            attr = node.attr
            if target and target != name and attr.startswith("_") and not attr.startswith("__"):
                yield f"{MODULES[name].relative_to(ROOT)}:{node.lineno} uses {target}.{attr}"


def test_no_module_takes_a_private_name_from_another():
    found = [use for name in MODULES for use in private_uses(name)]
    assert not found, "\n".join(found)


def test_the_checks_see_function_level_imports(tmp_path, monkeypatch):
    """The walker finds an import inside a function and a private attribute use."""
    fake = tmp_path / "qnext_mlx" / "fake.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from .engine import stream\n    return stream._private\n")
    monkeypatch.setitem(MODULES, "qnext_mlx.fake", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert ("qnext_mlx.engine.stream", 2) in list(edges_of("qnext_mlx.fake"))
    assert list(private_uses("qnext_mlx.fake")) == ["qnext_mlx/fake.py:3 uses qnext_mlx.engine.stream._private"]


def test_the_import_contract_holds():
    """``lint-imports`` (import-linter, configured in pyproject.toml) keeps the layer contract."""
    pytest.importorskip("importlinter")
    lint = Path(sys.executable).with_name("lint-imports")
    cmd = [str(lint)] if lint.exists() else [sys.executable, "-m", "importlinter.cli"]
    r = subprocess.run(cmd + ["--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 kept, 0 broken" in r.stdout


def test_the_readme_layout_table_matches_the_tree():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout") :]
    end = section.find("\n## ", 4)
    section = section if end < 0 else section[:end]
    named = set(re.findall(r"`(qnext_mlx/[\w/.]*|metal/[\w/.]*|examples/|scripts/|tests/)`", section))
    for path in named:
        assert (ROOT / path).exists(), f"README's layout table names {path}, which does not exist"
    rooms = {p.parent.relative_to(ROOT).as_posix() + "/" for p in PACKAGE.glob("*/__init__.py")}
    for room in rooms:
        assert room in named, f"README's layout table does not name the room {room}"
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        rel = path.relative_to(ROOT).as_posix()
        room = path.parent.relative_to(ROOT).as_posix()
        mentioned = rel in named or f"`{path.stem}`" in section or f"{path.stem}.py" in section
        assert mentioned or f"{room}/" in named and path.stem in section, f"{rel} is not in README's layout table"
