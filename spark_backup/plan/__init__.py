"""The protection plan: what is protected, where copies go, who can open them, how long they stay.

One YAML file, validated into typed models: ``schema.py`` (encryption, stores, defaults, the
sources' common fields in ``source.py``, each kind's own fields from its package), ``load.py``
(reading a file), ``errors.py`` (one line naming every field at fault). Credentials never
appear in the plan; it names where they are.
"""

from spark_backup.engine.settings import format_duration, parse_duration
from spark_backup.plan.load import (
    DEFAULT_PLAN_PATH,
    PLAN_ENV,
    LoadedPlan,
    load_plan,
    resolve_plan_path,
)
from spark_backup.plan.schema import Defaults, Encryption, Plan, plan_model
from spark_backup.plan.source import Compression, Retention, SourceSettings

__all__ = [
    "DEFAULT_PLAN_PATH",
    "PLAN_ENV",
    "Compression",
    "Defaults",
    "Encryption",
    "LoadedPlan",
    "Plan",
    "Retention",
    "SourceSettings",
    "format_duration",
    "load_plan",
    "parse_duration",
    "plan_model",
    "resolve_plan_path",
]
