"""The contract every artifact kind fulfils, and the optional capabilities a kind may add.

A kind is one package under ``spark_backup/sources/`` whose ``KIND`` object subclasses
``SourceKind`` (generic over its plan model) and registers through the ``spark_backup.kinds``
entry point (see ``registry.py``). Everything else in spark-backup (the plan, the service, the
command line, the Dagster layer, the demo) asks the registry and these types, and never
branches on a kind's name: a new kind lands in its own package and nowhere else.

The contract:

- ``settings``: the kind's plan model (a ``SourceSettings`` subclass);
- ``artifacts``: what a source of the kind produces, each a series of copies with its own
  cadence and its own Dagster asset;
- ``readers``: the plaintext streams one backup run of an artifact writes, one copy each;
- ``expected_parts``: which of those a complete run leaves (freshness judges the stalest);
- ``probe``: reach the source without backing it up;
- ``restore_to_folder``: a staged restore into a folder;
- ``check_plaintext``: a deep verify of a copy's decrypted stream.

Optional capabilities, each a small abstract class a kind mixes in:

- ``Observable``: a cheap fingerprint of the protected system, so the UI shows when it changed
  since its last copy;
- ``ContinuousLog``: a log written between base copies, with its lag against the RPO and an
  expiry bound to the base copies kept; either pushed by the system itself (``PushedLog``:
  PostgreSQL's WAL through ``archive_command``) or read from it by the kind, a partitioned
  artifact of sub-daily slices (``log_artifact``: MongoDB's oplog);
- ``PointInTimeRecovery``: recover to a moment from a base copy and the log;
- ``RestoreTargets``: restore into something other than a folder (a database, a namespace);
- ``SemanticCheck``: prove a copy usable, not only intact (row counts, probe queries, tensor
  digests);
- ``SharedObjects``: objects several copies of a source share (the blob layer's chunks), which
  verify checks with each copy and prune sweeps once no committed copy needs them (and
  repacks, where most of an object is no longer needed);
- ``Replicable``: the files a version is replicated as, where they are not only the copy's own
  objects (a content-addressed version: its chunks and reference list too); by default a copy
  replicates as its data object and manifest;
- ``Catalogued``: a catalogue entry per copy, from its manifest (a vector index's dimension,
  vector count, metric, embedding model), which ``list --kind K --json`` prints and the backup
  asset shows as metadata.

Kinds may contribute command-line commands (``cli_commands``); they reach the plan's stores and
keys through ``Runtime``, which the service implements, never by importing the service.
"""

from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from spark_backup.lazy import lazy_exports

# Part of the contract, defined apart: the command line needs them before any kind.
from spark_backup.sources.holder import RuntimeHolder as RuntimeHolder
from spark_backup.sources.holder import current_runtime as current_runtime

# Only types from here: a kind's operations import this module, and must not pay for the
# pipeline, pydantic or pyrage until they run.
if TYPE_CHECKING:
    import click
    from pyrage import x25519

    from spark_backup.engine.blobs.repack import RepackReport
    from spark_backup.engine.crypto import Recipients
    from spark_backup.engine.manifest import Manifest
    from spark_backup.engine.pipeline import CompressionSettings, PlaintextSource
    from spark_backup.engine.replication import ReplicaVersion
    from spark_backup.engine.secrets import SecretResolver
    from spark_backup.engine.signing import Signer, Verifier
    from spark_backup.engine.stores.base import ObjectStore
    from spark_backup.engine.streams import ProgressCallback, Readable
    from spark_backup.plan.source import SourceSettings
    from spark_backup.sources.capability_values import (
        FolderRestore,
        LogCheck,
        LogRange,
        LogStatus,
        Observation,
        RecoveryTarget,
        RecoveryWindow,
        RestoreTarget,
        SemanticResult,
        StoreAccess,
    )

# The values the capabilities return or take are made when those run, not when a kind
# loads: their 11 dataclasses (about 3 ms) live in ``capability_values.py``, exported
# here on first use, so that a command reading the plan builds none of them.
__getattr__ = lazy_exports(
    __name__,
    {
        name: "spark_backup.sources.capability_values"
        for name in (
            "StoreAccess",
            "FolderRestore",
            "Observation",
            "LogStatus",
            "CheckOutcome",
            "LogCheck",
            "LogRange",
            "RecoveryTarget",
            "RecoveryWindow",
            "RestoreTarget",
            "SemanticResult",
        )
    },
    globals(),
)

SettingsT = TypeVar("SettingsT", bound="SourceSettings")


@dataclass(frozen=True)
class Artifact:
    """One series of copies a source produces, with its own cadence and asset. The primary
    artifact is ``backups/<source>``; another is ``backups/<source>_<name>``."""

    name: str
    cadence: str
    max_age: dt.timedelta
    primary: bool
    description: str = ""
    # Copies of a continuous log the kind reads in partitions (MongoDB's oplog slices): no
    # daily/weekly/monthly rule keeps them; they stay while a kept base copy needs them
    # (``ContinuousLog.expire`` decides).
    expires_with_base: bool = False

    @property
    def asset_suffix(self) -> str | None:
        return None if self.primary else self.name


def _environment_secrets() -> SecretResolver:
    from spark_backup.engine.secrets import EnvSecrets, SecretResolver

    return SecretResolver({"env": EnvSecrets()})


@dataclass(frozen=True)
class SourceContext:
    """What a kind may know of the plan around one of its sources."""

    plan_path: Path
    # The source's allowed copy age: its own max_age, else the plan's default.
    max_age: dt.timedelta
    # Reads the secrets the source's settings name (environment variables only, by default).
    secrets: SecretResolver = field(default_factory=lambda: _environment_secrets())
    # The source's committed copies of one artifact, oldest first: a log read in slices
    # resumes where its newest slice ended.
    copies: Callable[[str], Sequence[Manifest]] | None = None
    # The source's store and the keys a backup writes with, for kinds whose readers write
    # objects of their own beside the copy (chunks of the blob layer); None outside a backup.
    store_access: Callable[[], StoreAccess] | None = None

    def resolve(self, path: str) -> Path:
        """A path from the plan, relative to the plan file, with ``~`` and ``$VARS`` expanded."""
        from spark_backup.plan.load import resolve_relative

        return resolve_relative(self.plan_path.parent, path)


@dataclass(frozen=True)
class CopyRef:
    """A committed copy and the store that holds it."""

    store: ObjectStore
    manifest: Manifest
    # The manifest's signature as checked when it was listed or found: "signed", "unsigned"
    # (an earlier release's copy the plan accepts) or "not checked" (no signing in the plan).
    signature: str = "not checked"


class Runtime(Protocol):
    """What a kind's own operations may use of the plan and its stores (the service)."""

    @property
    def plan_path(self) -> Path: ...

    def source(self, name: str) -> SourceSettings: ...

    def sources_of(self, kind: SourceKind) -> list[SourceSettings]: ...

    def context(self, source: SourceSettings) -> SourceContext: ...

    def store_for(self, source: SourceSettings) -> ObjectStore: ...

    def recipients(self) -> Recipients: ...

    def identities(self, identity_file: str | Path | None = None) -> list[x25519.Identity]: ...

    def compression(self, source: SourceSettings) -> CompressionSettings: ...

    # Signs what a backup writes (None without a signing key); checks what a restore reads.
    def signer(self) -> Signer | None: ...

    verifier: Verifier

    def copies(
        self, source_name: str | None = None, artifact: str | None = None
    ) -> list[CopyRef]: ...

    def find(self, copy_id: str) -> CopyRef: ...


class SourceKind(ABC, Generic[SettingsT]):
    """An artifact kind. Subclasses set the class attributes and implement every abstract
    method; instantiating one that misses any fails at once."""

    name: ClassVar[str]
    settings: ClassVar[type[SourceSettings]]
    # Tool names for the UI's kind tags beside "age" and the store's kind (e.g. "tar").
    labels: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def artifacts(self, source: SettingsT, context: SourceContext) -> list[Artifact]:
        """What the source produces; exactly one is primary."""

    @abstractmethod
    def artifact_of(self, manifest: Manifest) -> str:
        """Which artifact a copy belongs to."""

    def expected_parts(self, artifact: str, copies: Sequence[Manifest]) -> set[str]:
        """The parts a complete run of ``artifact`` leaves (one stream per run: one part)."""
        return {""}

    @abstractmethod
    def readers(
        self, source: SettingsT, context: SourceContext, artifact: str
    ) -> list[PlaintextSource]:
        """One plaintext stream per copy a backup run of ``artifact`` makes."""

    @abstractmethod
    def probe(self, source: SettingsT, context: SourceContext) -> None:
        """Reach the source as a backup would, without backing it up; raise on any problem."""

    @abstractmethod
    def restore_to_folder(
        self,
        copy: CopyRef,
        identities: list[x25519.Identity],
        target: Path,
        options: FolderRestore,
    ) -> dict[str, Any]:
        """Restore into ``target`` through a staging folder, published only after the copy's
        digests matched; return a summary (``target``, ``files``, ``bytes``, ...)."""

    @abstractmethod
    def check_plaintext(self, plain: Readable, manifest: Manifest) -> None:
        """Deep verify: raise ``IntegrityError`` if the plaintext is not what the kind wrote."""

    def cautions(self, manifest: Manifest) -> list[str]:
        """What a restore or verify of the copy must tell the operator although the copy is
        intact (files the backup read while they changed)."""
        return []

    def asset_suffixes(self, source: SettingsT) -> tuple[str, ...]:
        """Names of the source's assets beside ``backups/<source>``, as ``<source>_<suffix>``
        (a plan may not name another source like one of them)."""
        return ()

    def cli_commands(self) -> Sequence[click.Command]:
        """Commands of the kind's own (``spark-backup wal-push``, ...)."""
        return ()


# --- optional capabilities ----------------------------------------------------------------------


class Observable(ABC):
    @abstractmethod
    def observe(self, source: Any, context: SourceContext) -> Observation:
        """Cheap: names, sizes and times, a log position; never the data itself."""


class ContinuousLog(ABC):
    """A log the source writes between its base copies, archived as it is written."""

    log_name: ClassVar[str]
    # The log's asset is backups/<source>_<log_asset_suffix>; its lag check is named so.
    log_asset_suffix: ClassVar[str]
    lag_check_name: ClassVar[str]
    # The RPO is minutes: the lag is looked at well within it.
    lag_check_cron: ClassVar[str] = "*/5 * * * *"
    # The artifact whose copies the log replays onto; expiry keeps what its oldest kept copy needs.
    base_artifact: ClassVar[str]
    # The artifact whose backup runs read the log from the source, one copy per sub-daily
    # partition (its asset is the log's asset); None: the system pushes the log itself
    # (``PushedLog``), and the log is an external asset.
    log_artifact: ClassVar[str | None] = None

    @abstractmethod
    def log_enabled(self, source: Any) -> bool: ...

    @abstractmethod
    def lag(self, runtime: Runtime, source: Any, now: dt.datetime) -> LogStatus: ...

    @abstractmethod
    def expire(
        self,
        runtime: Runtime,
        source: Any,
        kept_bases: Sequence[Manifest],
        now: dt.datetime,
        dry_run: bool,
    ) -> list[str]:
        """Delete (or with ``dry_run`` list) the log no kept base copy needs; never anything
        under a lock. Returns the keys."""

    @abstractmethod
    def owns_key(self, key: str) -> bool:
        """Whether ``key`` is one of the log's objects (prune cleans up their leftovers)."""

    def log_checks(self, source: Any) -> Sequence[LogCheck]:
        """Checks of the source's log beyond the lag check; none by default."""
        return ()

    def log_ranges(
        self, runtime: Runtime, source: Any, bases: Sequence[Manifest]
    ) -> dict[str, LogRange]:
        """Per base copy id (of ``bases``): the log it needs to become consistent, and whether
        the archive holds all of it. None known by default."""
        return {}


class PushedLog(ContinuousLog):
    """A log the system hands over file by file (PostgreSQL's ``archive_command``)."""

    @abstractmethod
    def push(self, runtime: Runtime, source: Any, path: Path) -> str:
        """Archive one log file; return what happened ("archived", "already archived")."""

    @abstractmethod
    def fetch(
        self,
        runtime: Runtime,
        source: Any,
        name: str,
        destination: Path,
        identity_file: str | Path | None = None,
    ) -> None:
        """Restore one archived log file to ``destination``."""


class PointInTimeRecovery(ABC):
    @abstractmethod
    def recover(
        self,
        runtime: Runtime,
        source: Any,
        target: RecoveryTarget,
        target_dir: Path,
        *,
        identity_file: str | Path | None = None,
        stop_after: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Any:
        """Recover into something new under ``target_dir`` and verify it; production is never
        touched. Returns the kind's report."""

    @abstractmethod
    def recovery_window(self, runtime: Runtime, source: Any) -> RecoveryWindow: ...


class RestoreTargets(ABC):
    @abstractmethod
    def restore_targets(self) -> Sequence[RestoreTarget]: ...

    @abstractmethod
    def restore_to_target(
        self,
        runtime: Runtime,
        target: str,
        copy: CopyRef,
        value: str,
        *,
        identity_file: str | Path | None = None,
        flags: Mapping[str, bool] | None = None,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]: ...


class SemanticCheck(ABC):
    """Proof that a copy is usable: restore it into scratch space, look at it as its users
    would, and clean up."""

    semantic_check_name: ClassVar[str]

    @abstractmethod
    def semantic_check(
        self,
        runtime: Runtime,
        copy: CopyRef,
        identities: list[x25519.Identity],
        scratch: Path,
    ) -> SemanticResult:
        """``scratch`` is an empty folder the check may use and must leave empty."""


class SharedObjects(ABC):
    """Objects several copies of a source share, kept while a committed copy needs them."""

    @abstractmethod
    def check_shared(
        self, runtime: Runtime, copy: CopyRef, identities: list[x25519.Identity] | None
    ) -> list[str]:
        """Verify what ``copy`` needs beside its data object: present (plain verify) or, with
        ``identities``, decrypted and checked; raise ``IntegrityError`` naming every copy a
        missing object breaks. Returns the names of the checks made."""

    @abstractmethod
    def collect(
        self,
        runtime: Runtime,
        source: Any,
        now: dt.datetime,
        grace: dt.timedelta,
        dry_run: bool,
    ) -> list[str]:
        """Delete (or list) shared objects no committed copy of ``source`` needs, never one a
        copy still listed (kept, or locked) needs; an interrupted run loses nothing and the next
        one finishes. Returns the keys."""

    @abstractmethod
    def owns_shared_key(self, key: str) -> bool:
        """Whether ``key`` is one of the kind's shared objects (prune cleans up their partial
        writes)."""

    def repack(
        self,
        runtime: Runtime,
        source: Any,
        identities: list[x25519.Identity],
        unused: float,
        now: dt.datetime,
        dry_run: bool,
        expiring: frozenset[str] = frozenset(),
    ) -> RepackReport | None:
        """Copy what listed copies need out of shared objects at least ``unused`` of whose
        bytes no listed copy needs, so that ``collect`` can delete them; never deletes.
        ``expiring``: copies this prune deletes (still listed in a dry run). None: the kind
        does not repack."""
        return None


class Replicable(ABC):
    """A kind whose versions replicate as other files than the copy's own objects."""

    @abstractmethod
    def replica_version(self, copy: CopyRef) -> ReplicaVersion:
        """The version's files, each with its sha256 and a way to stream it."""


class Catalogued(ABC):
    """A kind whose copies each carry a catalogue entry in their manifest."""

    @abstractmethod
    def catalogue(self, manifest: Manifest) -> dict[str, Any] | None:
        """The copy's entry (JSON values), or None for a copy without one."""


# --- the command line ---------------------------------------------------------------------------


def source_of_kind(runtime: Runtime, kind: SourceKind, name: str | None = None) -> SourceSettings:
    """The named source, which must be of ``kind``; or the plan's only source of ``kind`` when
    no name is given (a kind's commands take the source as an optional argument)."""
    from spark_backup.errors import UsageError

    if name is not None:
        source = runtime.source(name)
        if source.kind != kind.name:
            raise UsageError(f"source {name!r} is a {source.kind} source, not {kind.name}")
        return source
    found = runtime.sources_of(kind)
    if len(found) != 1:
        names = ", ".join(s.name for s in found) or "none"
        raise UsageError(f"name the {kind.name} source (the plan has: {names})")
    return found[0]


def restore_tar_copy(
    copy: CopyRef, identities: list[x25519.Identity], target: Path, options: FolderRestore
) -> dict[str, Any]:
    """``restore_to_folder`` of a kind whose plaintext is a tar archive of the files it backed
    up: extracted into staging, published only after the copy's digests matched (``open_copy``
    exits, checksums compared, before ``staged_restore`` publishes anything)."""
    # Imported here: this module is loaded for a kind's commands, before any pipeline is needed.
    import os
    from dataclasses import asdict

    from spark_backup.engine.pipeline import open_copy
    from spark_backup.engine.safe_tar import extract_tar
    from spark_backup.engine.staging import staged_restore

    stale: list[str] = []
    with (
        staged_restore(target, options.overwrite, stale) as staging,
        open_copy(copy.store, copy.manifest, identities, options.progress, options.worker) as plain,
    ):
        summary = extract_tar(plain, staging, options.skip_unsafe)
    return {
        "target": str(Path(os.path.abspath(target))),
        **asdict(summary),
        "stale_staging_removed": stale,
    }
