"""Stores hold copies. ``open_store`` is the one switch from a store's settings to an
implementation: a local folder (the embedded default) or S3-compatible object storage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from spark_backup.engine.secrets import SecretResolver
from spark_backup.engine.stores.base import ObjectInfo, ObjectLock, ObjectLockPolicy, ObjectStore
from spark_backup.engine.stores.config import LocalStoreConfig, S3StoreConfig, StoreConfig
from spark_backup.engine.stores.local import LocalStore

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectLock",
    "ObjectLockPolicy",
    "ObjectStore",
    "open_store",
]


def open_store(
    config: StoreConfig,
    resolve: Callable[[str], Path],
    secrets: SecretResolver | None = None,
    s3_client: Any = None,
) -> ObjectStore:
    """The store ``config`` describes; ``resolve`` turns a local store's path (relative to the
    plan file) into a folder; ``secrets`` reads the credentials it names (environment variables
    only, if not given); ``s3_client``, if given, is the S3 store's client (else it makes its
    own)."""
    if isinstance(config, LocalStoreConfig):
        return LocalStore(config.name, resolve(config.path))
    if isinstance(config, S3StoreConfig):
        from spark_backup.engine.stores.s3 import S3Store  # boto3 loads only when S3 is used

        return S3Store.from_config(config, secrets, client=s3_client)
    raise TypeError(f"unknown store config {type(config).__name__}")
