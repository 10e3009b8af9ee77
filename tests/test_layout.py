"""The package layout's one rule: ``transport`` (what publishers and clients share) never imports ``actors``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` in ``path`` names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_transport_never_imports_actors() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in imported_modules(path) if name.split(".")[0] == "actors")
        for path in sorted((ROOT / "transport").rglob("*.py"))
    }
    offenders = {path: names for path, names in offenders.items() if names}
    assert offenders == {}, f"transport/ must not import actors/: {offenders}"


def test_the_rule_sees_an_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os\nfrom actors.flow import InFlight\nimport actors.store as s\n")
    assert {"actors.flow", "actors.store"} <= imported_modules(sample)
