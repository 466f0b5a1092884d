"""Artifact kinds. Each kind is one module with the same three entry points:

- ``reader_for(source_config, loaded_plan)``: a ``PlaintextSource`` for the pipeline (backup);
- ``restore_copy(store, manifest, identities, target, ...)``: a staged restore;
- ``check_plaintext(plain, manifest)``: a deep verify of the decrypted stream.
"""

from __future__ import annotations

from types import ModuleType

from spark_backup.errors import NotFoundError
from spark_backup.sources import config_archive

KIND_MODULES: dict[str, ModuleType] = {config_archive.KIND: config_archive}


def kind_module(kind: str) -> ModuleType:
    try:
        return KIND_MODULES[kind]
    except KeyError:
        raise NotFoundError(
            f"unknown source kind {kind!r} (this version knows: {', '.join(KIND_MODULES)})"
        ) from None
