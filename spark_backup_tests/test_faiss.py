"""The faiss kind: snapshots of a real FAISS index (faiss-cpu) with its sidecars, the catalogue
in the manifest, in ``list --kind faiss --json`` and as asset metadata, probe queries proven on
restore, and the one-line errors of bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
from dagster import DagsterInstance

from spark_backup.defs.build import build_definitions
from spark_backup.engine.cadence import partition_key_for
from spark_backup.engine.pipeline import utcnow
from spark_backup.errors import SourceError
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup.sources.faiss.kind import probe_restored
from spark_backup.sources.faiss.settings import PROBES_FILE
from spark_backup.sources.faiss.snapshot import _UntilInspectionFails
from spark_backup_tests.faiss_data import faiss_source, make_index
from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def _plan(tmp_path: Path, age_key, sources: list[dict]) -> Path:
    plan = plan_dict([age_key[1]], sources)
    plan["encryption"]["identity_file"] = str(age_key[0])
    return write_plan(tmp_path, plan)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_snapshot_records_the_catalogue_and_list_filters_by_kind(
    tmp_path: Path, age_key, estate: Path
) -> None:
    folder = tmp_path / "rag"
    make_index(folder, "ivf")
    sources = [
        faiss_source(folder, factory="IVF16,Flat", probes={"queries": 4, "k": 7, "nprobe": 3}),
        config_source("trees", [str(estate)]),
    ]
    plan = _plan(tmp_path, age_key, sources)
    run_cli("--plan", str(plan), "backup", "rag", "trees", check=True)

    listed = run_cli("--plan", str(plan), "list", "--kind", "faiss", "--json", check=True)
    (row,) = json.loads(listed.stdout)
    assert row["kind"] == "faiss" and row["source"] == "rag"
    entry = row["catalogue"]
    assert entry["dimension"] == 32 and entry["ntotal"] == 2000 and entry["metric"] == "L2"
    assert entry["index_type"] == "IndexIVFFlat" and entry["factory"] == "IVF16,Flat"
    assert entry["is_trained"] is True
    assert entry["embedding_model"] == {"name": "bge-small-en", "version": "1.5"}
    files = {f["name"]: f for f in entry["files"]}
    assert [f["role"] for f in entry["files"]] == ["index", "id_mapping", "document_store"]
    for name in ("index.faiss", "ids.json", "docstore.jsonl"):
        assert files[name]["sha256"] == _sha256(folder / name)
        assert files[name]["bytes"] == (folder / name).stat().st_size
    assert entry["probes"]["queries"] == 4 and entry["probes"]["k"] == 7
    assert entry["bytes"] == sum(f["bytes"] for f in entry["files"])

    everything = json.loads(run_cli("--plan", str(plan), "list", "--json", check=True).stdout)
    assert {r["kind"] for r in everything} == {"faiss", "config_archive"}
    assert "catalogue" not in next(r for r in everything if r["kind"] == "config_archive")
    unknown = run_cli("--plan", str(plan), "list", "--kind", "nosuchkind", "--json")
    assert unknown.returncode == 4 and "nosuchkind" in unknown.stderr


def test_restore_and_drill_prove_identical_answers(tmp_path: Path, age_key) -> None:
    folder = tmp_path / "rag"
    make_index(folder, "flat")
    plan = _plan(tmp_path, age_key, [faiss_source(folder)])
    service = BackupService.from_path(plan)
    (manifest,) = service.backup("rag")

    target = tmp_path / "restored"
    service.restore(manifest.id, target, identity_file=age_key[0])
    for name in ("index.faiss", "ids.json", "docstore.jsonl"):
        assert (target / name).read_bytes() == (folder / name).read_bytes()
    stored = json.loads((target / PROBES_FILE).read_text())
    assert len(stored["queries"]) == 5 and len(stored["ids"][0]) == 10

    deep = service.verify(service.find(manifest.id), service.identities(age_key[0]))
    assert deep.ok, deep.error

    report = service.drill("rag", identity_file=age_key[0])
    assert report.passed, report
    drilled = json.loads(run_cli("--plan", str(plan), "list", "--json", check=True).stdout)
    assert drilled[0]["drill"]["passed"] and drilled[0]["drill"]["check"] == "probe_queries"


@pytest.mark.parametrize("k", [1, 10, 25])
def test_a_flat_index_searched_by_slices_of_its_file_answers_as_faiss_does(
    tmp_path: Path, monkeypatch, k: int
) -> None:
    """Probes of a flat L2 index read its vectors a slice at a time (the mapped index's pages
    never enter the process): the same ids and distances as FAISS's own search, ties among
    duplicate vectors included; an inner-product index is searched whole."""
    import faiss
    import numpy as np

    from spark_backup.sources.faiss import index as faiss_index

    rng = np.random.default_rng(3)
    base = rng.standard_normal((50, 16)).astype("float32")
    data = np.concatenate(
        [base[rng.integers(0, 50, 3000)], rng.integers(-2, 3, (2000, 16)).astype("float32")]
    )
    queries = np.concatenate([base[:3], rng.integers(-2, 3, (4, 16)).astype("float32")]).tolist()
    monkeypatch.setattr(faiss_index, "FLAT_SLICE", 333 * 16 * 4)  # 16 slices, the last short
    for metric, kind in (
        (faiss.METRIC_L2, faiss.IndexFlatL2),
        (faiss.METRIC_INNER_PRODUCT, faiss.IndexFlatIP),
    ):
        whole = kind(16)
        whole.add(data)
        path = tmp_path / f"flat-{metric}.faiss"
        faiss.write_index(whole, str(path))
        expected = faiss_index.run_probes(whole, queries, k)
        loaded = faiss_index.read_index(path)
        sliced = faiss_index._search_flat_in_slices(
            loaded, np.asarray(queries, dtype="float32"), k, path
        )
        assert (sliced is None) == (metric == faiss.METRIC_INNER_PRODUCT)
        assert faiss_index.run_probes(loaded, queries, k, path=path) == expected
    # A file whose trailing bytes are not the index's vectors is searched whole.
    flat = tmp_path / f"flat-{faiss.METRIC_L2}.faiss"
    other = tmp_path / "other.faiss"
    other.write_bytes(flat.read_bytes()[:-4] + b"\0\0\0\0")
    loaded = faiss_index.read_index(flat)
    assert (
        faiss_index._search_flat_in_slices(loaded, np.zeros((1, 16), "float32"), k, other) is None
    )


def test_a_restored_index_that_answers_otherwise_fails_the_check(tmp_path: Path, age_key) -> None:
    folder = tmp_path / "rag"
    make_index(folder, "flat")
    plan = _plan(tmp_path, age_key, [faiss_source(folder)])
    service = BackupService.from_path(plan)
    (manifest,) = service.backup("rag")
    target = tmp_path / "restored"
    service.restore(manifest.id, target, identity_file=age_key[0])
    assert probe_restored(manifest, target).passed

    # The same number of vectors, other values: the catalogue agrees, the answers do not.
    make_index(tmp_path / "other", "flat", seed=8)
    (target / "index.faiss").write_bytes((tmp_path / "other" / "index.faiss").read_bytes())
    result = probe_restored(manifest, target)
    assert not result.passed and "probe queries differently" in result.description

    # Fewer vectors: the catalogue already disagrees.
    make_index(tmp_path / "small", "flat", vectors=1500)
    (target / "index.faiss").write_bytes((tmp_path / "small" / "index.faiss").read_bytes())
    result = probe_restored(manifest, target)
    assert not result.passed and "ntotal" in result.description

    # Answers edited in the restored probe file no longer match the manifest's digest.
    make_index(tmp_path / "again", "flat")
    (target / "index.faiss").write_bytes((folder / "index.faiss").read_bytes())
    probes = json.loads((target / PROBES_FILE).read_text())
    probes["ids"][0][0] = probes["ids"][0][1]
    (target / PROBES_FILE).write_text(json.dumps(probes))
    result = probe_restored(manifest, target)
    assert not result.passed and "manifest recorded" in result.description


# A FAISS four-character code before 4 MiB that FAISS cannot read: the chunking of the blob
# layer is under way when FAISS (on its own thread) rejects it.
_LARGE_NON_INDEX = b"IxF2" + os.urandom(4 << 20)


@pytest.mark.parametrize("layout", ["stream", "blob"])
@pytest.mark.parametrize(
    "content",
    [b"just some text, not an index\n", b"IxF2" + b"\x00" * 3, b"", _LARGE_NON_INDEX],
    ids=["text", "header only", "empty", "large"],
)
def test_a_file_that_is_not_an_index_is_one_line_naming_it(
    tmp_path: Path, age_key, content: bytes, layout: str, monkeypatch
) -> None:
    folder = tmp_path / "rag"
    make_index(folder, "flat")
    (folder / "index.faiss").write_bytes(content)
    monkeypatch.setenv("SPARK_TEST_FAISS_CHUNK_KEY", "faiss-chunk-key-0123456789abcdef")
    extra = {"chunk_key": "env:SPARK_TEST_FAISS_CHUNK_KEY"} if layout == "blob" else {}
    plan = _plan(tmp_path, age_key, [faiss_source(folder, **extra)])
    result = run_cli("--plan", str(plan), "backup", "rag")
    assert result.returncode == SourceError.exit_code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(folder / "index.faiss") in lines[0]
    assert "not a FAISS index" in lines[0]
    assert json.loads(run_cli("--plan", str(plan), "list", "--json", check=True).stdout) == []
    probe = run_cli("--plan", str(plan), "plan", "check", "--probe")
    assert probe.returncode != 0 and str(folder / "index.faiss") in probe.stderr + probe.stdout


def test_reads_stop_with_the_inspections_error() -> None:
    """The files are chunked while FAISS inspects the index on a thread: once it failed, the
    next read raises its error, so a file FAISS rejects stops the backup at once."""
    inspection: Future = Future()
    with open(__file__, "rb") as handle:
        reads = _UntilInspectionFails(handle, inspection)
        assert reads.read(4) == b'"""T'
        buffer = bytearray(4)
        assert reads.readinto(buffer) == 4 and bytes(buffer) == b"he f"
        inspection.set_exception(SourceError("index.faiss: not a FAISS index (bad header)"))
        with pytest.raises(SourceError, match="not a FAISS index"):
            reads.readinto(buffer)
        with pytest.raises(SourceError, match="not a FAISS index"):
            reads.read(4)


def test_a_sidecar_written_during_the_backup_fails_the_copy(tmp_path: Path, age_key) -> None:
    folder = tmp_path / "rag"
    make_index(folder, "flat")
    plan = _plan(tmp_path, age_key, [faiss_source(folder)])
    service = BackupService.from_path(plan)
    source = service.source("rag")
    (reader,) = service.kind_of(source).readers(source, service.context(source), "snapshot")
    later = time.time_ns() + 5_000_000_000
    with (
        pytest.raises(SourceError, match=r"docstore\.jsonl changed during the backup"),
        reader.open() as stream,
    ):
        stream.read(1 << 16)
        with open(folder / "docstore.jsonl", "r+b") as handle:
            handle.write(b"{")  # in place: the same size, a new mtime
        os.utime(folder / "docstore.jsonl", ns=(later, later))
        while stream.read(1 << 20):
            pass


def test_the_kind_loads_without_faiss(tmp_path: Path, age_key) -> None:
    """Planning, listing and the kind's module need no FAISS: it is imported when an index is
    read."""
    folder = tmp_path / "rag"
    make_index(folder, "flat")
    plan = _plan(tmp_path, age_key, [faiss_source(folder)])
    code = (
        "import sys; from spark_backup.plan import load_plan; "
        "from spark_backup.sources import registry; "
        f"load_plan({str(plan)!r}); registry.kind('faiss'); "
        "print('faiss' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_faiss_loads_without_numpys_blas_threads() -> None:
    """numpy's OpenBLAS threads would spin beside the backup's own at import: numpy is
    loaded with one, and the environment is left as it was."""
    code = (
        "import os; from spark_backup.sources.faiss import index; index.load_faiss(); "
        "print(len(os.listdir('/proc/self/task')), 'OPENBLAS_NUM_THREADS' in os.environ)"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.split() == ["1", "False"]


def test_the_catalogue_is_asset_metadata(tmp_path: Path, age_key) -> None:
    folder = tmp_path / "rag"
    make_index(folder, "flat")
    plan = _plan(tmp_path, age_key, [faiss_source(folder)])
    defs = build_definitions(load_plan(plan))
    partition = partition_key_for("daily", utcnow())
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("daily_backups").execute_in_process(
            instance=instance, partition_key=partition, run_config=QUIET
        )
        assert result.success
        (materialization,) = result.asset_materializations_for_node("backups__rag")
    metadata = materialization.metadata
    assert metadata["catalogue/dimension"].value == 32
    assert metadata["catalogue/ntotal"].value == 2000
    assert metadata["catalogue/metric"].value == "L2"
    assert metadata["catalogue/index_type"].value == "IndexFlatL2"
    assert metadata["catalogue"].value["embedding_model"]["version"] == "1.5"


RUNBOOK = Path(__file__).resolve().parents[1] / "docs" / "runbooks" / "faiss.md"


def _block(language: str, starts: str) -> str:
    import re

    blocks = re.findall(rf"```{language}\n(.*?)```", RUNBOOK.read_text(), flags=re.DOTALL)
    (found,) = [b for b in blocks if b.startswith(starts)]
    return found


def test_the_runbook_restores_and_probes_by_hand(tmp_path: Path, age_key) -> None:
    """The runbook's by-hand blocks: age, zstd, tar, sha256sum and jq restore and check every
    file; python3 with faiss answers the probe queries identically."""
    folder = tmp_path / "rag"
    make_index(folder, "ivf")
    plan = _plan(tmp_path, age_key, [faiss_source(folder, probes={"nprobe": 4})])
    service = BackupService.from_path(plan)
    service.backup("rag")
    staging = tmp_path / "staging"
    env = {
        **os.environ,
        "STORE": str(tmp_path / "store"),
        "SOURCE": "rag",
        "KEY": str(age_key[0]),
        "STAGING": str(staging),
    }
    script = _block("bash", "# What to restore")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "IndexIVFFlat d=32 ntotal=2000 L2  model bge-small-en 1.5" in result.stdout
    name = result.stdout.strip().splitlines()[-1]
    assert name == "index.faiss"
    probe = tmp_path / "probe.py"
    probe.write_text(_block("python", "# python3 probe.py"))
    checked = subprocess.run(
        [sys.executable, str(probe), str(staging), name], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    assert "5 probe queries answered identically" in checked.stdout

    # A damaged sidecar is caught by the catalogue check.
    (staging / "ids.json").write_text("{}")
    again = subprocess.run(
        [
            "bash",
            "-euo",
            "pipefail",
            "-c",
            script.split("# 3.")[0]
            + 'cd "$STAGING" && jq -r \'.source_metadata.catalogue.files[] | "\\(.sha256)  \\(.name)"\' "$MANIFEST" | sha256sum --check --quiet',
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert again.returncode != 0 and "ids.json" in again.stdout + again.stderr


def test_observation_changes_with_the_index(tmp_path: Path, age_key) -> None:
    folder = tmp_path / "rag"
    make_index(folder, "flat")
    plan = _plan(tmp_path, age_key, [faiss_source(folder)])
    service = BackupService.from_path(plan)
    source = service.source("rag")
    kind = service.kind_of(source)
    first = kind.observe(source, service.context(source))
    assert first == kind.observe(source, service.context(source))
    assert first.metadata["files"] == 3
    make_index(folder, "flat", vectors=2100)
    assert kind.observe(source, service.context(source)).version != first.version


def test_snapshots_on_the_blob_layer_share_packs_and_stream_copies_still_restore(
    tmp_path: Path, age_key, monkeypatch
) -> None:
    """A source without chunk_key writes tar streams (as the first release did); with one, the
    index and its sidecars go through the blob layer: a snapshot whose index did not change adds
    little. Both kinds of copy list with their catalogue, verify deep, restore, answer the probe
    queries, survive a prune, and the blob version restores by hand with the llm runbook's block
    (the same version document)."""
    from spark_backup.engine.blobs.packs import existing_packs
    from spark_backup_tests.test_llm_artifacts import restore_by_hand

    monkeypatch.setenv("SPARK_TEST_FAISS_CHUNK_KEY", "faiss-chunk-key-0123456789abcdef")
    folder = tmp_path / "rag"
    make_index(folder, "ivf", vectors=6000)
    retention = {"daily": 5, "weekly": 0, "monthly": 0}
    plain_source = faiss_source(folder, probes={"nprobe": 4}, retention=retention)
    stream_plan = _plan(tmp_path, age_key, [plain_source])
    (stream,) = BackupService.from_path(stream_plan).backup("rag")
    assert "tar" in stream.layers

    blob_source = {**plain_source, "chunk_key": "env:SPARK_TEST_FAISS_CHUNK_KEY"}
    plan = _plan(tmp_path, age_key, [blob_source])
    service = BackupService.from_path(plan)
    (first,) = service.backup("rag")
    assert "tar" not in first.layers and first.source_metadata["new_chunks"] > 0
    store = service.store_for(service.source("rag"))
    assert existing_packs(store, "rag")
    with open(folder / "docstore.jsonl", "a") as handle:
        handle.write(json.dumps({"id": "doc-new", "text": "one more passage"}) + "\n")
    (second,) = service.backup("rag")
    index_bytes = (folder / "index.faiss").stat().st_size
    assert second.source_metadata["added_bytes"] < index_bytes / 4, second.source_metadata

    listed = json.loads(run_cli("--plan", str(plan), "list", "--kind", "faiss", "--json").stdout)
    assert [r["id"] for r in listed] == [stream.id, first.id, second.id]
    assert all(r["catalogue"]["index_type"] == "IndexIVFFlat" for r in listed)
    identities = service.identities(age_key[0])
    for copy in (stream, first, second):
        for keys in (None, identities):
            outcome = service.verify(service.find(copy.id), keys)
            assert outcome.ok, (copy.id, outcome.error)
        target = tmp_path / f"restored-{copy.id}"
        service.restore(copy.id, target, identity_file=age_key[0])
        assert probe_restored(copy, target).passed
    assert (tmp_path / f"restored-{second.id}" / "docstore.jsonl").read_bytes() == (
        folder / "docstore.jsonl"
    ).read_bytes()
    report = service.drill("rag", identity_file=age_key[0])
    assert report.passed, report

    # One copy a day is kept: the stream copy and the first version expire, the second keeps
    # every pack it shares with the first.
    service.prune(dry_run=False)
    assert [c.manifest.id for c in service.copies("rag")] == [second.id]
    assert service.verify(service.find(second.id), identities).ok

    # By hand: the llm runbook's block restores a version of any kind.
    result = restore_by_hand(tmp_path / "store", "rag", age_key[0], tmp_path / "by-hand")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("index.faiss", "ids.json", "docstore.jsonl"):
        assert _sha256(tmp_path / "by-hand" / name) == _sha256(folder / name)
    probe = tmp_path / "probe.py"
    probe.write_text(_block("python", "# python3 probe.py"))
    checked = subprocess.run(
        [sys.executable, str(probe), str(tmp_path / "by-hand"), "index.faiss"],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0 and "answered identically" in checked.stdout, checked.stderr
