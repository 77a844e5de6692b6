"""One-way imports between the packages, read from the source with ast (README "Repository map").

The stages sit at the bottom, the job store above them, the API and the workers on the store
(never on each other), the CLI on top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> top-level packages of this repository it must never import
FORBIDDEN = {
    "layout_planner": {"grounded_sd", "jobs", "api", "worker", "lmd"},
    "grounded_sd": {"jobs", "api", "worker", "lmd"},
    "jobs": {"api", "worker"},
    "api": {"worker"},
    "worker": {"api"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in a module, including imports inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    offenders = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = imported_packages(path) & FORBIDDEN[package]
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_the_scan_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from worker.runtime import current\n    import api.main\n")
    assert imported_packages(module) == {"worker", "api"}
