"""Artifact kinds. Each kind is one module (or package) with the same entry points:

- ``artifacts(source_config, plan)``: what the source produces (``sources.artifacts.Artifact``);
- ``artifact_of(manifest)``: which of those a copy belongs to;
- ``readers_for(source_config, loaded_plan, artifact)``: ``PlaintextSource`` objects for the
  pipeline, one per copy a backup run makes;
- ``probe(source_config, loaded_plan)``: reach the source without backing it up;
- ``restore_copy(store, manifest, identities, target, ...)``: a staged restore into a folder;
- ``check_plaintext(plain, manifest)``: a deep verify of the decrypted stream.
"""

from __future__ import annotations

from types import ModuleType

from spark_backup.errors import NotFoundError
from spark_backup.sources import config_archive, postgres

KIND_MODULES: dict[str, ModuleType] = {
    config_archive.KIND: config_archive,
    postgres.KIND: postgres,
}


def kind_module(kind: str) -> ModuleType:
    try:
        return KIND_MODULES[kind]
    except KeyError:
        raise NotFoundError(
            f"unknown source kind {kind!r} (this version knows: {', '.join(KIND_MODULES)})"
        ) from None
