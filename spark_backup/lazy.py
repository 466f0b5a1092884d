"""Names a package exports but loads only when first asked for (PEP 562), so that importing
one of its modules does not import all the others (``spark-backup wal-push`` runs for every WAL
segment and needs few of them)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, homes: dict[str, str], namespace: dict[str, Any]) -> Callable:
    """A module ``__getattr__`` for ``package``: ``homes`` maps each exported name to the
    module that defines it; a name once loaded is kept in ``namespace`` (the package's
    ``globals()``)."""

    def __getattr__(name: str) -> object:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(homes[name]), name)
        namespace[name] = value
        return value

    return __getattr__
