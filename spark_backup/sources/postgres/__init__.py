"""The ``postgres`` kind: logical dumps (``dump``), physical base backups (``base``) and
continuous WAL archiving, for restores of one database and point-in-time recovery of the whole
cluster.

- ``kind.py``: the contract and PostgreSQL's capabilities;
- ``settings.py``: the plan model;
- ``dump.py``: ``pg_dump -Fc`` per database in one exported snapshot with row counts, plus
  ``pg_dumpall --globals-only``; restore into a new database;
- ``basebackup.py``: ``pg_basebackup`` tar streams with WAL positions and timeline;
- ``wal.py``, ``walname.py``: ``wal-push``/``wal-fetch`` and WAL file-name arithmetic;
- ``pitr.py``: recovery to a point in time into a throwaway cluster;
- ``ops.py``: those operations over a plan; ``cli.py``: the kind's commands;
- ``server.py``: connections, credentials for the client tools, versions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spark_backup.sources.postgres.kind import PostgresKind

    KIND: PostgresKind


def __getattr__(name: str) -> object:
    # The kind loads when first asked for, so that ``spark_backup.sources.postgres.cli`` (the
    # kind's commands, listed by ``--help``) can be imported without it.
    if name == "KIND":
        from spark_backup.sources.postgres.kind import PostgresKind

        global KIND
        KIND = PostgresKind()
        return KIND
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
