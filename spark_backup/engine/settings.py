"""Field types shared by every settings model: the plan's, each store's and each kind's.

Settings are frozen pydantic models that refuse unknown fields, so a misspelled key is an error
rather than a silently ignored default. Durations are written as people write them (``15m``,
``2h``, ``7d``); names are restricted to what both Dagster asset keys and object keys accept.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Any, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

# Source and store names become Dagster asset keys and object-key prefixes.
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION_SECONDS = 100 * 365 * 86400


def parse_duration(value: Any) -> dt.timedelta:
    """Read ``15m``, ``2h``, ``7d``, ``1w`` (or a number of seconds) as a positive timedelta."""
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError("expected a duration such as 15m, 2h, 7d")
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"expected a duration such as 15m, 2h, 7d, got {value!r}")
        amount, unit = match.groups()
        seconds = float(amount) * _DURATION_UNITS[unit]
    if not 0 < seconds <= MAX_DURATION_SECONDS:
        raise ValueError(f"expected a duration above 0 and at most 100 years, got {value!r}")
    return dt.timedelta(seconds=seconds)


def format_duration(value: dt.timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit in ("w", "d", "h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


Duration = Annotated[dt.timedelta, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
EnvName = Annotated[str, Field(pattern=ENV_NAME_PATTERN)]


class SettingsModel(BaseModel):
    """Frozen, and unknown fields are errors. A model's validator is built when it is first
    used (``defer_build``): a command that reads the plan builds the plan's, which covers every
    section, and no other.

    A list defaults to ``Field(default=[])`` (pydantic copies a mutable default for each
    model), not to ``Field(default_factory=list)``: pydantic reads a factory's signature, and a
    builtin's is parsed from its text by ``tokenize``, whose patterns take 2 ms to compile at
    start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    @classmethod
    def default_instance(cls) -> Self:
        """The model with every field at its default, as a section's default value: made
        without validation (the defaults are the code's own), so that defining the model that
        holds it builds no validator."""
        return cls.model_construct()
