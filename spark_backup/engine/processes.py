"""The environment of the tools spark-backup starts (GNU tar, the age worker).

Only what a tool needs to run is passed on: the private key ($SPARK_BACKUP_IDENTITY) and store
credentials live in the environment of spark-backup itself, and a child's environment can be
read from /proc by its owner and by root for as long as it runs.
"""

from __future__ import annotations

import os

_PASSED_ON = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONPATH", "PYTHONHOME")


def tool_environment() -> dict[str, str]:
    return {
        name: value
        for name, value in os.environ.items()
        if name in _PASSED_ON or name.startswith("LC_")
    }
