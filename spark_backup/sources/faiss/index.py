"""FAISS itself, loaded only here and only when a faiss source is backed up, probed or
checked (``faiss-cpu``, the ``faiss`` extra): the catalogue facts of an index and its probe
queries."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from spark_backup.errors import SourceError

# FAISS writes a four-character code before every index ("IxF2", "IwFl", "IHNf", ...): ASCII
# letters and digits. Anything else is no index, and FAISS is never asked to parse it.
_FOURCC_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")

METRICS = {
    0: "INNER_PRODUCT",
    1: "L2",
    2: "L1",
    3: "Linf",
    4: "Lp",
    20: "Canberra",
    21: "BrayCurtis",
    22: "JensenShannon",
    23: "Jaccard",
    24: "NaNEuclidean",
    25: "ABS_INNER_PRODUCT",
}


def load_faiss() -> Any:
    if "numpy" not in sys.modules:
        _import_numpy_with_one_blas_thread()
    try:
        import faiss
    except ImportError:
        raise SourceError(
            "the faiss kind needs FAISS: pip install 'spark-backup[faiss]' (faiss-cpu)"
        ) from None
    return faiss


def _import_numpy_with_one_blas_thread() -> None:
    """numpy's OpenBLAS starts a thread per core when it loads, and each spins for about 0.1 s
    of CPU waiting for work that never comes: CPU taken from the backup's hashing, compression
    and encryption, which run meanwhile. Nothing here multiplies matrices with numpy (FAISS has
    its own BLAS, loaded afterwards with the environment as it was), so numpy gets one thread.
    A setting of the user's is kept; the variable exists only for numpy's import, and none of
    the backup's other threads reads the environment meanwhile."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass  # load_faiss says what is missing
    finally:
        del os.environ["OPENBLAS_NUM_THREADS"]


def check_header(path: Path | str, label: str) -> None:
    """A file that does not start with a FAISS four-character code is no index: one line
    naming it, before FAISS is even imported."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if len(head) < 4 or not set(head) <= _FOURCC_BYTES:
        raise SourceError(f"{label}: not a FAISS index (no FAISS index header)")


def read_index(path: Path | str, label: str | None = None) -> Any:
    """The index in ``path`` (a descriptor path such as ``/proc/self/fd/N`` reads the file a
    backup holds open); ``label`` names it in errors. A file that is not a FAISS index is one
    line naming it."""
    label = label or str(path)
    check_header(path, label)
    faiss = load_faiss()
    # Flat codes mapped from the file rather than copied into memory where FAISS can (the
    # pages are the page cache's, which the kernel can drop); other index types read whole.
    mapped = getattr(faiss, "IO_FLAG_MMAP_IFC", 0) | getattr(faiss, "IO_FLAG_READ_ONLY", 0)
    if mapped:
        try:
            return faiss.read_index(str(path), mapped)
        except RuntimeError:
            pass  # an index type FAISS cannot map: read it whole (and judge the file) below
    try:
        return faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), "unreadable")
        raise SourceError(f"{label}: not a FAISS index ({first.strip()[:160]})") from None


def describe(index: Any, factory: str | None) -> dict[str, Any]:
    """The catalogue facts of a loaded index."""
    faiss = load_faiss()
    concrete = faiss.downcast_index(index)
    if factory is None:
        try:
            factory = faiss.reverse_index_factory(index)
        except (AttributeError, RuntimeError):
            factory = None
    return {
        "dimension": int(index.d),
        "ntotal": int(index.ntotal),
        "metric": METRICS.get(int(index.metric_type), str(int(index.metric_type))),
        "index_type": type(concrete).__name__,
        "factory": factory,
        "is_trained": bool(index.is_trained),
    }


def _search_parameters(index: Any, nprobe: int | None, ef_search: int | None) -> None:
    faiss = load_faiss()
    concrete = faiss.downcast_index(index)
    if nprobe is not None and hasattr(concrete, "nprobe"):
        concrete.nprobe = nprobe
    if ef_search is not None and hasattr(concrete, "hnsw"):
        concrete.hnsw.efSearch = ef_search


def probe_queries(dimension: int, queries: int, seed: int) -> list[list[float]]:
    """Deterministic query vectors: float32 values from a seeded generator, stored in the copy
    so that a drill on another numpy asks the very same questions."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((queries, dimension)).astype("float32")
    return [[float(x) for x in row] for row in vectors]


def run_probes(
    index: Any,
    vectors: list[list[float]],
    k: int,
    nprobe: int | None = None,
    ef_search: int | None = None,
    path: Path | str | None = None,
) -> dict[str, Any]:
    """Search ``vectors`` and return the top-``k`` ids and distances (float32 values kept
    exactly: a float32 is a float64 without loss). ``path``: the file ``index`` was read from,
    for a flat L2 index searched a slice of its file at a time (``_search_flat_in_slices``)."""
    import numpy as np

    _search_parameters(index, nprobe, ef_search)
    queries = np.asarray(vectors, dtype="float32").reshape(len(vectors), int(index.d))
    found = _search_flat_in_slices(index, queries, k, path) if path is not None else None
    distances, ids = found if found is not None else index.search(queries, k)
    return {
        "k": k,
        "nprobe": nprobe,
        "ef_search": ef_search,
        "ids": [[int(i) for i in row] for row in ids],
        "distances": [[float(x) for x in row] for row in distances],
    }


FLAT_SLICE = 16 << 20  # bytes of vectors a flat index is searched by at a time


def _search_flat_in_slices(index: Any, queries: Any, k: int, path: Path | str) -> Any:
    """(distances, ids) of an exact L2 flat index, as its own search gives them, with its
    vectors read from ``path`` ``FLAT_SLICE`` bytes at a time; None where that cannot be
    promised. Searching the mapped index itself would bring every page of the file into the
    process (a 256 MB index made a 322 MB backup). Each slice is searched by ``knn_L2sqr``, as
    the index's own search is: the same distance kernel per pair while fewer queries than FAISS's BLAS threshold
    are asked, and FAISS keeps, of equal distances, the lowest ids (below its reservoir's k),
    which the merge by (distance, id) repeats. Inner-product indexes break ties otherwise and are searched whole.
    The vectors are the file's last ``ntotal * d * 4`` bytes, as FAISS writes a flat index:
    checked against the index's first and last vector before any slice is used."""
    import numpy as np

    faiss = load_faiss()
    concrete = faiss.downcast_index(index)
    count, dimension = int(concrete.ntotal), int(concrete.d)
    if (
        type(concrete) not in (faiss.IndexFlatL2, faiss.IndexFlat)
        or int(concrete.metric_type) != faiss.METRIC_L2
        or len(queries) >= faiss.cvar.distance_compute_blas_threshold
        or not 1 <= k < faiss.cvar.distance_compute_min_k_reservoir
        or count < k
        or concrete.cached_l2norms.size()
    ):
        return None
    row = dimension * 4
    with open(path, "rb") as handle:
        start = os.fstat(handle.fileno()).st_size - count * row
        if start < 0:
            return None
        for number in (0, count - 1):
            if os.pread(handle.fileno(), row, start + number * row) != (
                concrete.reconstruct(number).tobytes()
            ):
                return None
        per = max(1, FLAT_SLICE // row)
        vectors = np.empty((min(per, count), dimension), dtype="float32")
        found_d, found_i = [], []
        # One OpenMP thread: a few queries over a slice are milliseconds of work, and FAISS's
        # threads spun waiting between slices (7% of a 256 MB index's backup).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            for first in range(0, count, per):
                rows = min(per, count - first)
                view = memoryview(vectors).cast("B")[: rows * row]
                if os.preadv(handle.fileno(), [view], start + first * row) != len(view):
                    return None  # the file changed under the backup: its check will say so
                distances, ids = faiss.knn(queries, vectors[:rows], k)
                found_d.append(distances)
                found_i.append(np.where(ids >= 0, ids + first, ids))
        finally:
            faiss.omp_set_num_threads(threads)
    distances, ids = np.concatenate(found_d, axis=1), np.concatenate(found_i, axis=1)
    best_d = np.empty((len(queries), k), dtype="float32")
    best_i = np.empty((len(queries), k), dtype="int64")
    for query in range(len(queries)):
        kept = ids[query] >= 0
        d, i = distances[query][kept], ids[query][kept]
        order = np.lexsort((i, d))[:k]
        best_d[query], best_i[query] = d[order], i[order]
    return best_d, best_i


def results_digest(results: dict[str, Any]) -> str:
    """A digest of the ids and distances alone, recorded in the manifest."""
    canonical = json.dumps(
        {"ids": results["ids"], "distances": results["distances"]}, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def compare(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """What differs between the stored answers and the restored index's, query by query."""
    problems = []
    for number, (want_ids, got_ids, want_d, got_d) in enumerate(
        zip(expected["ids"], found["ids"], expected["distances"], found["distances"], strict=True)
    ):
        if want_ids != got_ids:
            problems.append(f"query {number}: ids {got_ids[:5]}... instead of {want_ids[:5]}...")
        elif want_d != got_d:
            worst = max(abs(a - b) for a, b in zip(want_d, got_d, strict=True))
            problems.append(f"query {number}: distances differ by up to {worst:.3g}")
    return problems
