"""What a source produces: one or more artifacts, each a series of copies with its own cadence
(a PostgreSQL source makes logical dumps and physical base backups). Each artifact is one
Dagster asset; the primary one is ``backups/<source>``."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass


@dataclass(frozen=True)
class Artifact:
    name: str
    cadence: str
    max_age: dt.timedelta
    primary: bool
    description: str = ""
