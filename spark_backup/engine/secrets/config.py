"""The plan's ``secrets`` section: where ``vault:`` references are read, and the rotation rule
every referenced secret is held to."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field

from spark_backup.engine.settings import Duration, EnvName, SettingsModel

ROTATION_MAX_AGE = dt.timedelta(days=182)


class VaultConfig(SettingsModel):
    """A Vault or OpenBao server. The token is the one credential that cannot come from Vault
    itself: it is named by environment variable (``VAULT_TOKEN`` unless told otherwise)."""

    # Default: $VAULT_ADDR, as the vault/bao command line reads it.
    address: str | None = Field(None, pattern=r"^https?://")
    token_env: EnvName = "VAULT_TOKEN"
    namespace: str | None = None
    timeout: Duration = dt.timedelta(seconds=10)
    # A CA bundle for a private CA; certificates are always verified.
    ca_cert: str | None = None


class RotationConfig(SettingsModel):
    """Every secret the plan names must have been written within ``max_age``. A secret whose age
    the backend cannot tell (an environment variable) fails unless ``unknown_age`` says
    otherwise: enforcement that a missing date switches off would enforce nothing."""

    max_age: Duration = ROTATION_MAX_AGE
    unknown_age: Literal["fail", "warn"] = "fail"


class SecretsConfig(SettingsModel):
    vault: VaultConfig | None = None
    rotation: RotationConfig = RotationConfig.default_instance()
