"""The layout holds: the library (``cdl/``) and the services never import the operator tooling
(``cdl_tools/``), and each library module's ``__all__`` names exactly its public definitions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
LIBRARY = sorted(p for p in (ROOT / "cdl").rglob("*.py") if "v1" not in p.relative_to(ROOT / "cdl").parts)
SERVICES = sorted((ROOT / "services").rglob("*.py"))


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", LIBRARY + SERVICES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_and_the_services_do_not_import_the_tooling(path: Path) -> None:
    tooling = sorted(m for m in _imports(path) if m == "cdl_tools" or m.startswith("cdl_tools."))
    assert tooling == [], f"{path.relative_to(ROOT)} imports the operator tooling: {tooling}"


def _public_definitions(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
    return {n for n in names if not n.startswith("_")}


def _declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "__all__":
            assert node.value is not None
            return list(ast.literal_eval(node.value))
    return None


@pytest.mark.parametrize(
    "path",
    [p for p in LIBRARY if _declared_all(ast.parse(p.read_text())) is not None],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_every_public_function_and_class_of_the_library_is_in_its_all(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    declared = _declared_all(tree)
    assert declared is not None
    defined = _public_definitions(tree)
    missing = sorted(defined - set(declared))
    assert missing == [], f"{path.relative_to(ROOT)}: public but not in __all__: {missing}"
    top_level: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            top_level.add(node.name)
        elif isinstance(node, ast.Assign):
            top_level.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top_level.add(node.target.id)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            top_level.update((a.asname or a.name).split(".")[0] for a in node.names)
    unknown = sorted(set(declared) - top_level)
    assert unknown == [], f"{path.relative_to(ROOT)}: __all__ names what the module does not define: {unknown}"
