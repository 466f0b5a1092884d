"""The plan's schema: encryption, stores, defaults and sources. Each source's fields come from
its kind's own model (``SourceKind.settings``), chosen by its ``kind``; the model of a whole
plan is assembled from the registry when a plan is validated."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import Field, create_model, field_validator, model_validator

from spark_backup.engine.cadence import DEFAULT_PARTITIONS_START
from spark_backup.engine.replication.config import ReplicaConfig
from spark_backup.engine.secrets import SecretReference, SecretsConfig
from spark_backup.engine.settings import Duration, Name, SettingsModel
from spark_backup.engine.signing import SigningConfig
from spark_backup.engine.stores.config import StoreConfig
from spark_backup.errors import NotFoundError
from spark_backup.journal.settings import JournalSettings
from spark_backup.notify.settings import Notifications
from spark_backup.plan.source import Compression, Retention, SourceSettings

AGE_RECIPIENT_PATTERN = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")
MIN_ORPHAN_GRACE = dt.timedelta(hours=1)


class Encryption(SettingsModel):
    """age X25519 recipients. Identities (private keys) are only needed where a restore runs."""

    recipients: list[str] = Field(default=[])
    recipients_files: list[str] = Field(default=[])
    identity_file: str | None = None
    # The identity text held by a secrets backend (vault:kv/spark/age#identity), for restores.
    identity: SecretReference | None = None

    @field_validator("recipients")
    @classmethod
    def _valid_recipients(cls, value: list[str]) -> list[str]:
        for recipient in value:
            if not AGE_RECIPIENT_PATTERN.match(recipient.strip()):
                raise ValueError(
                    f"expected an age X25519 public key (age1... , 62 characters), got "
                    f"{recipient[:16]!r}..."
                )
        return [r.strip() for r in value]

    @field_validator("identity_file")
    @classmethod
    def _identity_is_a_path(cls, value: str | None) -> str | None:
        if value and value.strip().startswith("AGE-SECRET-KEY-"):
            raise ValueError("expected a path to an identity file; never put a private key here")
        return value

    @model_validator(mode="after")
    def _has_recipients(self) -> Encryption:
        if not self.recipients and not self.recipients_files:
            raise ValueError("expected at least one entry in recipients or recipients_files")
        if self.identity and self.identity_file:
            raise ValueError("set identity or identity_file, not both")
        return self


class Defaults(SettingsModel):
    store: Name | None = None
    retention: Retention = Retention.default_instance()
    compression: Compression = Compression.default_instance()
    max_age: Duration = dt.timedelta(hours=24)
    # Leftovers younger than this may belong to a backup still running; it must be longer than
    # the longest backup (an S3 object's time is when its upload started).
    orphan_grace: Duration = dt.timedelta(hours=24)
    # Prune rewrites a blob-layer pack once at least this share of its bytes is chunks no
    # listed version needs (restic repacks any pack with unused bytes until at most 5% of the
    # repository is unused; per pack, half, costs at most one pack's read and a half pack's
    # write per half pack freed). None: never repack.
    repack_unused: float | None = 0.5
    # The first partition the UI lists. Partition keys never depend on it: moving it changes
    # which periods show as missing, never where a copy belongs.
    partitions_start: dt.date = DEFAULT_PARTITIONS_START
    # A source whose last restore drill is older than this is reported by ``alerts`` (the
    # drills run monthly, so a month and a little).
    drill_max_age: Duration = dt.timedelta(days=32)

    @field_validator("repack_unused")
    @classmethod
    def _a_share(cls, value: float | None) -> float | None:
        # Below 1%, age's own overhead (16 bytes a 64 KiB chunk) could count as unused and
        # rewrite whole packs at every prune.
        if value is not None and not 0.01 <= value <= 1:
            raise ValueError("expected a share of a pack's bytes, from 0.01 to 1")
        return value

    @field_validator("orphan_grace")
    @classmethod
    def _grace_covers_running_backups(cls, value: dt.timedelta) -> dt.timedelta:
        if value < MIN_ORPHAN_GRACE:
            raise ValueError(
                "expected at least 1h: prune must not take the data of a backup still running"
            )
        return value


class Compliance(SettingsModel):
    # The deletion concept (a Markdown file with a "Last reviewed: YYYY-MM-DD" line), relative
    # to the plan file: its review is checked yearly for every personal_data source.
    deletion_concept: str | None = None
    review_every: Duration = dt.timedelta(days=365)


class ServiceRestart(SettingsModel):
    """The disaster drill's restart of a service after its database came back."""

    # The source whose newest copy the default restart (no ``command``) restores and checks
    # with its kind's semantic check (an LLM's tokenizer, adapter and tensor digests).
    service: Name | None = None
    # Run after the restore of this source (the database); else after every restore.
    after: Name | None = None
    # A command (argv, run from the plan's folder without a shell) that restarts the service;
    # exit status 0 is a pass. Its output is never recorded (it may print secrets).
    command: list[str] | None = Field(None, min_length=1)
    timeout: Duration = dt.timedelta(minutes=10)

    @model_validator(mode="after")
    def _restarts_something(self) -> ServiceRestart:
        if self.command is None and self.service is None:
            raise ValueError("set command, or service (whose copy the default restart checks)")
        return self


class DisasterDrill(SettingsModel):
    """The monthly disaster drill: every ``critical`` source restored, the service restarted,
    all within ``rto``."""

    rto: Duration = dt.timedelta(hours=2)
    restart: ServiceRestart | None = None


class Plan(SettingsModel):
    version: Literal[1] = 1
    defaults: Defaults = Defaults.default_instance()
    encryption: Encryption
    secrets: SecretsConfig = SecretsConfig.default_instance()
    signing: SigningConfig | None = None
    compliance: Compliance = Compliance.default_instance()
    stores: list[StoreConfig] = Field(min_length=1)
    # Second targets for versions (another store, an OCI registry); sources name theirs in
    # ``replicate_to``.
    replication: list[ReplicaConfig] = Field(default=[])
    notifications: Notifications = Notifications.default_instance()
    journal: JournalSettings = JournalSettings.default_instance()
    disaster_drill: DisasterDrill = DisasterDrill.default_instance()
    # Each entry is validated as its kind's model (see ``plan_model``).
    sources: list[SourceSettings] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Plan:
        from spark_backup.sources import registry

        store_names = [s.name for s in self.stores]
        _unique(store_names, "stores")
        _unique([s.name for s in self.sources], "sources")
        replica_names = [r.name for r in self.replication]
        _unique(replica_names, "replication")
        if self.defaults.store and self.defaults.store not in store_names:
            raise ValueError(
                f"defaults.store names unknown store {self.defaults.store!r} "
                f"(expected one of: {', '.join(store_names)})"
            )
        # A source's other assets are named after it (backups/<name>_<suffix>).
        derived = {
            f"{source.name}_{suffix}": source.name
            for source in self.sources
            for suffix in registry.kind(source.kind).asset_suffixes(source)
        }
        for index, source in enumerate(self.sources):
            if source.name in derived:
                raise ValueError(
                    f"sources[{index}].name {source.name!r} is the name of an asset of source "
                    f"{derived[source.name]!r}; rename one of them"
                )
            if source.store and source.store not in store_names:
                raise ValueError(
                    f"sources[{index}].store names unknown store {source.store!r} "
                    f"(expected one of: {', '.join(store_names)})"
                )
            if source.compliance_copy:
                self._check_compliance_store(index, source)
            for target in source.replicate_to:
                if target not in replica_names:
                    raise ValueError(
                        f"sources[{index}].replicate_to names unknown replication target "
                        f"{target!r} (expected one of: {', '.join(replica_names) or 'none'})"
                    )
        restart = self.disaster_drill.restart
        source_names = [s.name for s in self.sources]
        for field_name in ("service", "after"):
            named = getattr(restart, field_name, None)
            if named is not None and named not in source_names:
                raise ValueError(
                    f"disaster_drill.restart.{field_name} names unknown source {named!r} "
                    f"(expected one of: {', '.join(source_names)})"
                )
        return self

    def _check_compliance_store(self, index: int, source: SourceSettings) -> None:
        """A compliance copy goes to a COMPLIANCE-locked store whose lock outlasts retention."""
        store = self.store_for(source)
        lock = getattr(store, "object_lock", None)
        if lock is None or lock.mode != "COMPLIANCE":
            raise ValueError(
                f"sources[{index}] is a compliance_copy but its store {store.name!r} has no "
                "object_lock in COMPLIANCE mode"
            )
        retention = self.retention_for(source)
        # The longest a tier keeps a copy: its count of periods, a month counted as 31 days.
        longest = max(retention.daily, retention.weekly * 7, retention.monthly * 31)
        if lock.retain_days < longest:
            raise ValueError(
                f"sources[{index}] is a compliance_copy kept up to {longest} days by its "
                f"retention, but store {store.name!r} locks copies for only "
                f"{lock.retain_days} days (object_lock.retain_days)"
            )

    # Resolved views: a source's effective settings after defaults.

    def source(self, name: str) -> SourceSettings:
        for source in self.sources:
            if source.name == name:
                return source
        raise NotFoundError(
            f"source {name!r} is not in the plan (sources: "
            f"{', '.join(s.name for s in self.sources)})"
        )

    def store_for(self, source: SourceSettings) -> StoreConfig:
        wanted = source.store or self.defaults.store or self.stores[0].name
        return next(s for s in self.stores if s.name == wanted)

    def retention_for(self, source: SourceSettings) -> Retention:
        return source.retention or self.defaults.retention

    def compression_for(self, source: SourceSettings) -> Compression:
        return source.compression or self.defaults.compression

    def max_age_for(self, source: SourceSettings) -> dt.timedelta:
        return source.max_age or self.defaults.max_age


def _unique(names: list[str], field: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{field}: name {name!r} is used twice")
        seen.add(name)


_models: dict[tuple[int, tuple[str, ...]], type[Plan]] = {}


def plan_model(kinds: Collection[str] | None = None) -> type[Plan]:
    """``Plan`` with ``sources`` as the union of every registered kind's model, told apart by
    ``kind`` (rebuilt when the registry changes). With ``kinds`` (registered names), the union
    of only those: what a plan naming no other kind validates with, loading no other kind."""
    from spark_backup.sources import registry

    names = tuple(registry.names() if kinds is None else sorted(kinds))
    key = (registry.version(), names)
    if key not in _models:
        models = tuple(registry.kind(name).settings for name in names)
        entry = (
            Annotated[Union[models], Field(discriminator="kind")]  # noqa: UP007
            if len(models) > 1
            else models[0]
        )
        if any(version != key[0] for version, _ in _models):
            _models.clear()
        _models[key] = create_model(
            "Plan",
            __base__=Plan,
            sources=(list[entry], Field(min_length=1)),  # type: ignore[valid-type]
        )
    return _models[key]


def kinds_named(data: Mapping[str, Any]) -> set[str] | None:
    """The kinds a plan's ``sources`` name, if each entry names a registered one (else None:
    only the model of every kind describes what is wrong)."""
    from spark_backup.sources import registry

    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        return None
    named = {entry.get("kind") if isinstance(entry, Mapping) else None for entry in sources}
    return named if all(isinstance(name, str) and registry.known(name) for name in named) else None
