"""The folder tree is the architecture: these rules keep it so (see README, "Where things live")."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pandora_lightning"

# package -> project packages it must never import (directly); the framework never uses the world.
FORBIDDEN = {
    "models": ("training", "data", "evaluation", "inference", "world", "bench", "recipe", "cli", "config"),
    "data": ("training", "evaluation", "inference", "world", "bench", "recipe", "cli", "models"),
    "training": ("evaluation", "inference", "world", "bench", "recipe", "cli"),
    "inference": ("evaluation", "world", "bench", "recipe", "cli"),
    "evaluation": ("world", "bench", "cli"),
}


def project_imports(source: str) -> set[str]:
    """Every pandora_lightning module a source file imports, at any depth (function-level too)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pandora_lightning"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pandora_lightning"))
    return found


def violations(package: str, imports: set[str]) -> list[str]:
    bad = []
    for name in imports:
        top = name.split(".")[1] if name.count(".") else ""
        if top in FORBIDDEN.get(package, ()):
            bad.append(name)
    return sorted(bad)


def test_the_checker_catches_a_forbidden_import():
    source = "def f():\n    from pandora_lightning.world.metrics import WORLD_METRICS\n"
    assert violations("training", project_imports(source)) == ["pandora_lightning.world.metrics",
                                                               "pandora_lightning.world.metrics.WORLD_METRICS"]
    assert violations("world", project_imports(source)) == []


def test_framework_packages_keep_their_layers():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        package = path.relative_to(PACKAGE).parts[0]
        for name in violations(package, project_imports(path.read_text())):
            problems.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not problems, "\n".join(problems)


def test_models_import_only_models_and_errors():
    for path in sorted((PACKAGE / "models").rglob("*.py")):
        others = {n for n in project_imports(path.read_text())
                  if not n.startswith(("pandora_lightning.models", "pandora_lightning.errors"))}
        assert not others, f"{path.name} imports {others}"


def test_one_project_error_type():
    """Every user-facing error is a PandoraError (subclasses only say which kind)."""
    defined = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(base, "id", "").endswith(("Error", "Exception")) and base.id != "PandoraError"
                for base in node.bases
            ):
                defined.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert defined == ["errors.py:PandoraError"], defined
