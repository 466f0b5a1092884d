"""Reading a plan file: YAML in, a validated plan out, or one ``PlanError`` line naming the
file and every field at fault."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from spark_backup.errors import PlanError
from spark_backup.plan.schema import Plan, kinds_named, plan_model

PLAN_ENV = "SPARK_BACKUP_PLAN"
DEFAULT_PLAN_PATH = "spark_backup.yaml"


class LoadedPlan:
    """A validated plan and the file it came from; relative paths resolve against that file."""

    def __init__(self, plan: Plan, path: Path):
        self.plan = plan
        self.path = path

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, path: str) -> Path:
        return resolve_relative(self.base_dir, path)


def resolve_relative(base_dir: Path, path: str) -> Path:
    """``path`` with ``~`` and ``$VARS`` expanded, relative to ``base_dir`` unless absolute."""
    expanded = Path(os.path.expanduser(os.path.expandvars(path)))
    return Path(os.path.normpath(expanded if expanded.is_absolute() else base_dir / expanded))


def resolve_plan_path(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get(PLAN_ENV) or DEFAULT_PLAN_PATH)


def load_plan(path: str | os.PathLike[str] | None = None) -> LoadedPlan:
    """Read and validate the plan; raise ``PlanError`` with one line naming file and fields."""
    plan_path = resolve_plan_path(path)
    try:
        text = plan_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(
            f"{plan_path}: plan file not found (pass --plan or set {PLAN_ENV})"
        ) from None
    except OSError as exc:
        raise PlanError(f"{plan_path}: cannot read plan: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PlanError(f"{plan_path}: {where}invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise PlanError(f"{plan_path}: expected a mapping with encryption, stores and sources")
    return LoadedPlan(plan=validate_plan(data, plan_path), path=plan_path.resolve())


def validate_plan(data: dict[str, Any], plan_path: Path) -> Plan:
    """The plan ``data`` validated by the models of the kinds it names, so that reading it loads
    no other kind. Each source is validated by its own kind's model either way; a plan that
    fails is validated again by the model of every kind, whose errors are the ones reported
    (an unknown kind, the union's tags)."""
    named = kinds_named(data)
    if named is not None:
        try:
            return plan_model(named).model_validate(data)
        except ValidationError:
            pass
    model = plan_model()
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        from spark_backup.plan.errors import describe_validation_error  # difflib: errors only

        raise PlanError(f"{plan_path}: {describe_validation_error(exc, data, model)}") from None
