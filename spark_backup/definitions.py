"""Dagster entry point (workspace.yaml, ``dagster dev``): everything built from the plan at
$SPARK_BACKUP_PLAN, or ./spark_backup.yaml, with the platform's own S3Resource per store from
$SPARK_BACKUP_S3_RESOURCES if set (``spark_backup/defs/resources.py``). Loaded lazily, so
importing this module reads no plan."""

import dagster as dg

from spark_backup.defs.build import build_definitions
from spark_backup.plan import load_plan


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(load_plan())
