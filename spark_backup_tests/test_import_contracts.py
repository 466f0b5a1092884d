"""The floors of the house, held by a test: engine <- plan <- kinds <- service <- cli/defs, never
upward; only the Dagster layer imports Dagster; and no module outside a kind's own package
names a kind. Imports inside functions count: a lazy import is still an import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from spark_backup.sources import registry

PACKAGE = Path(__file__).resolve().parents[1] / "spark_backup"

# Who may not import whom: module prefix -> forbidden import prefixes.
FORBIDDEN = {
    "spark_backup.engine": (
        "dagster",
        "spark_backup.plan",
        "spark_backup.sources",
        "spark_backup.service",
        "spark_backup.cli",
        "spark_backup.defs",
        "spark_backup.demo",
        "spark_backup.console",
    ),
    "spark_backup.plan": (
        "dagster",
        "spark_backup.service",
        "spark_backup.cli",
        "spark_backup.defs",
        "spark_backup.demo",
    ),
    "spark_backup.sources": (
        "dagster",
        "spark_backup.service",
        "spark_backup.cli",
        "spark_backup.defs",
        "spark_backup.demo",
        "spark_backup.definitions",
    ),
    "spark_backup.service": ("dagster", "spark_backup.cli", "spark_backup.defs"),
    "spark_backup.cli": ("dagster",),
    "spark_backup.demo": ("dagster",),
    "spark_backup.console": ("dagster",),
}
# The Dagster layer: the only modules that import dagster (or its libraries) themselves.
DAGSTER_LAYER = ("spark_backup.defs", "spark_backup.definitions")
DAGSTER_FAMILY = ("dagster", "dagster_aws", "dagster_postgres")
# psycopg2 is dagster-postgres's driver for instance storage only; spark-backup's own
# connections are psycopg 3's.
NOWHERE = ("psycopg2",)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.split(".")[: -node.level or None]
                found.add(".".join([*base, node.module or ""]).rstrip("."))
            elif node.module:
                found.add(node.module)
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize(("module", "path"), sorted(_modules().items()))
def test_imports_keep_the_floors_apart(module: str, path: Path) -> None:
    imported = _imports(path, module)
    for layer, forbidden in FORBIDDEN.items():
        if not _within(module, layer):
            continue
        wrong = sorted(i for i in imported if any(_within(i, f) for f in forbidden))
        assert not wrong, f"{module} ({layer}) imports {', '.join(wrong)}"
    if not any(_within(module, layer) for layer in DAGSTER_LAYER):
        dagster = sorted(i for i in imported if any(_within(i, d) for d in DAGSTER_FAMILY))
        assert not dagster, f"{module} imports {', '.join(dagster)}; only defs/ may"
    nowhere = sorted(i for i in imported if any(_within(i, n) for n in NOWHERE))
    assert not nowhere, f"{module} imports {', '.join(nowhere)}"


def test_no_module_outside_a_kind_names_a_kind() -> None:
    """Kinds are asked through the registry; their names appear only in their own package
    (and in pyproject.toml's entry points, which register them), and no other module imports
    a kind's package."""
    names = set(registry.kinds())
    offenders = []
    for module, path in _modules().items():
        owner = next((n for n in names if _within(module, f"spark_backup.sources.{n}")), None)
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names and node.value != owner:
                offenders.append(f"{where}:{node.lineno} {node.value!r}")
        for imported in _imports(path, module):
            kind = next((n for n in names if _within(imported, f"spark_backup.sources.{n}")), None)
            if kind and kind != owner:
                offenders.append(f"{where} imports {imported}")
            if imported == "spark_backup.sources":
                # ``from spark_backup.sources import <kind>`` names the kind as a module
                tree = ast.parse(path.read_text())
                for node in ast.walk(tree):
                    if isinstance(node, ast.ImportFrom) and node.module == "spark_backup.sources":
                        offenders += [
                            f"{where} imports kind {a.name}" for a in node.names if a.name in names
                        ]
    assert not offenders, "kinds named outside their package: " + "; ".join(offenders)
