"""Store settings, as a plan writes them: a local folder (the embedded default) or any
S3-compatible object storage. ``engine.stores.open_store`` turns one into a store."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from spark_backup.engine.secrets.refs import SecretReference, env_reference
from spark_backup.engine.settings import Name, SettingsModel


class LocalStoreConfig(SettingsModel):
    """A folder on this machine: the embedded default."""

    name: Name
    kind: Literal["local"]
    path: str = ".spark_backup/store"


class ObjectLockConfig(SettingsModel):
    """S3 Object Lock applied to every object written: the WORM tier."""

    mode: Literal["COMPLIANCE", "GOVERNANCE"]
    retain_days: int = Field(ge=1, le=36500)


class S3StoreConfig(SettingsModel):
    """Any S3-compatible object storage, configured like dagster-aws's ``S3Resource``.

    Credentials are named by reference (``env:NAME`` or ``vault:MOUNT/PATH#FIELD``), never
    written here; without them boto3's default chain (instance profile, ``AWS_*`` variables,
    shared config, ``profile_name``) applies. The older ``*_env: NAME`` fields read as
    ``env:NAME``. In a Dagster run the client of a store whose credentials are ``env:``
    references (or none) comes from the store's ``S3Resource`` (``spark_backup/defs/
    resources.py``), built from these same fields.
    """

    name: Name
    kind: Literal["s3"]
    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    prefix: str = ""
    endpoint_url: str | None = Field(None, pattern=r"^https?://")
    region_name: str | None = None
    access_key_id: SecretReference | None = None
    secret_access_key: SecretReference | None = None
    session_token: SecretReference | None = None
    # A profile of the AWS config (``~/.aws/config``); one with ``role_arn`` assumes that role.
    profile_name: str | None = None
    object_lock: ObjectLockConfig | None = None
    part_size_mb: int = Field(16, ge=5, le=5120)
    max_attempts: int = Field(5, ge=1, le=20)

    @model_validator(mode="before")
    @classmethod
    def _credential_references(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for inline, field in (
                ("aws_access_key_id", "access_key_id"),
                ("aws_secret_access_key", "secret_access_key"),
                ("aws_session_token", "session_token"),
            ):
                if inline in data:
                    raise ValueError(
                        f"'{inline}' is not a store field; name where the credential is with "
                        f"'{field}: env:NAME' or '{field}: vault:MOUNT/PATH#FIELD'"
                    )
            for field in ("access_key_id", "secret_access_key", "session_token"):
                data = env_reference(dict(data), f"{field}_env", field)
        return data

    @field_validator("prefix")
    @classmethod
    def _clean_prefix(cls, value: str) -> str:
        value = value.strip("/")
        if ".." in value.split("/"):
            raise ValueError("expected a key prefix without '..'")
        return value

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> S3StoreConfig:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("set both access_key_id and secret_access_key, or neither")
        return self


StoreConfig = Annotated[LocalStoreConfig | S3StoreConfig, Field(discriminator="kind")]
STORE_KINDS = ("local", "s3")
