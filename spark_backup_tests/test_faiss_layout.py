"""The layout of FAISS index files (``sources/faiss/layout.py``): the regions the blob layer cuts
an index at, read without FAISS, and what they keep of a grown index."""

from __future__ import annotations

import os
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from spark_backup.engine.blobs import chunker
from spark_backup.service import BackupService
from spark_backup.sources.blob_versions import read_committed_document
from spark_backup.sources.faiss.layout import index_regions
from spark_backup_tests.faiss_data import faiss_source, make_index
from spark_backup_tests.helpers import plan_dict, write_plan

DIMENSION = 16


def _vectors(count: int, seed: int = 3, dimension: int = DIMENSION) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, dimension)).astype("float32")


def _regions_of(path: Path) -> list[tuple[int, int]] | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return index_regions(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _written(tmp_path: Path, index, name: str = "index.faiss") -> Path:
    import faiss

    path = tmp_path / name
    faiss.write_index(index, str(path))
    return path


def _assert_covers(regions: list[tuple[int, int]], size: int) -> None:
    assert regions[0][0] == 0 and regions[-1][1] == size
    assert all(a[1] == b[0] for a, b in pairwise(regions))
    assert all(begin < end for begin, end in regions)


@pytest.mark.parametrize(
    "metric, header",
    [("L2", 45), ("INNER_PRODUCT", 45), ("Lp", 49)],
    ids=["l2", "ip", "lp-with-arg"],
)
def test_a_flat_index_is_its_header_then_its_vectors(tmp_path, metric, header) -> None:
    import faiss

    index = faiss.IndexFlat(DIMENSION, getattr(faiss, f"METRIC_{metric}"))
    if metric == "Lp":
        index.metric_arg = 3.0
    index.add(_vectors(500))
    path = _written(tmp_path, index)
    assert _regions_of(path) == [(0, header), (header, path.stat().st_size)]
    assert path.stat().st_size - header == 500 * DIMENSION * 4


@pytest.mark.parametrize(
    "factory, count, direct_map",
    [
        ("IVF32,Flat", 3000, None),
        ("IVF32,PQ4", 3000, None),
        ("IVF32,SQ8", 3000, None),
        ("IVF256,Flat", 60, None),  # most lists empty: FAISS writes their sizes sparse
        ("IVF32,Flat", 0, None),
        ("IVF32,Flat", 3000, "Array"),
        ("IVF32,Flat", 3000, "Hashtable"),
    ],
)
def test_an_ivf_index_is_cut_at_each_inverted_list(tmp_path, factory, count, direct_map) -> None:
    """Each non-empty list's codes and ids are one region, of the size FAISS says."""
    import faiss

    index = faiss.index_factory(DIMENSION, factory)
    index.train(_vectors(9000, seed=1))
    if direct_map:
        index.set_direct_map_type(getattr(faiss.DirectMap, direct_map))
    if count:
        index.add(_vectors(count))
    path = _written(tmp_path, index)
    regions = _regions_of(path)
    assert regions is not None
    _assert_covers(regions, path.stat().st_size)
    lists = index.invlists
    expected = [
        lists.list_size(i) * (lists.code_size + 8) for i in range(index.nlist) if lists.list_size(i)
    ]
    assert [end - begin for begin, end in regions[1:]] == expected


@pytest.mark.parametrize("factory", ["HNSW8", "IDMap,Flat", "PCA8,IVF16,Flat"])
def test_other_layouts_are_left_to_fastcdc(tmp_path, factory) -> None:
    import faiss

    index = faiss.index_factory(DIMENSION, factory)
    index.train(_vectors(2000, seed=1))
    data = _vectors(1000)
    if factory.startswith("IDMap"):
        index.add_with_ids(data, np.arange(1000))
    else:
        index.add(data)
    assert _regions_of(_written(tmp_path, index)) is None


def test_a_damaged_or_cut_index_is_left_to_fastcdc(tmp_path) -> None:
    import faiss

    flat = faiss.IndexFlatL2(DIMENSION)
    flat.add(_vectors(100))
    ivf = faiss.index_factory(DIMENSION, "IVF16,Flat")
    ivf.train(_vectors(2000, seed=1))
    ivf.add(_vectors(500))
    for name, index in (("flat", flat), ("ivf", ivf)):
        data = _written(tmp_path, index, f"{name}.faiss").read_bytes()
        cut = tmp_path / f"{name}-cut.faiss"
        cut.write_bytes(data[: len(data) - 100])
        assert _regions_of(cut) is None
        lists = data.find(b"ilar")
        if lists > 0:  # a list count that does not match the IVF header's
            damaged = tmp_path / f"{name}-damaged.faiss"
            damaged.write_bytes(data[: lists + 4] + (17).to_bytes(8, "little") + data[lists + 12 :])
            assert _regions_of(damaged) is None
    (tmp_path / "short.faiss").write_bytes(b"IwFl\x10\x00")
    assert _regions_of(tmp_path / "short.faiss") is None


def _grow_lists(path: Path, lists: int) -> None:
    """Vectors added next to the centroids of ``lists`` inverted lists: those lists grow, the
    others are written again as they were."""
    import faiss

    index = faiss.read_index(str(path))
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    picks = np.repeat(np.arange(lists), 40)
    noise = 0.001 * np.random.default_rng(5).standard_normal((len(picks), index.d))
    index.add((centroids[picks] + noise).astype("float32"))
    faiss.write_index(index, str(path))


def test_a_grown_index_adds_about_its_grown_lists(tmp_path, age_key, monkeypatch) -> None:
    """On the blob layer the index is cut at its structure: a second version whose index grew
    in 2 of its 16 lists adds about those lists, a flat index grown at its end about the new
    vectors; the version document says how the index was cut, and both restore."""
    monkeypatch.setenv("SPARK_TEST_FAISS_CHUNK_KEY", "faiss-chunk-key-0123456789abcdef")
    sources = []
    for kind in ("ivf", "flat"):
        folder = tmp_path / kind
        make_index(folder, kind, vectors=20000)
        sources.append(
            faiss_source(
                folder, name=kind, chunk_key="env:SPARK_TEST_FAISS_CHUNK_KEY", probes={"nprobe": 4}
            )
        )
    plan = plan_dict([age_key[1]], sources)
    plan["encryption"]["identity_file"] = str(age_key[0])
    service = BackupService.from_path(write_plan(tmp_path, plan))
    identities = service.identities(age_key[0])
    for name in ("ivf", "flat"):
        service.backup(name)
    size_before = (tmp_path / "ivf" / "index.faiss").stat().st_size
    _grow_lists(tmp_path / "ivf" / "index.faiss", lists=2)
    (grown,) = service.backup("ivf")
    grown_bytes = (tmp_path / "ivf" / "index.faiss").stat().st_size
    lists_bytes = size_before // 16  # two lists of about 1/16 of the index each, grown
    assert grown.source_metadata["added_bytes"] < 2 * lists_bytes + grown_bytes - size_before

    import faiss

    flat_path = tmp_path / "flat" / "index.faiss"
    flat = faiss.read_index(str(flat_path))
    flat.add(_vectors(100, dimension=flat.d))
    faiss.write_index(flat, str(flat_path))
    (appended,) = service.backup("flat")
    assert appended.source_metadata["added_bytes"] < 2 * chunker.MAXIMUM + 100 * flat.d * 4

    for copy in (grown, appended):
        assert copy.tools["faiss"] == faiss.__version__  # the inspection process's
        document = read_committed_document(service.find(copy.id), identities)
        (index_entry,) = [f for f in document["files"] if f["path"] == "index.faiss"]
        assert index_entry["cut"]["every"] == chunker.MAXIMUM
        assert max(c[2] for c in index_entry["chunks"]) <= chunker.MAXIMUM
        target = tmp_path / f"restored-{copy.id}"
        service.restore(copy.id, target, identity_file=age_key[0])
        assert (target / "index.faiss").read_bytes() == (
            tmp_path / copy.source / "index.faiss"
        ).read_bytes()


CRASHED = "/data/index.faiss: FAISS could not inspect the index "


@pytest.mark.parametrize(
    "code, message",
    [
        (
            "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
            CRASHED + "(it ended with signal 11)",
        ),
        (
            "raise RuntimeError('Error in faiss::read_index')",
            CRASHED + "(RuntimeError: Error in faiss::read_index)",
        ),
        (
            'print(\'{"error": "/data/index.faiss: not a FAISS index (bad)"}\')',
            "/data/index.faiss: not a FAISS index (bad)",
        ),
    ],
    ids=["crash", "traceback", "rejected"],
)
def test_a_failed_inspection_process_is_one_line(code, message) -> None:
    """FAISS crashing on a damaged index, or failing otherwise, fails the backup with one line
    naming the index; a SourceError of the inspection is passed on as it is."""
    import subprocess
    import sys

    from spark_backup.errors import SourceError
    from spark_backup.sources.faiss import inspection

    worker = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    with pytest.raises(SourceError) as raised:
        inspection.answer(worker, "/data/index.faiss")
    assert str(raised.value) == message


def _probes_request(index_path: Path) -> dict:
    """An inspection request for two probe queries (the inspection process's protocol)."""
    return {
        "label": str(index_path),
        "factory": None,
        "queries": 2,
        "k": 3,
        "seed": 1,
        "nprobe": 2,
        "ef_search": 16,
    }


def running_environment(worker) -> list[bytes]:
    """The worker's environment once its new program has it. Popen returns when exec has closed
    the error pipe, a moment before the kernel records the new environment: /proc reads empty
    in that window (and after the process has exited, which FAISS's import outlasts)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and worker.poll() is None:
        environ = Path(f"/proc/{worker.pid}/environ").read_bytes()
        if environ:
            return environ.split(b"\0")
        time.sleep(0.005)
    raise AssertionError("the inspection process ended before its environment could be read")


def test_the_inspection_process_gets_no_secret(tmp_path, monkeypatch) -> None:
    """The backup's private key and store credentials stay in its own environment: the FAISS
    process is given only what Python needs (read from /proc while it imports FAISS)."""
    from spark_backup.sources.faiss import inspection

    monkeypatch.setenv("SPARK_BACKUP_IDENTITY", "AGE-SECRET-KEY-1NOTREAL")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-real-either")
    index_path = make_index(tmp_path, "flat", vectors=64)
    with open(index_path, "rb") as handle:
        worker = inspection.start(handle.fileno(), _probes_request(index_path))
        environ = running_environment(worker)
        found = inspection.answer(worker, str(index_path))
    names = {item.split(b"=", 1)[0] for item in environ if item}
    assert b"PATH" in names
    assert not names & {b"SPARK_BACKUP_IDENTITY", b"AWS_SECRET_ACCESS_KEY"}
    assert found["facts"]["ntotal"] == 64


def test_the_inspection_process_imports_nothing_from_the_working_directory(
    tmp_path, monkeypatch
) -> None:
    """The worker imports FAISS as installed: a ``faiss.py`` in the directory the backup was
    started from is never run (``python -P``)."""
    from spark_backup.sources.faiss import inspection

    index_path = make_index(tmp_path / "index", "ivf", vectors=500)
    planted = tmp_path / "cwd"
    planted.mkdir()
    (planted / "faiss.py").write_text("raise SystemExit('imported from the working directory')\n")
    monkeypatch.chdir(planted)
    with open(index_path, "rb") as handle:
        request = _probes_request(index_path)
        found = inspection.answer(inspection.start(handle.fileno(), request), str(index_path))
    assert found["facts"]["index_type"] == "IndexIVFFlat" and found["facts"]["ntotal"] == 500
    assert len(found["answers"]["ids"]) == 2
