"""The ``config_archive`` kind: configuration trees as tar archives (see ``kind.py``)."""

from spark_backup.sources.config_archive.kind import ConfigArchiveKind

KIND = ConfigArchiveKind()
