"""One backup of a model directory: every regular file chunked into the source's chunk store
(safetensors files also cut at every tensor), then the version document as the copy's
plaintext. The directory is walked again at the end: a file added, removed or changed while
the backup ran fails it before anything is committed, so no copy looks valid that holds no one
state of the directory."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spark_backup.engine.blobs.keys import derive_chunk_key, key_fingerprint
from spark_backup.engine.blobs.version import REFS_KEY, REFS_SHA256, new_version
from spark_backup.errors import SourceError
from spark_backup.sources.base import StoreAccess
from spark_backup.sources.llm_artifacts.checks import is_safetensors, tokenizer_loader
from spark_backup.sources.llm_artifacts.settings import KIND_NAME, LlmArtifactsSource

ADAPTER_CONFIG = "adapter_config.json"
__all__ = ["REFS_KEY", "REFS_SHA256", "ModelVersionReader", "walk_model"]


def walk_model(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every regular file below ``root`` (relative name -> inode, size, mtime, ctime). Links
    and special files are refused: a version holds files only."""
    if not root.is_dir():
        raise SourceError(f"{root}: model directory not found")
    found = {}
    for directory, folders, names in os.walk(root, onerror=_unreadable):
        folders.sort()
        for name in sorted(
            names + [f for f in folders if os.path.islink(os.path.join(directory, f))]
        ):
            path = os.path.join(directory, name)
            st = os.lstat(path)
            relative = os.path.relpath(path, root)
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(
                    f"{path}: not a regular file (links and special files are not backed up)"
                )
            found[relative] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if not found:
        raise SourceError(f"{root}: the model directory holds no files")
    return found


def _unreadable(exc: OSError) -> None:
    raise SourceError(f"{exc.filename}: cannot read: {exc.strerror}")


def adapter_facts(root: Path) -> dict[str, Any]:
    path = root / ADAPTER_CONFIG
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not a readable adapter config: {exc}") from None
    if not isinstance(config, dict):
        raise SourceError(f"{path}: not a JSON object")
    facts = {
        "base_model": config.get("base_model_name_or_path"),
        "rank": config.get("r"),
        "peft_type": config.get("peft_type"),
        "run_id": config.get("training_run_id") or config.get("run_id"),
    }
    return {k: v for k, v in facts.items() if v is not None}


def make_label(source: LlmArtifactsSource, facts: dict[str, Any]) -> str:
    if source.label:
        return source.label
    parts = []
    if "base_model" in facts:
        parts.append(f"base={facts['base_model']}")
    if "rank" in facts:
        parts.append(f"r={facts['rank']}")
    run = source.run_id or facts.get("run_id")
    if run:
        parts.append(f"run={run}")
    return " ".join(parts) or source.name


class ModelVersionReader:
    kind = KIND_NAME

    def __init__(self, source: LlmArtifactsSource, root: Path, access: StoreAccess, secret: str):
        self.layers = ["json"]
        self.source = source
        self.root = root
        self.access = access
        self.mac_key = derive_chunk_key(secret, source.name)
        self._metadata: dict[str, Any] = {}

    @contextmanager
    def open(self) -> Iterator[io.BytesIO]:
        store, scope = self.access.store, self.source.name
        facts = adapter_facts(self.root)
        before = walk_model(self.root)
        builder = new_version(
            store, scope, self.mac_key, self.access.recipients, self.access.compression.level
        )
        writer = builder.writer
        with builder.writing():
            for name in before:
                builder.add_file(str(self.root / name), name, safetensors=is_safetensors(name))
        after = walk_model(self.root)
        if after != before:
            changed = sorted(set(after) ^ set(before)) or sorted(
                n for n in after if after[n] != before[n]
            )
            raise SourceError(
                f"{self.root}: the model directory changed during the backup ({changed[0]}"
                f"{' and more' if len(changed) > 1 else ''}); no copy was made: back up again "
                "once the files are written"
            )
        packs, refs_key, refs_sha = builder.commit_refs(store, scope)
        label = make_label(self.source, facts)
        document = builder.document(
            scope, label, {"adapter": facts, "key_fingerprint": key_fingerprint(self.mac_key)}
        )
        files = document["files"]
        self._metadata = {
            "path": str(self.root),
            "label": label,
            "version_digest": document["digest"],
            **({"adapter": facts} if facts else {}),
            "files": len(files),
            "bytes": sum(f["size"] for f in files),
            "tensors": sum(len(f.get("safetensors", {}).get("tensors", [])) for f in files),
            "chunks": len({c[0] for f in files for c in f["chunks"]}),
            "new_chunks": writer.new_chunks,
            "packs": len(packs),
            "new_packs": len(writer.new_packs),
            "added_bytes": writer.new_stored_bytes,
            "stored_bytes_total": sum(packs.values()),
            REFS_KEY: refs_key,
            REFS_SHA256: refs_sha,
            "key_fingerprint": document["key_fingerprint"],
            "tokenizer_check": tokenizer_loader(),
        }
        yield io.BytesIO(json.dumps(document, separators=(",", ":")).encode())

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def tool_versions(self) -> dict[str, str]:
        from importlib import metadata

        try:
            return {"pyfastcdc": metadata.version("pyfastcdc")}
        except metadata.PackageNotFoundError:
            return {}
