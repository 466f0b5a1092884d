"""The ``faiss`` kind: FAISS index snapshots with a catalogue and probe queries.

- ``kind.py``: the contract, the catalogue and the probe-query semantic check;
- ``settings.py``: the plan model;
- ``snapshot.py``: the tar stream of the index and its sidecars;
- ``index.py``: FAISS itself (imported lazily: the ``faiss`` extra);
- ``managed.py``: managed vector stores behind an adapter (a Pinecone-shaped backup API).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spark_backup.sources.faiss.kind import FaissKind

    KIND: FaissKind


def __getattr__(name: str) -> object:
    if name == "KIND":
        from spark_backup.sources.faiss.kind import FaissKind

        global KIND
        KIND = FaissKind()
        return KIND
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
