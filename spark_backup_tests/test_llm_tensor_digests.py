"""Tensor digests of llm_artifacts versions: made of the tensor's chunks' sha256 since this
release (``tensor_digest: sha256-of-chunk-sha256s``), a plain sha256 per tensor in documents of
earlier releases. Both verify deeply, drill and restore; a tensor whose bytes differ is named;
the runbook's by-hand check gives the same answers."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import subprocess
from itertools import pairwise
from pathlib import Path

import pytest

from spark_backup.engine.blobs.safetensors import TENSOR_DIGEST, TENSOR_DIGEST_OF_CHUNKS
from spark_backup.errors import IntegrityError
from spark_backup.service import BackupService
from spark_backup.sources.llm_artifacts.checks import check_file
from spark_backup.sources.llm_artifacts.kind import LlmArtifactsKind, read_document
from spark_backup_tests.helpers import llm_source, plan_dict, write_plan, write_safetensors
from spark_backup_tests.test_runbooks import DOCS, fenced_blocks

CHUNK_SECRET = "test-chunk-secret-0123456789abcdef"
WEIGHTS = "adapter_model.safetensors"
# Tensors of many chunks (chunks average 48 KiB, at most 192 KiB), one of no bytes, one far
# below the smallest chunk, in file order.
SIZES = {"big.weight": 700_000, "empty.bias": 0, "mid.weight": 260_000, "tiny.bias": 96}


@pytest.fixture(autouse=True)
def chunk_secret(monkeypatch):
    monkeypatch.setenv("SPARK_TEST_CHUNK_KEY", CHUNK_SECRET)


def _model(root: Path) -> Path:
    rng = random.Random(3)
    write_safetensors(
        root / WEIGHTS,
        {name: ("F32", [size // 4], rng.randbytes(size)) for name, size in SIZES.items()},
    )
    (root / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    return root


def _service(tmp_path: Path, public: str) -> BackupService:
    model = _model(tmp_path / "adapter")
    plan = write_plan(tmp_path, plan_dict([public], [llm_source("adapter", str(model))]))
    return BackupService.from_path(plan)


def _weights(document: dict) -> dict:
    return next(f for f in document["files"] if f["path"] == WEIGHTS)


def _plain_tensor_digests(entry: dict, data: bytes) -> dict:
    """``entry`` as an earlier release wrote it: each tensor's digest the sha256 of its bytes,
    and no ``tensor_digest`` field."""
    old = json.loads(json.dumps(entry))
    del old["safetensors"][TENSOR_DIGEST]
    for row in old["safetensors"]["tensors"]:
        row[5] = hashlib.sha256(data[row[3] : row[4]]).hexdigest()
    return old


class _EarlierReleaseReader:
    """Wraps a ``ModelVersionReader`` so that the version document it commits records plain
    tensor sha256s, as earlier releases wrote them (everything else as written now)."""

    def __init__(self, reader, model: Path):
        self._reader, self._model = reader, model
        self.kind, self.layers = reader.kind, reader.layers

    @contextlib.contextmanager
    def open(self):
        with self._reader.open() as plain:
            document = json.loads(plain.read())
            for number, entry in enumerate(document["files"]):
                if "safetensors" in entry:
                    data = (self._model / entry["path"]).read_bytes()
                    document["files"][number] = _plain_tensor_digests(entry, data)
            yield io.BytesIO(json.dumps(document, separators=(",", ":")).encode())

    def metadata(self):
        return self._reader.metadata()

    def tool_versions(self):
        return self._reader.tool_versions()


def _backup(service: BackupService, earlier_release: bool, monkeypatch) -> str:
    real = LlmArtifactsKind.readers
    if earlier_release:
        model = Path(service.source("adapter").path)
        monkeypatch.setattr(
            LlmArtifactsKind,
            "readers",
            lambda self, *a, **k: [_EarlierReleaseReader(r, model) for r in real(self, *a, **k)],
        )
    [version] = service.backup("adapter")
    monkeypatch.setattr(LlmArtifactsKind, "readers", real)
    return version.id


def _pieces(data: bytes, sizes: list[int]):
    at = 0
    for size in sizes:
        yield data[at : at + size]
        at += size


def test_a_tensor_digest_is_the_sha256_of_its_chunks_digests(tmp_path, age_key):
    service = _service(tmp_path, age_key[1])
    [version] = service.backup("adapter")
    entry = _weights(read_document(service.find(version.id), service.identities(age_key[0])))
    assert entry["safetensors"][TENSOR_DIGEST] == TENSOR_DIGEST_OF_CHUNKS
    data = (tmp_path / "adapter" / WEIGHTS).read_bytes()
    # Recomputed from the file's bytes cut where the document's chunks end.
    ends, at = set(), 0
    for chunk in entry["chunks"]:
        at += chunk[2]
        ends.add(at)
    chunk_counts = {}
    for name, _dtype, _shape, begin, end, digest in entry["safetensors"]["tensors"]:
        cuts = [begin, *sorted(e for e in ends if begin < e <= end)]
        assert cuts[-1] == end
        raw = b"".join(hashlib.sha256(data[a:b]).digest() for a, b in pairwise(cuts))
        assert digest == hashlib.sha256(raw).hexdigest(), name
        chunk_counts[name] = len(cuts) - 1
    assert chunk_counts["big.weight"] >= 4 and chunk_counts["empty.bias"] == 0
    assert entry["safetensors"]["tensors"][1][5] == hashlib.sha256(b"").hexdigest()


@pytest.mark.parametrize("earlier_release", [False, True], ids=["chunk-digests", "plain-sha256"])
def test_both_schemes_verify_deeply_drill_and_restore(
    tmp_path, age_key, monkeypatch, earlier_release
):
    service = _service(tmp_path, age_key[1])
    version_id = _backup(service, earlier_release, monkeypatch)
    identities = service.identities(age_key[0])
    ref = service.find(version_id)
    entry = _weights(read_document(ref, identities))
    assert (TENSOR_DIGEST in entry["safetensors"]) is not earlier_release
    deep = service.verify(ref, identities)
    assert deep.ok, deep.error
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = service.kind_of(service.source("adapter")).semantic_check(
        service, ref, identities, scratch
    )
    assert result.passed and result.metrics["tensors"] == len(SIZES), result.description
    service.restore(version_id, tmp_path / "restored", identity_file=age_key[0])
    assert (tmp_path / "restored" / WEIGHTS).read_bytes() == (
        tmp_path / "adapter" / WEIGHTS
    ).read_bytes()


@pytest.mark.parametrize("earlier_release", [False, True], ids=["chunk-digests", "plain-sha256"])
@pytest.mark.parametrize("part", ["chunks", 1 << 20, 4099])
def test_a_tensor_whose_bytes_differ_is_named(tmp_path, age_key, earlier_release, part):
    """The check deep verify runs on a version's chunks and the drill on restored files: the
    bytes streamed in the version's chunks, in 1 MiB reads, or in pieces that fit neither."""
    service = _service(tmp_path, age_key[1])
    [version] = service.backup("adapter")
    entry = _weights(read_document(service.find(version.id), service.identities(age_key[0])))
    data = (tmp_path / "adapter" / WEIGHTS).read_bytes()
    if earlier_release:
        entry = _plain_tensor_digests(entry, data)
    sizes = (
        [c[2] for c in entry["chunks"]] if part == "chunks" else [part] * (len(data) // part + 1)
    )
    assert check_file(entry, _pieces(data, sizes), "intact") == {"tensors": len(SIZES)}
    for name in ("big.weight", "mid.weight", "tiny.bias"):
        row = next(r for r in entry["safetensors"]["tensors"] if r[0] == name)
        damaged = bytearray(data)
        damaged[row[4] - 1] ^= 0x01  # the tensor's last byte
        with pytest.raises(IntegrityError, match=f"tensor '{name}' does not match"):
            check_file(entry, _pieces(bytes(damaged), sizes), "damaged")


def test_chunks_that_do_not_fit_the_tensors_fail_the_check(tmp_path, age_key):
    service = _service(tmp_path, age_key[1])
    [version] = service.backup("adapter")
    entry = _weights(read_document(service.find(version.id), service.identities(age_key[0])))
    data = (tmp_path / "adapter" / WEIGHTS).read_bytes()
    # Two chunks of the big tensor told as one of a tensor's chunks and a neighbour's.
    first = next(
        i
        for i, c in enumerate(entry["chunks"])
        if sum(x[2] for x in entry["chunks"][: i + 1]) > entry["safetensors"]["tensors"][0][4]
    )
    entry["chunks"][first - 1][2] += 1
    entry["chunks"][first][2] -= 1
    with pytest.raises(IntegrityError, match=r"chunks do not fit its tensors.*'big\.weight'"):
        check_file(entry, iter([data]), "moved")
    entry["safetensors"][TENSOR_DIGEST] = "md5-of-something"
    with pytest.raises(IntegrityError, match="unknown scheme"):
        check_file(entry, iter([data]), "unknown")


def _check_by_hand(document: dict, restored: Path, tensor: str, scratch: Path):
    (script,) = [
        b
        for b in fenced_blocks(DOCS / "runbooks" / "llm_artifacts.md", "bash")
        if b.startswith("# Check one tensor")
    ]
    doc = scratch / "doc.json"
    doc.write_text(json.dumps(document))
    env = {"DOC": str(doc), "NAME": WEIGHTS, "RESTORED": str(restored), "TENSOR": tensor}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("earlier_release", [False, True], ids=["chunk-digests", "plain-sha256"])
def test_the_runbook_checks_a_tensor_by_hand(tmp_path, age_key, monkeypatch, earlier_release):
    service = _service(tmp_path, age_key[1])
    version_id = _backup(service, earlier_release, monkeypatch)
    document = read_document(service.find(version_id), service.identities(age_key[0]))
    service.restore(version_id, tmp_path / "restored", identity_file=age_key[0])
    restored = tmp_path / "restored" / WEIGHTS
    for name in SIZES:
        result = _check_by_hand(document, restored, name, tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"tensor {name}: matches" in result.stdout
    entry = _weights(document)
    row = next(r for r in entry["safetensors"]["tensors"] if r[0] == "mid.weight")
    with open(restored, "r+b") as handle:
        handle.seek(row[3] + 5)
        byte = handle.read(1)
        handle.seek(row[3] + 5)
        handle.write(bytes([byte[0] ^ 0x80]))
    result = _check_by_hand(document, restored, "mid.weight", tmp_path)
    assert result.returncode == 1 and "tensor mid.weight: differs" in result.stderr
    assert _check_by_hand(document, restored, "big.weight", tmp_path).returncode == 0


@pytest.mark.parametrize("earlier_release", [False, True], ids=["chunk-digests", "plain-sha256"])
def test_deep_verify_names_a_tensor_whose_bytes_differ_from_its_digest(
    tmp_path, age_key, monkeypatch, earlier_release
):
    """Through deep verify's own path (every chunk read from its pack and checked against its
    own sha256): a tensor whose bytes do not give the digest recorded for it is named. Here the
    recorded digest is changed as the document is read, so the chunks stay intact and only the
    tensor check can fail."""
    from spark_backup.sources import blob_versions

    service = _service(tmp_path, age_key[1])
    version_id = _backup(service, earlier_release, monkeypatch)
    real = blob_versions.read_committed_document

    def swapped(copy, identities):
        document = real(copy, identities)
        rows = {r[0]: r for r in _weights(document)["safetensors"]["tensors"]}
        rows["mid.weight"][5] = hashlib.sha256(b"other bytes").hexdigest()
        return document

    monkeypatch.setattr(blob_versions, "read_committed_document", swapped)
    identities = service.identities(age_key[0])
    deep = service.verify(service.find(version_id), identities)
    assert not deep.ok and "tensor 'mid.weight' does not match" in deep.error, deep.error
    monkeypatch.setattr(blob_versions, "read_committed_document", real)
    assert service.verify(service.find(version_id), identities).ok
