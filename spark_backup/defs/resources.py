"""The one resource the assets and checks use: the protection plan, opened as a service.

Which stores, keys and sources are used is the plan's choice (``engine.stores.open_store`` is
the switch between a local folder and S3), so environments differ by plan file, not by code.
"""

from __future__ import annotations

from functools import cached_property

from dagster import ConfigurableResource

from spark_backup.service import BackupService

RESOURCE_KEY = "spark_backup"


class SparkBackupResource(ConfigurableResource):
    """Opens the plan at ``plan_path`` (validated when first used in a run)."""

    plan_path: str

    @cached_property
    def service(self) -> BackupService:
        return BackupService.from_path(self.plan_path)
