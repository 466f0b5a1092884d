"""Secrets: references in the plan (``env:NAME``, ``vault:MOUNT/PATH#FIELD``), the backends
that read them, the resolver that hands values to the one call needing them, the redactor that
keeps those values out of every message, and the rotation rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from spark_backup.lazy import lazy_exports

if TYPE_CHECKING:
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

# The plan's models need the references and the section's settings; the rotation rule loads
# where rotation is checked (``secrets status``, alerts), not in every command.
_HOMES = {
    "EnvSecrets": "spark_backup.engine.secrets.backends",
    "SecretValue": "spark_backup.engine.secrets.backends",
    "VaultSecrets": "spark_backup.engine.secrets.backends",
    "RotationConfig": "spark_backup.engine.secrets.config",
    "SecretsConfig": "spark_backup.engine.secrets.config",
    "VaultConfig": "spark_backup.engine.secrets.config",
    "REDACTOR": "spark_backup.engine.secrets.redact",
    "Redactor": "spark_backup.engine.secrets.redact",
    "SecretRef": "spark_backup.engine.secrets.refs",
    "SecretReference": "spark_backup.engine.secrets.refs",
    "env_reference": "spark_backup.engine.secrets.refs",
    "find_references": "spark_backup.engine.secrets.refs",
    "parse_reference": "spark_backup.engine.secrets.refs",
    "SecretResolver": "spark_backup.engine.secrets.resolver",
    "open_secrets": "spark_backup.engine.secrets.resolver",
    "RotationFinding": "spark_backup.engine.secrets.rotation",
    "RotationPolicy": "spark_backup.engine.secrets.rotation",
}

__getattr__ = lazy_exports(__name__, _HOMES, globals())

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
