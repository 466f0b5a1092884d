"""A plan, opened: its stores, keys, sources and their kinds, and the copies in its stores.
This is the ``Runtime`` each kind's own operations get (``sources/base.py``)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrage import x25519

from spark_backup.engine.cadence import partition_key_for, utcnow
from spark_backup.engine.crypto import (
    Recipients,
    identities_from_text,
    identity_from_environment,
    load_identities,
    read_recipients_file,
)
from spark_backup.engine.manifest import COPY_ID_RE
from spark_backup.engine.secrets import SecretRef, SecretResolver, find_references, open_secrets
from spark_backup.engine.signing import Signer, Verifier
from spark_backup.engine.stores import ObjectStore, open_store
from spark_backup.errors import NotFoundError, PlanError, StoreError, UsageError
from spark_backup.plan import LoadedPlan, SourceSettings, load_plan
from spark_backup.sources import registry
from spark_backup.sources.base import Artifact, CopyRef, SourceContext, SourceKind

# The catalog and retention load where copies are listed or expired: ``wal-push``, run for
# every WAL segment, opens the plan and does neither.
if TYPE_CHECKING:
    from spark_backup.engine.catalog import Catalog, DamagedManifest
    from spark_backup.engine.pipeline import CompressionSettings
    from spark_backup.engine.retention import RetentionRule
    from spark_backup.sources.capability_values import StoreAccess

log = logging.getLogger(__name__)


class PlanRuntime:
    def __init__(
        self, loaded: LoadedPlan, s3_clients: Mapping[str, Callable[[], Any]] | None = None
    ):
        """``s3_clients``: per S3 store name, what makes its client (the Dagster layer's
        resources); other S3 stores make their own from the plan."""
        self.loaded = loaded
        self.plan = loaded.plan
        self._stores: dict[str, ObjectStore] = {}
        self._secrets: SecretResolver | None = None
        self._signer: Signer | None = None
        self.verifier = Verifier.from_config(self.plan.signing)
        self._catalogs: dict[str, Catalog] = {}
        self._s3_clients = dict(s3_clients or {})

    @classmethod
    def from_path(cls, path: str | Path | None = None):
        return cls(load_plan(path))

    @property
    def plan_path(self) -> Path:
        return self.loaded.path

    # --- sources and their kinds ------------------------------------------------------------------

    def source(self, name: str) -> SourceSettings:
        return self.plan.source(name)

    def kind_of(self, source: SourceSettings) -> SourceKind:
        return registry.kind(source.kind)

    def kind_named(self, name: str) -> SourceKind:
        return registry.kind(name)

    def sources_of(self, kind: SourceKind) -> list[SourceSettings]:
        return [s for s in self.plan.sources if s.kind == kind.name]

    def context(self, source: SourceSettings) -> SourceContext:
        return SourceContext(
            self.loaded.path,
            self.plan.max_age_for(source),
            self.secrets,
            copies=lambda artifact: [ref.manifest for ref in self.copies(source.name, artifact)],
            store_access=lambda: self._store_access(source),
        )

    def _store_access(self, source: SourceSettings) -> StoreAccess:
        from spark_backup.sources.capability_values import StoreAccess

        return StoreAccess(self.store_for(source), self.recipients(), self.compression(source))

    def artifacts(self, source: SourceSettings) -> list[Artifact]:
        return self.kind_of(source).artifacts(source, self.context(source))

    def artifact(self, source: SourceSettings, name: str | None = None) -> Artifact:
        """One of the source's artifacts by name; its primary one if ``name`` is None."""
        found = self.artifacts(source)
        for artifact in found:
            if artifact.name == name or (name is None and artifact.primary):
                return artifact
        raise UsageError(
            f"source {source.name!r} has no artifact {name!r} "
            f"(it has: {', '.join(a.name for a in found)})"
        )

    def current_partition(self, artifact: Artifact, now: dt.datetime | None = None) -> str:
        return partition_key_for(artifact.cadence, now or utcnow())

    def retention(self, source: SourceSettings) -> RetentionRule:
        from spark_backup.engine.retention import RetentionRule

        retention = self.plan.retention_for(source)
        return RetentionRule(retention.daily, retention.weekly, retention.monthly)

    def compression(self, source: SourceSettings) -> CompressionSettings:
        from spark_backup.engine.pipeline import CompressionSettings

        compression = self.plan.compression_for(source)
        return CompressionSettings(compression.level, compression.threads)

    # --- secrets, stores and keys -------------------------------------------------------------

    @property
    def secrets(self) -> SecretResolver:
        """Reads what the plan's references name (Vault is asked only when first needed)."""
        if self._secrets is None:
            self._secrets = open_secrets(self.plan.secrets, self.loaded.resolve)
        return self._secrets

    def secret_references(
        self, source: SourceSettings | None = None
    ) -> list[tuple[str, SecretRef]]:
        """The references the plan holds, with their field paths; with ``source``, those a
        backup or restore of it needs (its own, its store's and the plan-wide ones)."""
        found = list(find_references(self.plan))
        if source is None:
            return found
        index = self.plan.sources.index(source)
        store = self.plan.stores.index(self.plan.store_for(source))
        mine = (f"sources[{index}].", f"stores[{store}].")
        return [
            (path, ref)
            for path, ref in found
            if path.startswith(mine) or not path.startswith(("sources[", "stores["))
        ]

    def signer(self) -> Signer | None:
        """The key backups sign manifests and WAL with (None if the plan has no signing key)."""
        signing = self.plan.signing
        if signing is None or signing.key is None:
            return None
        if self._signer is None:
            pem = self.secrets.resolve_for("signing.key", signing.key)
            signer = Signer.from_pem(pem, f"signing.key {signing.key}")
            if signer.public_key not in signing.public_keys:
                raise PlanError(
                    f"{self.loaded.path}: signing.key's public key {signer.public_key} is not "
                    "in signing.public_keys: copies it signs would be refused"
                )
            self._signer = signer
        return self._signer

    def store(self, name: str) -> ObjectStore:
        if name not in self._stores:
            config = next(s for s in self.plan.stores if s.name == name)
            client = self._s3_clients[name]() if name in self._s3_clients else None
            self._stores[name] = open_store(config, self.loaded.resolve, self.secrets, client)
        return self._stores[name]

    def store_for(self, source: SourceSettings) -> ObjectStore:
        return self.store(self.plan.store_for(source).name)

    def all_stores(self) -> list[ObjectStore]:
        return [self.store(s.name) for s in self.plan.stores]

    def catalog(self, store: ObjectStore) -> Catalog:
        """The store's catalog, one per store and run, so index segments are read once."""
        from spark_backup.engine.catalog import Catalog

        if store.name not in self._catalogs:
            self._catalogs[store.name] = Catalog(store, self.verifier)
        return self._catalogs[store.name]

    def recipients(self) -> Recipients:
        encryption = self.plan.encryption
        keys = list(encryption.recipients)
        for path in encryption.recipients_files:
            keys.extend(read_recipients_file(self.loaded.resolve(path)))
        return Recipients.from_keys(keys, f"{self.loaded.path}: encryption")

    def identities(self, identity_file: str | Path | None = None) -> list[x25519.Identity]:
        encryption = self.plan.encryption
        if encryption.identity and not identity_file and not identity_from_environment():
            text = self.secrets.resolve_for("encryption.identity", encryption.identity)
            return identities_from_text(text, f"encryption.identity {encryption.identity}")
        plan_file = encryption.identity_file
        return load_identities(identity_file, self.loaded.resolve(plan_file) if plan_file else None)

    # --- copies --------------------------------------------------------------------------------

    def listing(
        self, source_name: str, artifact: str | None = None
    ) -> tuple[list[CopyRef], list[DamagedManifest]]:
        """The committed copies of one source (of one artifact, if named), oldest first, and
        the manifests of its that cannot be read."""
        source = self.plan.source(source_name)
        store = self.store_for(source)
        kind = self.kind_of(source)
        catalog = self.catalog(store)
        found = catalog.listing(source.name)
        refs = [
            CopyRef(store, m, catalog.verdicts[m.id])
            for m in found.copies
            if artifact is None or kind.artifact_of(m) == artifact
        ]
        return refs, found.damaged

    def copies(self, source_name: str | None = None, artifact: str | None = None) -> list[CopyRef]:
        """The readable copies of one source (of one of its artifacts), or of every source."""
        if source_name is None:
            return self.all_listings()[0]
        return self.listing(source_name, artifact)[0]

    def all_listings(self) -> tuple[list[CopyRef], list[DamagedManifest]]:
        """Every copy in the plan's stores, of sources in the plan or no longer in it."""
        refs: list[CopyRef] = []
        damaged: list[DamagedManifest] = []
        for store in self.all_stores():
            catalog = self.catalog(store)
            for source in catalog.sources():
                found = catalog.listing(source)
                refs += [CopyRef(store, m, catalog.verdicts[m.id]) for m in found.copies]
                damaged += found.damaged
        refs.sort(key=lambda r: (r.manifest.started_at, r.manifest.id))
        return refs, damaged

    def update_index(self, store: ObjectStore, source_name: str) -> None:
        """Write the source's index after its copies changed (a backup, a prune)."""
        try:
            self.catalog(store).update_index(source_name)
        except StoreError as exc:
            # The change itself is done; until the next update, listing reads the manifests
            # the index lacks.
            log.warning("index of %s not updated: %s", source_name, exc)

    def find(self, copy_id: str) -> CopyRef:
        from spark_backup.engine.catalog import find_copy

        return CopyRef(*find_copy(self.all_stores(), copy_id, self.verifier))

    def select(self, selector: str | None) -> tuple[list[CopyRef], list[DamagedManifest]]:
        """Copies named by a source name, a copy id, or (None) every copy; and the damaged
        manifests among those asked for."""
        if selector is None:
            return self.all_listings()
        if any(s.name == selector for s in self.plan.sources):
            return self.listing(selector)
        if not COPY_ID_RE.match(selector):
            raise NotFoundError(
                f"{selector!r} is neither a source in the plan "
                f"({', '.join(s.name for s in self.plan.sources)}) nor a copy id"
            )
        return [self.find(selector)], []
