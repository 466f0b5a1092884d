"""The plan model of a ``config_archive`` source."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from spark_backup.globs import glob_to_regex
from spark_backup.plan.source import SourceSettings


class ConfigArchiveSource(SourceSettings):
    """Configuration trees (DGX, Kubernetes, VPN) archived with tar, modes and links kept."""

    kind: Literal["config_archive"]
    paths: list[str] = Field(min_length=1)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    one_file_system: bool = True
    # A file that shrinks while tar reads it is padded with zeros (torn). False fails the backup;
    # true keeps the copy, which records the torn files for restore and verify to name.
    allow_torn_files: bool = False

    @field_validator("include", "exclude")
    @classmethod
    def _valid_globs(cls, value: list[str]) -> list[str]:
        for pattern in value:
            glob_to_regex(pattern)
        return value

    @field_validator("paths")
    @classmethod
    def _absolute_or_relative(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.strip():
                raise ValueError("expected non-empty paths")
        return value
