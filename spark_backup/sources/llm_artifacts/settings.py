"""The plan model of an ``llm_artifacts`` source."""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from spark_backup.engine.secrets import SecretReference
from spark_backup.plan.source import SourceSettings

KIND_NAME = "llm_artifacts"


class LlmArtifactsSource(SourceSettings):
    """A model directory: ``tokenizer.json`` / ``tokenizer.model``, ``adapter_config.json``,
    ``*.safetensors``, ``*.nemo`` and whatever else it holds, backed up as versions."""

    kind: Literal["llm_artifacts"]
    path: str
    # The secret chunk ids are keyed with (HMAC-SHA256, see engine/blobs/keys.py): at least 16
    # bytes, e.g. ``vault:secret/spark-backup#chunk_key``. Backups need it; restores, verifies
    # and prunes do not. A new value costs one full upload, never data.
    chunk_key: SecretReference
    # The version's label; else made from adapter_config.json (base model, rank) and run_id.
    label: str | None = None
    run_id: str | None = None

    @model_validator(mode="after")
    def _no_personal_data(self) -> LlmArtifactsSource:
        if self.personal_data:
            raise ValueError(
                "an llm_artifacts source cannot be personal_data: its chunks are shared between "
                "months, so a month's data key could not erase them"
            )
        return self
