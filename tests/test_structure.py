"""The package's layers: no arrow runs back up. ``methods`` (training) and ``evaluation`` (attacks
and the test harness) never import each other; the layers below them import neither."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).parent.parent / "lit_safety"
FORBIDDEN = {
    "evaluation": ("lit_safety.methods", "lit_safety.cli"),
    "methods": ("lit_safety.evaluation", "lit_safety.cli"),
    "data": ("lit_safety.methods", "lit_safety.evaluation", "lit_safety.cli"),
}
BASE = ("losses.py", "adversaries.py", "representations.py", "backbone.py", "artifacts.py")


def imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_no_import_runs_back_up():
    offences = []
    for package, forbidden in FORBIDDEN.items():
        for path in (PACKAGE / package).rglob("*.py"):
            offences += [f"{path.name} imports {name}" for name in imports(path) if name.startswith(forbidden)]
    for name in BASE:
        bad = ("lit_safety.methods", "lit_safety.evaluation", "lit_safety.cli")
        offences += [f"{name} imports {i}" for i in imports(PACKAGE / name) if i.startswith(bad)]
    assert not offences, offences
