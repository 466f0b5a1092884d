"""The resources the assets and checks use: the protection plan, opened as a service, and the
secrets backends its references name.

Which stores, keys, sources and secrets backends are used is the plan's choice
(``engine.stores.open_store`` and ``engine.secrets.open_secrets`` are the switches), so
environments differ by plan file, not by code.
"""

from __future__ import annotations

from functools import cached_property

from dagster import ConfigurableResource

from spark_backup.engine.secrets import RotationPolicy
from spark_backup.service import BackupService, SecretStatus

RESOURCE_KEY = "spark_backup"
SECRETS_RESOURCE_KEY = "secrets"


class SparkBackupResource(ConfigurableResource):
    """Opens the plan at ``plan_path`` (validated when first used in a run)."""

    plan_path: str

    @cached_property
    def service(self) -> BackupService:
        return BackupService.from_path(self.plan_path)


class SecretsResource(ConfigurableResource):
    """The secrets backends of the plan at ``plan_path`` (environment variables, and Vault or
    OpenBao where the plan's ``secrets.vault`` names one). Hands out statuses, never values:
    the values are read where a backup or restore needs them."""

    plan_path: str

    @cached_property
    def _plan(self) -> BackupService:
        return BackupService.from_path(self.plan_path)

    def status(self, source_name: str) -> list[SecretStatus]:
        """Version, age and rotation verdict of each secret a backup of the source needs."""
        plan = self._plan
        return plan.secrets_status(plan.source(source_name))

    def rotation_policy(self) -> RotationPolicy:
        return self._plan.rotation_policy()
