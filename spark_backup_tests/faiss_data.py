"""Small FAISS indexes and their sidecars, made with faiss-cpu for the faiss kind's tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def make_index(
    folder: Path,
    kind: str = "flat",
    vectors: int = 2000,
    dimension: int = 32,
    seed: int = 7,
    name: str = "index.faiss",
) -> Path:
    """An index of ``vectors`` random vectors (``flat``: IndexFlatL2; ``ivf``: IVF16,Flat
    trained on them), with an id mapping and a document store beside it."""
    import faiss

    folder.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).standard_normal((vectors, dimension)).astype("float32")
    if kind == "flat":
        index = faiss.IndexFlatL2(dimension)
    else:
        index = faiss.index_factory(dimension, "IVF16,Flat")
        index.train(data)
    index.add(data)
    path = folder / name
    faiss.write_index(index, str(path))
    (folder / "ids.json").write_text(json.dumps({str(i): f"doc-{i}" for i in range(vectors)}))
    with open(folder / "docstore.jsonl", "w") as handle:
        for i in range(vectors):
            handle.write(json.dumps({"id": f"doc-{i}", "text": f"passage {i}"}) + "\n")
    return path


def faiss_source(folder: Path, name: str = "rag", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "faiss",
        "cadence": "daily",
        "owner": "team:ml",
        "index": str(folder / "index.faiss"),
        "id_mapping": str(folder / "ids.json"),
        "document_store": str(folder / "docstore.jsonl"),
        "embedding_model": {"name": "bge-small-en", "version": "1.5"},
        **extra,
    }
