"""Secrets: references in the plan (``env:NAME``, ``vault:MOUNT/PATH#FIELD``), the backends
that read them, the resolver that hands values to the one call needing them, the redactor that
keeps those values out of every message, and the rotation rule."""

from spark_backup.engine.secrets.backends import EnvSecrets, SecretValue, VaultSecrets
from spark_backup.engine.secrets.config import RotationConfig, SecretsConfig, VaultConfig
from spark_backup.engine.secrets.redact import REDACTOR, Redactor
from spark_backup.engine.secrets.refs import (
    SecretRef,
    SecretReference,
    env_reference,
    find_references,
    parse_reference,
)
from spark_backup.engine.secrets.resolver import SecretResolver, open_secrets
from spark_backup.engine.secrets.rotation import RotationFinding, RotationPolicy

__all__ = [
    "REDACTOR",
    "EnvSecrets",
    "Redactor",
    "RotationConfig",
    "RotationFinding",
    "RotationPolicy",
    "SecretRef",
    "SecretReference",
    "SecretResolver",
    "SecretValue",
    "SecretsConfig",
    "VaultConfig",
    "VaultSecrets",
    "env_reference",
    "find_references",
    "open_secrets",
    "parse_reference",
]
