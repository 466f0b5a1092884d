"""What every source has, whatever its kind. A kind's plan model (in its own package under
``spark_backup/sources/``) subclasses ``SourceSettings`` with its own fields and a
``kind: Literal["<kind name>"]`` field that tells the kinds apart."""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated

from pydantic import AfterValidator, Field, field_validator

from spark_backup.engine.cadence import CADENCES
from spark_backup.engine.settings import Duration, Name, SettingsModel

OWNER_PATTERN = re.compile(r"^(team:[A-Za-z0-9_.-]+|[^@\s]+@[^@\s]+\.[^@\s]+)$")


def _known_cadence(value: str) -> str:
    if value not in CADENCES:
        raise ValueError(f"expected one of: {', '.join(CADENCES)}, got {value!r}")
    return value


CadenceName = Annotated[str, AfterValidator(_known_cadence)]


class Retention(SettingsModel):
    """Grandfather-father-son retention: how many daily, weekly and monthly copies to keep."""

    daily: int = Field(7, ge=0)
    weekly: int = Field(4, ge=0)
    monthly: int = Field(12, ge=0)

    @field_validator("daily")
    @classmethod
    def _keeps_daily_copies(cls, value: int) -> int:
        if value < 1:
            raise ValueError(
                "expected at least 1: a policy of zero daily copies would expire yesterday's "
                "copy as soon as today's exists"
            )
        return value


class Compression(SettingsModel):
    level: int = Field(3, ge=1, le=19)
    threads: int = Field(2, ge=0, le=64)


class SourceSettings(SettingsModel):
    kind: str
    name: Name
    description: str = ""
    cadence: CadenceName
    owner: str
    rpo: Duration = dt.timedelta(days=1)
    rto: Duration = dt.timedelta(hours=2)
    # Restored by the monthly disaster drill (``spark-backup disaster-drill``): the newest copy
    # of every critical source, against the plan's ``disaster_drill.rto``.
    critical: bool = False
    # Restore drills of new copies (the drill_new_copies sensor): every new partition's copies
    # (1), one in N, or none (0; the monthly drills still run).
    drill_every: int = Field(1, ge=0)
    # Freshness: the newest committed copy must be at most this old. The plan's rule is "warn after
    # 24 hours without a backup"; weekly and monthly sources override it.
    max_age: Duration | None = None
    store: Name | None = None
    retention: Retention | None = None
    compression: Compression | None = None
    # Holds personal data: each month's copies get a data key of their own, which
    # ``spark-backup erase`` destroys to serve an erasure request (crypto-shredding).
    personal_data: bool = False
    # A compliance copy: its store must be WORM (S3 Object Lock in COMPLIANCE mode) with locks
    # at least as long as its retention keeps a copy.
    compliance_copy: bool = False
    # Replication targets (the plan's ``replication`` entries) every copy is pushed to.
    replicate_to: list[Name] = Field(default=[])

    @field_validator("owner")
    @classmethod
    def _owner_format(cls, value: str) -> str:
        if not OWNER_PATTERN.match(value):
            raise ValueError(f"expected an email address or 'team:NAME', got {value!r}")
        return value
