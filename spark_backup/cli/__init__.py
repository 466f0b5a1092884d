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
"""

from spark_backup.cli import alerts, copies, dagster, drills, monitor, plan, replication, secrets  # noqa: F401 - each registers its commands
from spark_backup.cli.app import cli, main

__all__ = ["cli", "main"]
