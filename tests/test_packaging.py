"""What the package declares against what it uses: every module ``fastfwd`` imports is in the
standard library or a declared dependency, and every declared dependency is imported (an
installed package then runs on exactly what pip brought)."""
from __future__ import annotations

import ast
import re
import sys
import tomllib

from helpers_control import REPO


def imported_distributions() -> set[str]:
    """Top-level modules fastfwd's sources import that are neither its own nor the standard
    library's, written as distribution names are normalized (lower case, '-')."""
    found = set()
    for source in (REPO / "fastfwd").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found |= {name.split(".")[0] for name in names}
    return {name.replace("_", "-").lower() for name in found - set(sys.stdlib_module_names) - {"fastfwd"}}


def test_every_import_is_declared_and_every_dependency_imported() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.match(r"[A-Za-z0-9_.-]+", dep).group().replace("_", "-").lower()  # type: ignore[union-attr]
                for dep in project["dependencies"]}
    assert imported_distributions() == declared
