"""The values a kind's capabilities return or take (``base.py`` holds the contract itself and
exports these too): an observation, a log's status, checks and ranges, a recovery's target and
window, a restore target, a semantic check's result, a folder restore's options and a backup's
store access. Apart from the contract because a command that only reads the plan (``list``,
``wal-push``) makes none of them, and each dataclass costs about 0.3 ms to define."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spark_backup.engine.age_worker import AgeWorker
    from spark_backup.engine.crypto import Recipients
    from spark_backup.engine.pipeline import CompressionSettings
    from spark_backup.engine.stores.base import ObjectStore
    from spark_backup.engine.streams import ProgressCallback
    from spark_backup.sources.base import Runtime


@dataclass(frozen=True)
class StoreAccess:
    """What a backup run writes with: the source's store, the age recipients and compression."""

    store: ObjectStore
    recipients: Recipients
    compression: CompressionSettings


@dataclass(frozen=True)
class FolderRestore:
    """How a restore into a folder goes: over what is there or not, past unsafe members or not."""

    overwrite: bool = False
    skip_unsafe: bool = False
    progress: ProgressCallback | None = None
    # A decryption worker started ahead (``AgeWorker.start``, without identities), for the
    # copy's ``open_copy``; the caller closes it.
    worker: AgeWorker | None = None


@dataclass(frozen=True)
class Observation:
    """A fingerprint of a protected system's state: it changes when the system changed."""

    version: str
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class LogStatus:
    """How much a loss of the source now would lose at most: the age of the newest log item
    that is not safely in the store, against the RPO."""

    source: str
    rpo: dt.timedelta
    now: dt.datetime
    lag: dt.timedelta | None  # None: nothing archived yet
    newest: str | None = None  # the newest archived item
    details: dict[str, Any] = field(default_factory=dict)
    # Why the source itself could not be asked (the lag was then measured from the store).
    source_error: str | None = None
    # What breaks the log whatever its lag: a gap between saved items, a log that rolled over
    # past the last saved point.
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lag is not None and self.lag <= self.rpo and not self.problems


@dataclass(frozen=True)
class CheckOutcome:
    """What a kind's own check found: the Dagster layer turns it into a check result."""

    passed: bool
    description: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LogCheck:
    """A check a kind brings for its log beyond the lag check (PostgreSQL: the streaming
    receiver's lag), on the log's asset and run with the lag check. ``name`` is the kind's
    constant, used by both the check's spec and its result."""

    name: str
    description: str
    evaluate: Callable[[Runtime, dt.datetime], CheckOutcome]


@dataclass(frozen=True)
class LogRange:
    """The log a base copy needs: from position ``start`` (in file ``first``) to ``stop`` (in
    file ``last``); ``missing``: the first of those files the archive lacks."""

    start: str
    stop: str
    first: str
    last: str
    missing: str | None = None

    @property
    def complete(self) -> bool:
        return self.missing is None


@dataclass(frozen=True)
class RecoveryTarget:
    """The moment to recover to; ``time`` None means the end of the log (after a disaster).
    ``into`` names what to recover into where that is not a folder (a database name for
    MongoDB); kinds that recover into ``target_dir`` ignore it."""

    time: dt.datetime | None = None
    into: str | None = None


@dataclass(frozen=True)
class RecoveryWindow:
    """From when to when a source can be recovered to any moment."""

    earliest: dt.datetime | None
    latest: dt.datetime | None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RestoreTarget:
    """Somewhere a copy can be restored other than a folder, as the command line offers it."""

    name: str  # "database"
    option: str  # "--to-db"
    metavar: str
    help: str
    # Boolean switches that apply to this target: name -> help.
    flags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SemanticResult:
    """Whether a restored copy is usable, with the figures that show it."""

    passed: bool
    description: str
    metrics: dict[str, Any] = field(default_factory=dict)
