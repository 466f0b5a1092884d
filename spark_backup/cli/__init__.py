"""``spark-backup``: the command line over the same operations the Dagster layer runs.

- ``app.py``: the root group, exit codes, the kinds' own commands;
- ``copies.py``: backup, list, verify, restore, prune;
- ``plan.py``: plan check;
- ``drills.py``: drill, disaster-drill;
- ``replication.py``: replicate;
- ``alerts.py``: alerts;
- ``monitor.py``: monitor (KPIs);
- ``secrets.py``: secrets status and rotate-key;
- ``dagster.py``: dagster-init and the demo.

Each module registers its commands on ``cli`` as it is imported, which ``app.CORE_COMMANDS``
does for the command asked for.
"""

from spark_backup.cli.app import cli, main

__all__ = ["cli", "main"]
