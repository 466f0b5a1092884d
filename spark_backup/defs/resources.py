"""The resources the assets, checks and sensors use, one per concern:

- ``spark_backup`` (``SparkBackupResource``): the protection plan, opened as the service that
  backs up, checks and restores;
- ``stores`` (``StoresResource``): how a run reaches the plan's stores, one dagster-aws
  ``S3Resource`` per S3 store (a local folder needs none); the service takes its clients;
- ``secrets`` (``SecretsResource``): the plan's secrets backends, for statuses (never values);
- ``notifier`` (``NotifierResource``): the plan's ticket desk, which turns a failure into a
  ticket and an email and journals both.

``plan_resources`` is the one switch that picks the implementations, from the plan and the
platform: which stores and secrets backends exist and which ticket backend is used (outbox,
webhook, Jira) is the plan's choice (``engine.stores.open_store`` is the switch between a local
folder and S3, ``engine.secrets.open_secrets`` between the environment and Vault,
``notify.TicketDesk`` between the ticket backends), so environments differ by plan file, not
by code; the platform adds its own ``S3Resource`` per store. No resource holds backup logic.

S3 in a Dagster run is configured the Dagster way: each S3 store of the plan is an
``S3StoreResource`` (dagster-aws's ``S3Resource`` with the store's name) whose session fields
(region, endpoint, profile, which may assume a role, retries, ``EnvVar`` credentials) come from
the store's entry in the plan, and, for the fields the plan leaves unset, from the platform's
own ``S3Resource`` for that store, named by ``$SPARK_BACKUP_S3_RESOURCES``
(``module:attribute``, a mapping of store name to ``S3Resource``). The plan wins where it speaks
(the command line, which has no Dagster, must reach the same store as a run); a field both set,
to different values, is a contradiction, refused by ``plan check`` and when the definitions load.

An S3 store whose credentials are ``vault:`` references has no ``S3Resource``: its client is made
by the engine with the credentials read from Vault, as on the command line.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

from dagster import ConfigurableResource, EnvVar
from dagster_aws.s3 import S3Resource
from pydantic import Field

from spark_backup.engine.secrets import RotationPolicy
from spark_backup.engine.stores.config import S3StoreConfig
from spark_backup.engine.stores.s3 import make_client
from spark_backup.errors import PlanError
from spark_backup.notify import Failure, Outcome, TicketDesk
from spark_backup.plan import LoadedPlan, Plan, load_plan
from spark_backup.service import BackupService, SecretStatus

RESOURCE_KEY = "spark_backup"
STORES_RESOURCE_KEY = "stores"
SECRETS_RESOURCE_KEY = "secrets"
NOTIFIER_RESOURCE_KEY = "notifier"
# module:attribute of the platform's S3Resource per store name (optional).
S3_RESOURCES_ENV = "SPARK_BACKUP_S3_RESOURCES"
# Session fields of S3Resource and the plan's S3 store that both may set.
SESSION_FIELDS = ("region_name", "endpoint_url", "profile_name", "max_attempts")
# S3Resource's credential fields and the plan's fields holding their references.
CREDENTIAL_FIELDS = {
    "aws_access_key_id": "access_key_id",
    "aws_secret_access_key": "secret_access_key",
    "aws_session_token": "session_token",
}


class S3StoreResource(S3Resource):
    """dagster-aws's ``S3Resource`` for the plan's S3 store ``store``. Its client is made with
    this session configuration and the engine's client settings (SigV4, path-style addressing,
    timeouts), which every store needs."""

    store: str

    def get_client(self) -> Any:
        if self.use_unsigned_session:
            raise PlanError(
                f"store {self.store!r}: use_unsigned_session is set on its S3Resource; a store "
                "writes signed requests only"
            )
        return make_client(
            self.store,
            endpoint_url=self.endpoint_url,
            region_name=self.region_name,
            profile_name=self.profile_name,
            max_attempts=self.max_attempts,
            use_ssl=self.use_ssl,
            verify=self.verify,
            aws_access_key_id=self.aws_access_key_id or None,
            aws_secret_access_key=self.aws_secret_access_key or None,
            aws_session_token=self.aws_session_token or None,
        )


class StoresResource(ConfigurableResource):
    """How a run reaches the plan's stores: the S3 stores' resources (a local folder needs
    none; an S3 store with Vault credentials gets its client from the engine)."""

    s3_stores: list[S3StoreResource] = Field(default_factory=list)

    def s3_clients(self) -> dict[str, Callable[[], Any]]:
        """Per S3 store name, what makes its client (called when the store is first used)."""
        return {resource.store: resource.get_client for resource in self.s3_stores}


class SparkBackupResource(ConfigurableResource):
    """Opens the plan at ``plan_path`` (validated when first used in a run) as the service;
    its S3 stores get their clients from ``stores``."""

    plan_path: str
    stores: StoresResource = Field(default_factory=StoresResource)

    @cached_property
    def service(self) -> BackupService:
        return BackupService(load_plan(self.plan_path), s3_clients=self.stores.s3_clients())


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


class NotifierResource(ConfigurableResource):
    """The ticket desk of the plan at ``plan_path`` (its ``notifications``: outbox, webhook or
    Jira, and the security team's email): a failure becomes a ticket or a comment on it, and
    both are journaled; a failure already reported is neither sent nor journaled again."""

    plan_path: str

    @cached_property
    def _service(self) -> BackupService:
        return BackupService.from_path(self.plan_path)

    def desk(self) -> TicketDesk:
        """The desk, opened once per sensor tick (it reads the ledger of tickets)."""
        return self._service.ticket_desk()

    def report(self, failure: Failure, desk: TicketDesk | None = None) -> Outcome:
        return self._service.report_failure(failure, desk)


def plan_resources(
    loaded: LoadedPlan, platform_s3: Mapping[str, S3Resource] | None = None
) -> dict[str, ConfigurableResource]:
    """The one switch: every resource key with the implementation the plan and the platform
    pick. ``platform_s3``: the platform's own S3Resource per store name (default: those named by
    ``$SPARK_BACKUP_S3_RESOURCES``), merged into each S3 store's resource; ``PlanError`` (one
    line) where they contradict the plan."""
    plan_path = str(loaded.path)
    stores = StoresResource(
        s3_stores=s3_store_resources(
            loaded.plan, platform_s3_resources() if platform_s3 is None else platform_s3
        )
    )
    return {
        RESOURCE_KEY: SparkBackupResource(plan_path=plan_path, stores=stores),
        STORES_RESOURCE_KEY: stores,
        SECRETS_RESOURCE_KEY: SecretsResource(plan_path=plan_path),
        NOTIFIER_RESOURCE_KEY: NotifierResource(plan_path=plan_path),
    }


def s3_store_resources(
    plan: Plan, platform: Mapping[str, S3Resource] | None = None
) -> list[S3StoreResource]:
    """One resource per S3 store of ``plan``: the store's session fields, with those the plan
    leaves unset from ``platform``'s resource for the store. ``PlanError`` (one line) for a
    contradiction, or a platform resource for a store that is not an S3 store of the plan."""
    platform = dict(platform or {})
    s3_stores = {
        store.name: store
        for store in plan.stores
        if isinstance(store, S3StoreConfig) and not _credentials_in_vault(store)
    }
    in_vault = sorted(
        name
        for name in platform
        if any(s.name == name and isinstance(s, S3StoreConfig) for s in plan.stores)
        and name not in s3_stores
    )
    if in_vault:
        raise PlanError(
            f"{S3_RESOURCES_ENV}: store {in_vault[0]!r} takes its credentials from Vault "
            "(vault: references in the plan) and has no S3Resource"
        )
    unknown = sorted(set(platform) - set(s3_stores))
    if unknown:
        raise PlanError(
            f"{S3_RESOURCES_ENV}: {unknown[0]!r} is not an S3 store of the plan "
            f"(S3 stores: {', '.join(s3_stores) or 'none'})"
        )
    return [_merged(config, platform.get(name)) for name, config in s3_stores.items()]


def _merged(config: S3StoreConfig, given: S3Resource | None) -> S3StoreResource:
    fields: dict[str, Any] = {"store": config.name}
    given_fields = _set_fields(given) if given is not None else {}
    for name in SESSION_FIELDS:
        ours = getattr(config, name) if name in config.model_fields_set else None
        theirs = given_fields.get(name)
        if ours is not None and theirs is not None and ours != theirs:
            raise PlanError(
                f"store {config.name!r}: {name} is {ours!r} in the plan but {theirs!r} in its "
                f"S3Resource ({S3_RESOURCES_ENV}); set it in one place"
            )
        value = ours if ours is not None else theirs
        if value is None and name == "max_attempts":
            value = config.max_attempts
        if value is not None:
            fields[name] = value
    for name, plan_field in CREDENTIAL_FIELDS.items():
        ref = getattr(config, plan_field)
        env_name = ref.location if ref is not None else None
        theirs = given_fields.get(name)
        if (
            env_name
            and theirs is not None
            and not (isinstance(theirs, EnvVar) and theirs.env_var_name == env_name)
        ):
            # Never the value: a literal credential is only said to be there.
            shown = (
                f"EnvVar({theirs.env_var_name!r})" if isinstance(theirs, EnvVar) else "a literal"
            )
            raise PlanError(
                f"store {config.name!r}: {name} comes from {plan_field} env:{env_name} in the plan "
                f"but from {shown} in its S3Resource ({S3_RESOURCES_ENV}); set it in one place"
            )
        if env_name:
            fields[name] = EnvVar(env_name)
        elif theirs is not None:
            fields[name] = theirs
    for name in ("use_ssl", "verify", "use_unsigned_session"):
        if name in given_fields:
            fields[name] = given_fields[name]
    return S3StoreResource(**fields)


def _credentials_in_vault(config: S3StoreConfig) -> bool:
    return any(
        (ref := getattr(config, field)) is not None and ref.scheme != "env"
        for field in CREDENTIAL_FIELDS.values()
    )


def _set_fields(resource: S3Resource) -> dict[str, Any]:
    """The fields set on ``resource`` (``EnvVar`` kept as such, not resolved)."""
    return {
        name: value
        for name in resource.model_fields_set
        if (value := getattr(resource, name)) is not None
    }


def platform_s3_resources() -> dict[str, S3Resource]:
    """The platform's S3Resource per store name, from ``$SPARK_BACKUP_S3_RESOURCES``; none if
    it is unset."""
    reference = os.environ.get(S3_RESOURCES_ENV)
    if not reference:
        return {}
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise PlanError(f"{S3_RESOURCES_ENV}: expected module:attribute, got {reference!r}")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise PlanError(f"{S3_RESOURCES_ENV}: cannot load {reference!r}: {exc}") from None
    if not isinstance(found, Mapping) or not all(
        isinstance(name, str) and isinstance(resource, S3Resource)
        for name, resource in found.items()
    ):
        raise PlanError(
            f"{S3_RESOURCES_ENV}: {reference!r} is not a mapping of store name to "
            "dagster_aws.s3.S3Resource"
        )
    return dict(found)
