"""Replication targets as a plan writes them (``replication:``; a source names its targets in
``replicate_to``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from spark_backup.engine.settings import EnvName, Name, SettingsModel
from spark_backup.engine.stores.config import StoreConfig


class StoreReplicaConfig(SettingsModel):
    """Another store (a second bucket or endpoint), described here and not among the plan's
    stores: listing, prune and restore never see it, so nothing of spark-backup's own deletes a
    replica. It holds each copy under the same keys as the source store, so a plan whose store
    points at it lists, verifies and restores the copies."""

    name: Name
    kind: Literal["store"]
    store: StoreConfig


class OciReplicaConfig(SettingsModel):
    """An OCI registry: one artifact per version, ``<registry>/<repository>/<source>:<version>``,
    one layer per file with its sha256 as the OCI digest (a ModelPack-style manifest)."""

    name: Name
    kind: Literal["oci"]
    registry: str = Field(pattern=r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
    repository: str = Field("spark-backup", pattern=r"^[a-z0-9]+([._/-][a-z0-9]+)*$")
    # Plain HTTP (a registry on 127.0.0.1 in tests); anything else should speak TLS.
    insecure: bool = False
    # Basic credentials from the environment, if the registry asks for them.
    username_env: EnvName | None = None
    password_env: EnvName | None = None
    # Layers are uploaded in chunks of this size (memory stays bounded by one chunk).
    chunk_mib: int = Field(16, ge=1, le=1024)
    timeout_seconds: float = Field(30.0, gt=0, le=3600)


ReplicaConfig = Annotated[StoreReplicaConfig | OciReplicaConfig, Field(discriminator="kind")]
