"""The plan model of a ``faiss`` source: an index file, its sidecars, the embedding model and
the probe queries that prove a restored index answers as the original did."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from spark_backup.engine.secrets import SecretReference
from spark_backup.engine.settings import SettingsModel
from spark_backup.plan.source import SourceSettings


class EmbeddingModel(SettingsModel):
    """The model that made the vectors: an index is useless with another one."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)


class Probes(SettingsModel):
    """Probe queries run at backup and again on every restore drill: ``queries`` vectors drawn
    from a generator seeded with ``seed``, ``k`` nearest neighbours each."""

    queries: int = Field(5, ge=1, le=100)
    k: int = Field(10, ge=1, le=1000)
    seed: int = Field(0, ge=0)
    # IVF and HNSW search parameters the users' searches run with (they change the answers).
    nprobe: int | None = Field(None, ge=1)
    ef_search: int | None = Field(None, ge=1)


class FaissSource(SourceSettings):
    """A FAISS index on disk with its sidecars, snapshotted as a blob-layer version (with
    ``chunk_key``) or as one tar stream."""

    kind: Literal["faiss"]
    index: str
    # Sidecars, named by what they hold: the mapping from FAISS ids to document ids and the
    # document store. Each lands beside the index in the copy under its own file name.
    id_mapping: str | None = None
    document_store: str | None = None
    extra_files: list[str] = Field(default=[])
    embedding_model: EmbeddingModel
    # The index_factory string the index was built with; recorded in the catalogue (FAISS can
    # only derive it again for some index types).
    factory: str | None = None
    probes: Probes = Probes.default_instance()
    # With a chunk key the snapshot goes through the deduplicating blob layer (packs shared by
    # snapshots: a re-trained index that keeps most of its lists adds little); the secret keys
    # the chunk ids, at least 16 bytes, e.g. ``vault:secret/spark-backup#faiss_chunk_key``.
    # Without it each snapshot is a tar stream of its own.
    chunk_key: SecretReference | None = None

    @field_validator("index", "id_mapping", "document_store")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("expected a path")
        return value

    @model_validator(mode="after")
    def _distinct_names(self) -> FaissSource:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.files()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(
                f"two files named {twice[0]!r}: index and sidecars land side by side in a copy"
            )
        if any(n == PROBES_FILE for n in names):
            raise ValueError(f"{PROBES_FILE!r} is the name of the probe file in a copy")
        return self

    def files(self) -> list[str]:
        """The index first, then the sidecars, as the plan names them."""
        sidecars = [p for p in (self.id_mapping, self.document_store) if p]
        return [self.index, *sidecars, *self.extra_files]

    def roles(self) -> list[str]:
        roles = ["index"]
        roles += ["id_mapping"] if self.id_mapping else []
        roles += ["document_store"] if self.document_store else []
        return roles + ["extra"] * len(self.extra_files)


PROBES_FILE = "spark-backup-probes.json"
