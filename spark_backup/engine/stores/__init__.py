"""Stores hold copies. ``open_store`` is the one switch from a plan's store entry to an
implementation: a local folder (the embedded default) or S3-compatible object storage."""

from __future__ import annotations

from spark_backup.engine.stores.base import ObjectInfo, ObjectLock, ObjectLockPolicy, ObjectStore
from spark_backup.engine.stores.local import LocalStore
from spark_backup.plan import LoadedPlan, LocalStoreConfig, S3StoreConfig, StoreConfig

__all__ = [
    "LocalStore",
    "ObjectInfo",
    "ObjectLock",
    "ObjectLockPolicy",
    "ObjectStore",
    "open_store",
]


def open_store(config: StoreConfig, plan: LoadedPlan) -> ObjectStore:
    if isinstance(config, LocalStoreConfig):
        return LocalStore(config.name, plan.resolve(config.path))
    if isinstance(config, S3StoreConfig):
        from spark_backup.engine.stores.s3 import S3Store  # boto3 loads only when S3 is used

        return S3Store.from_config(config)
    raise TypeError(f"unknown store config {type(config).__name__}")
