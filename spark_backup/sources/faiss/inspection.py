"""FAISS's inspection of the index a backup holds open, in a process of its own.

The inspection (numpy's and FAISS's import, the load, the catalogue facts, the probe searches)
once ran on a thread of the backing-up process: the imports alone hold the interpreter lock
for about 0.2 s of CPU, and the chunking, hashing, compression and encryption threads waited
for the lock meanwhile (a 105 MB IVF index's copy took 0.25 s longer than with FAISS imported
beforehand). In a process of its own it takes a core, never the lock. A FAISS crash on a
damaged index fails the backup with one line instead of ending the process.

Protocol::

    python -P -m spark_backup.sources.faiss.inspection FD REQUEST
    FD:      the index, a descriptor inherited from the backup (read as /proc/self/fd/FD, so
             an index replaced by a rename meanwhile is still the one the backup archives)
    REQUEST: JSON {"label", "factory", "queries", "k", "seed", "nprobe", "ef_search"}

It writes one JSON object to standard output: {"facts", "answers", "probe_file" (the probe
file's text), "faiss" (FAISS's version)}, or {"error": ...} (the one-line ``SourceError``),
and exits 0; anything else (a traceback, a signal) is a failure the caller names.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import Any

from spark_backup.errors import SourceError
from spark_backup.sources.faiss import index as faiss_index

PROBES_FORMAT = "spark-backup.faiss-probes/v1"


def inspect(path: str, request: dict[str, Any]) -> dict[str, Any]:
    """The index's facts, its answers to the probe queries and the probe file's text."""
    loaded = faiss_index.read_index(path, request["label"])
    facts = faiss_index.describe(loaded, request["factory"])
    vectors = faiss_index.probe_queries(facts["dimension"], request["queries"], request["seed"])
    answers = faiss_index.run_probes(
        loaded, vectors, request["k"], request["nprobe"], request["ef_search"], path
    )
    probe_file = json.dumps(
        {"format": PROBES_FORMAT, "queries": vectors, **answers}, separators=(",", ":")
    )
    faiss = faiss_index.load_faiss()
    version = str(getattr(faiss, "__version__", "unknown"))
    return {"facts": facts, "answers": answers, "probe_file": probe_file, "faiss": version}


def start(fd: int, request: dict[str, Any]) -> subprocess.Popen:
    """The worker inspecting the index open on ``fd`` (the caller reads its answer with
    ``answer``)."""
    # Only what Python needs to run (as for the age worker): the backup's own environment holds
    # the private key and the store's credentials, which FAISS has no use for.
    from spark_backup.engine.processes import tool_environment

    # -P: spark-backup, numpy and FAISS as installed (or on PYTHONPATH), never a module of the
    # same name in the directory the backup was started from.
    return subprocess.Popen(
        [sys.executable, "-P", "-m", __name__, str(fd), json.dumps(request)],
        pass_fds=(fd,),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=tool_environment(),
    )


def answer(worker: subprocess.Popen, label: str) -> dict[str, Any]:
    """The worker's answer; ``SourceError`` naming ``label`` if it failed."""
    out, err = worker.communicate()
    try:
        found = json.loads(out) if worker.returncode == 0 else None
    except ValueError:
        found = None
    if isinstance(found, dict) and "error" in found:
        raise SourceError(str(found["error"]))
    if not isinstance(found, dict) or "facts" not in found:
        if worker.returncode < 0:
            why = f"it ended with signal {-worker.returncode}"
        else:
            lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
            why = lines[-1].strip()[:200] if lines else f"exit code {worker.returncode}"
        raise SourceError(f"{label}: FAISS could not inspect the index ({why})")
    return found


def main(argv: list[str]) -> int:
    fd, request = int(argv[0]), json.loads(argv[1])
    try:
        found = inspect(f"/proc/self/fd/{fd}", request)
    except SourceError as exc:
        found = {"error": str(exc)}
    sys.stdout.write(json.dumps(found, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    # A short-lived process that shares two cores with the copy it inspects: the cyclic
    # collector ran 76 times over numpy's and FAISS's import (a fifth of the process's CPU
    # under perf) and would again at exit, where freeing every module is work nobody waits for. The
    # answer is flushed, then the process leaves at once; a failure still ends as a traceback.
    gc.disable()
    status = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(status)
