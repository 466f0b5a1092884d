"""How a kind's own command reaches the plan opened by the command line: ``CliState`` is a
``RuntimeHolder`` on click's context. Apart from ``base.py`` (which exports both names too), so
that ``--help``, ``--version`` and the kinds' command modules build none of the contract's
dataclasses (14 of them, about 5 ms) before a command runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spark_backup.sources.base import Runtime


class RuntimeHolder(ABC):
    """What the command line puts on click's context, so a kind's command reaches the plan."""

    @property
    @abstractmethod
    def runtime(self) -> Runtime: ...


def current_runtime() -> Runtime:
    """The runtime of the plan given on the command line, for a kind's own commands."""
    import click

    holder = click.get_current_context().find_object(RuntimeHolder)
    if holder is None:
        raise RuntimeError("a kind's command ran outside spark-backup's command line")
    return holder.runtime
