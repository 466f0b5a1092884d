"""The plan model of a ``config_archive`` source."""

from __future__ import annotations

import datetime as dt
import re
from typing import Literal

from pydantic import Field, field_validator

from spark_backup.engine.settings import Duration, SettingsModel
from spark_backup.globs import glob_to_regex
from spark_backup.plan.source import SourceSettings

_NAMESPACE_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")


def _globs(value: list[str]) -> list[str]:
    for pattern in value:
        glob_to_regex(pattern)
    return value


class KubernetesCluster(SettingsModel):
    """Where a drill applies the restored manifests: a fresh namespace
    ``<prefix>-<UTC time>-<4 hex>`` made for the drill, waited on until its workloads are ready, and deleted."""

    kubectl: str = "kubectl"
    context: str | None = None
    namespace_prefix: str = "drill"
    ready_timeout: Duration = dt.timedelta(minutes=5)

    @field_validator("namespace_prefix")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _NAMESPACE_PREFIX.match(value):
            raise ValueError(
                f"expected a lower-case DNS label of at most 32 characters, got {value!r}"
            )
        return value


class KubernetesDrill(SettingsModel):
    """The restored manifests (globs over the archived paths, as ``include``) validated offline
    against the Kubernetes schemas of ``kubernetes_version``; with ``cluster``, also applied."""

    manifests: list[str] = Field(min_length=1)
    kubernetes_version: str = "1.30.0"
    strict: bool = True
    cluster: KubernetesCluster | None = None

    @field_validator("manifests")
    @classmethod
    def _valid_globs(cls, value: list[str]) -> list[str]:
        return _globs(value)

    @field_validator("kubernetes_version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not re.fullmatch(r"\d+\.\d+\.\d+", value):
            raise ValueError(f"expected a version like 1.30.0, got {value!r}")
        return value


class WireGuardDrill(SettingsModel):
    """The restored WireGuard configurations (globs over the archived paths) parsed; with
    ``tunnel``, each brought up with wireguard-go in a network namespace of its own and pinged
    through from a probe peer in another."""

    configs: list[str] = Field(min_length=1)
    tunnel: bool = True
    timeout: Duration = dt.timedelta(seconds=30)

    @field_validator("configs")
    @classmethod
    def _valid_globs(cls, value: list[str]) -> list[str]:
        return _globs(value)


class OpenVpnDrill(SettingsModel):
    """The restored OpenVPN configurations (globs over the archived paths) parsed, and every
    file they name (keys, certificates, CRL, client-config folder) present in the copy."""

    configs: list[str] = Field(min_length=1)

    @field_validator("configs")
    @classmethod
    def _valid_globs(cls, value: list[str]) -> list[str]:
        return _globs(value)


class ConfigDrill(SettingsModel):
    """What a restore drill proves of the restored tree beyond its file counts."""

    kubernetes: KubernetesDrill | None = None
    wireguard: WireGuardDrill | None = None
    openvpn: OpenVpnDrill | None = None


class ConfigArchiveSource(SourceSettings):
    """Configuration trees (DGX, Kubernetes, VPN) archived with tar, modes and links kept."""

    kind: Literal["config_archive"]
    paths: list[str] = Field(min_length=1)
    include: list[str] = Field(default=[])
    exclude: list[str] = Field(default=[])
    one_file_system: bool = True
    # A file that shrinks while tar reads it is padded with zeros (torn). False fails the backup;
    # true keeps the copy, which records the torn files for restore and verify to name.
    allow_torn_files: bool = False
    # What a restore drill proves beyond the tree's file counts (see docs/drills.md).
    drill: ConfigDrill = ConfigDrill.default_instance()

    @field_validator("include", "exclude")
    @classmethod
    def _valid_globs(cls, value: list[str]) -> list[str]:
        return _globs(value)

    @field_validator("paths")
    @classmethod
    def _absolute_or_relative(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.strip():
                raise ValueError("expected non-empty paths")
        return value
