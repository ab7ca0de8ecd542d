"""The import direction the README's layout states, held for every module.

``fedgen/`` is the core: no module of it imports ``fedgen.client``, ``fedgen.server`` or
``fedgen.strategies`` at module scope, and only the simulation API and the command line
import them inside a function (lazily, when a command or a simulation needs them).
Client and server meet only in messages: neither imports the other, in any scope, and the
strategies import neither. A failure names each offending file and line.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"fedgen": "fedgen", "client": "fedgen.client", "server": "fedgen.server", "strategies": "fedgen.strategies"}
SIDES = ("fedgen.client", "fedgen.server", "fedgen.strategies")
LAZY_ALLOWED = ("fedgen.simulation", "fedgen.cli")  # may import the sides inside functions
FORBIDDEN = {
    "fedgen.client": {"fedgen.server"},
    "fedgen.server": {"fedgen.client"},
    "fedgen.strategies": {"fedgen.client", "fedgen.server"},
}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. fedgen.server.app
    target: str  # the module imported, resolved: fedgen.client.ledger
    where: str  # path:line
    module_scope: bool


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """(dotted name, is a package's __init__) of a source file."""
    folder, *rest = path.relative_to(root).with_suffix("").parts
    parts = [PACKAGES[folder], *rest]
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join([*anchor, node.module] if node.module else anchor)
    # `from fedgen import client` imports the module fedgen.client.
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def _function_nodes(tree: ast.AST) -> set[int]:
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(child) for child in ast.walk(node) if child is not node)
    return inside


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    """Every fedgen import in ``path`` (a file of the tree at ``root``), resolved to absolute
    module names, with its scope."""
    module, is_package = _module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    in_function = _function_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            targets = _resolve(node, module, is_package)
        else:
            continue
        where = f"{path.relative_to(root)}:{node.lineno}"
        found += [
            Import(module, target, where, id(node) not in in_function)
            for target in targets
            if target.startswith("fedgen")
        ]
    return found


def all_imports() -> list[Import]:
    return [item for folder in PACKAGES for path in sorted((ROOT / folder).rglob("*.py")) for item in imports_of(path)]


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(imports: list[Import]) -> list[str]:
    """Each import against the direction rules, as ``path:line: module imports target (rule)``."""
    found: dict[str, str] = {}  # by path:line, one finding per import statement
    for item in imports:
        side = next((s for s in SIDES if _within(item.module, s)), None)
        target_side = next((s for s in SIDES if _within(item.target, s)), None)
        if target_side is None or target_side == side:
            continue
        if side is None:
            lazy_ok = any(_within(item.module, allowed) for allowed in LAZY_ALLOWED)
            if item.module_scope or not lazy_ok:
                rule = "the core imports no side" + (
                    "" if item.module_scope else " (lazily: only the simulation API and the CLI)"
                )
                found.setdefault(item.where, f"{item.where}: {item.module} imports {item.target} ({rule})")
        elif target_side in FORBIDDEN[side]:
            found.setdefault(
                item.where,
                f"{item.where}: {item.module} imports {item.target} (client and "
                "server meet only in messages; strategies build on the core alone)",
            )
    return list(found.values())


def test_every_module_imports_in_the_direction_the_layout_states():
    imports = all_imports()
    assert len({item.module for item in imports}) > 30  # the walk found the tree
    problems = violations(imports)
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "folder, source, rule",
    [
        ("client", "from fedgen.server.checkpoints import load_checkpoint\n", "meet only in messages"),
        ("server", "def later():\n    from fedgen.client import ledger\n", "meet only in messages"),
        ("strategies", "from ..server import app\n", "meet only in messages"),
        ("fedgen", "from .client.ledger import PrivacyLedger\n", "the core imports no side"),
        ("fedgen", "def later():\n    import fedgen.server.app\n", "only the simulation API and the CLI"),
        ("fedgen/cli", "from ..client.supernode import start_site\n", "the core imports no side"),
    ],
)
def test_an_import_against_the_direction_is_named_with_its_file_and_line(tmp_path, folder, source, rule):
    # A module planted in a copy of the layout, parsed by the same walk (never imported).
    planted = tmp_path / folder / "zz_layering_probe.py"
    planted.parent.mkdir(parents=True)
    planted.write_text('"""probe"""\n' + source, encoding="utf-8")
    problems = violations(imports_of(planted, tmp_path))
    line = source.count("\n")  # the import is the probe's last line (after the docstring)
    assert len(problems) == 1 and problems[0].startswith(f"{folder}/zz_layering_probe.py:{line + 1}: "), problems
    assert rule in problems[0]
