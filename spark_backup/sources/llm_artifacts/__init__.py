"""The ``llm_artifacts`` kind: model directories (tokenizers, adapter configs, safetensors
weights, NeMo archives) as deduplicated versions through the engine's blob layer.

- ``kind.py``: the contract, the semantic check (tensor digests), the shared chunks;
- ``settings.py``: the plan model;
- ``reader.py``: a backup run: the directory chunked into the store, the version document;
- ``checks.py``: tensor digests, tokenizers and NeMo archives checked from a byte stream;
- ``cli.py``: ``spark-backup versions``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spark_backup.sources.llm_artifacts.kind import LlmArtifactsKind

    KIND: LlmArtifactsKind


def __getattr__(name: str) -> object:
    # Loaded when first asked for, so that ``cli.py`` (listed by ``--help``) imports without it.
    if name == "KIND":
        from spark_backup.sources.llm_artifacts.kind import LlmArtifactsKind

        global KIND
        KIND = LlmArtifactsKind()
        return KIND
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
