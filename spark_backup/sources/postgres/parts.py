"""The kind's name and the names of its artifacts' parts: what the kind, its operations and its
readers share, apart from the readers and the server's module (``server.py``, ``dump.py``,
``basebackup.py``), which load where a copy is made or the server is asked: reading the plan,
``list`` and ``wal-push`` need none of them."""

from __future__ import annotations

KIND_NAME = "postgres"
# The artifact of base backups, and the part each copy of it is.
BASE = "base"
BASE_PART = "base"
# The dump artifact's parts: the cluster's globals, and one per database.
GLOBALS_PART = "globals"
DATABASE_PART_PREFIX = "database:"


def database_part(database: str) -> str:
    return f"{DATABASE_PART_PREFIX}{database}"
