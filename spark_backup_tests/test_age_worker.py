"""One age worker process decrypts a whole deep verify (issue 12): many copies, one process
start; a damaged copy in the middle fails alone; a worker that dies is replaced."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyrage
import pytest
import zstandard
from pyrage import x25519

from spark_backup.engine import age_worker
from spark_backup.engine.pipeline import open_copy
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan


def _damage(service: BackupService, copy_id: str) -> None:
    ref = service.find(copy_id)
    path = Path(ref.store.object_uri(ref.manifest.data_key).removeprefix("file://"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_deep_verify_of_many_copies_starts_one_worker(
    service: BackupService, age_key, worker_starts
) -> None:
    copies = [m.id for _ in range(12) for m in service.backup("dgx_config")]
    _damage(service, copies[5])
    identities = service.identities(age_key[0])
    with service.decryption_worker(identities) as worker:
        outcomes = [service.verify(service.find(c), identities, None, worker) for c in copies]
    assert [o.ok for o in outcomes] == [i != 5 for i in range(12)]
    assert "age could not authenticate" in (outcomes[5].error or "")
    assert len(worker_starts) == 1
    assert worker_starts[0].poll() == 0  # told to stop, it exited on its own


def test_a_worker_that_died_is_replaced(service: BackupService, age_key, worker_starts) -> None:
    first, second = (m for _ in range(2) for m in service.backup("dgx_config"))
    identities = service.identities(age_key[0])
    with service.decryption_worker(identities) as worker:
        assert service.verify(service.find(first.id), identities, None, worker).ok
        worker_starts[0].kill()
        worker_starts[0].wait()
        assert service.verify(service.find(second.id), identities, None, worker).ok
    assert len(worker_starts) == 2


def test_a_reader_stopping_early_leaves_the_worker_usable(
    service: BackupService, age_key, worker_starts
) -> None:
    """The consumer gives up after a few bytes (an error of its own): the worker notices the
    closed pipe, reports, and decrypts the next copy as if nothing happened."""
    first, second = (m for _ in range(2) for m in service.backup("dgx_config"))
    identities = service.identities(age_key[0])
    with service.decryption_worker(identities) as worker:
        ref = service.find(first.id)
        with (
            pytest.raises(RuntimeError, match="consumer"),
            open_copy(ref.store, ref.manifest, identities, None, worker) as plain,
        ):
            plain.read(10)
            raise RuntimeError("consumer gave up")
        assert service.verify(service.find(second.id), identities, None, worker).ok
    assert len(worker_starts) == 1


def test_cli_deep_verify_of_many_copies(local_plan: Path, age_key) -> None:
    for _ in range(5):
        run_cli("--plan", str(local_plan), "backup", "dgx_config", check=True)
    done = run_cli(
        "--plan", str(local_plan), "verify", "--deep", "--identity", str(age_key[0]), check=True
    )
    assert "5 of 5 copies intact (deep verify" in done.stdout


def test_one_worker_reads_many_copies_from_s3(
    tmp_path: Path, seaweedfs, s3_bucket: str, age_key, estate: Path, worker_starts, monkeypatch
) -> None:
    """From a store without files the stored bytes reach the worker through a pipe a thread
    feeds: one worker, one feeding thread per copy, every copy read to its end."""
    monkeypatch.setenv("SPARK_TEST_S3_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("SPARK_TEST_S3_SECRET", seaweedfs.secret_key)
    store = {
        "name": "s3",
        "kind": "s3",
        "endpoint_url": seaweedfs.endpoint_url,
        "bucket": s3_bucket,
        "region_name": seaweedfs.region,
        "access_key_id_env": "SPARK_TEST_S3_KEY_ID",
        "secret_access_key_env": "SPARK_TEST_S3_SECRET",
    }
    plan = write_plan(
        tmp_path,
        plan_dict([age_key[1]], [config_source("etc", [str(estate)])], stores=[store]),
    )
    service = BackupService.from_path(plan)
    copies = [m.id for _ in range(3) for m in service.backup("etc")]
    identities = service.identities(age_key[0])
    with service.decryption_worker(identities) as worker:
        outcomes = [service.verify(service.find(c), identities, None, worker) for c in copies]
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    assert len(worker_starts) == 1


def test_the_worker_process_imports_only_what_decrypting_needs() -> None:
    """Every restore, verify and wal-fetch waits for a worker to start: its module, run as the
    worker, loads none of the calling side's helpers (key files, tool environments, the
    dataclass machinery they bring). Structural: the start-up time is the benchmarks'."""
    probe = (
        "import json, sys\n"
        "import spark_backup.engine.age_worker\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    modules = set(json.loads(done.stdout))
    assert "spark_backup.engine.age_worker" in modules
    for heavy in ("spark_backup.engine.crypto", "spark_backup.engine.processes", "tempfile"):
        assert heavy not in modules, heavy


def _decrypted_by_worker(stored: bytes, identity: x25519.Identity) -> tuple[bytes, dict]:
    with (
        age_worker.AgeWorker([identity]) as worker,
        worker.decrypting(io.BytesIO(stored), zstd=True) as decryption,
    ):
        plaintext = decryption.plaintext.read()
        return plaintext, decryption.finish()


def test_the_worker_imports_nothing_from_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """The process that is given the private keys runs spark-backup as installed: a
    ``spark_backup`` package in the directory the command was started from is never imported
    (``python -P``)."""
    planted = tmp_path / "spark_backup"
    planted.mkdir()
    (planted / "__init__.py").write_text(
        "raise SystemExit('imported from the working directory')\n"
    )
    monkeypatch.chdir(tmp_path)
    identity = x25519.Identity.generate()
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(b"plaintext\n")
    inflated, status = _decrypted_by_worker(pyrage.encrypt(frame, [identity.to_public()]), identity)
    assert inflated == b"plaintext\n" and "error" not in status, status


@pytest.mark.parametrize(
    ("damage", "detail"),
    [
        (lambda frame: frame, None),
        (lambda frame: frame[: len(frame) // 2], "ends inside a zstd frame"),
        (lambda frame: frame[:-1] + bytes([frame[-1] ^ 1]), "checksum"),
        (lambda frame: frame + frame, "after the end of the zstd frame"),
    ],
    ids=["whole", "cut short", "checksum", "trailing data"],
)
def test_the_worker_inflates_one_whole_checked_zstd_frame(damage, detail) -> None:
    """Restores have the worker inflate what it decrypts: a frame cut short, one whose
    checksum does not match and bytes after the frame are damage, reported as such."""
    identity = x25519.Identity.generate()
    plaintext = b"".join(b"line %d of a configuration file\n" % n for n in range(100_000))
    frame = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(plaintext)
    stored = pyrage.encrypt(damage(frame), [identity.to_public()])
    inflated, status = _decrypted_by_worker(stored, identity)
    if detail is None:
        assert status["ok"], status
        assert inflated == plaintext
        assert status["bytes"] == len(stored)
    else:
        assert not status["ok"]
        assert status["error"] == "zstd"
        assert detail in status["detail"]


def test_a_worker_started_before_its_identities_restores_a_copy(
    service: BackupService, age_key, worker_starts, tmp_path: Path
) -> None:
    """`spark-backup restore` starts its worker before it reads the plan; the worker waits for
    its identities after its imports and then serves the restore like any other."""
    [copy] = service.backup("dgx_config")
    with age_worker.AgeWorker() as worker:
        assert worker.start() is worker
        summary = service.restore(
            copy.id, tmp_path / "out", identity_file=age_key[0], worker=worker
        )
        assert worker.identities is not None
    assert summary["files"] == copy.source_metadata["files"] > 0
    assert len(worker_starts) == 1
    assert worker_starts[0].poll() == 0  # it had its identities: it exited on its own


def test_a_worker_that_died_before_its_identities_came_is_replaced(
    service: BackupService, age_key, worker_starts, tmp_path: Path
) -> None:
    [copy] = service.backup("dgx_config")
    with age_worker.AgeWorker() as worker:
        worker.start()
        worker_starts[0].kill()
        worker_starts[0].wait()
        summary = service.restore(
            copy.id, tmp_path / "out", identity_file=age_key[0], worker=worker
        )
    assert summary["files"] == copy.source_metadata["files"]
    assert len(worker_starts) == 2


def test_a_personal_data_copy_gives_an_early_worker_its_months_key(
    tmp_path: Path, age_key, estate: Path, worker_starts
) -> None:
    """A copy under a month's data key is opened with that key's identity: a worker started
    without identities gets it instead of the plan's (one process, not two)."""
    plan = plan_dict([age_key[1]], [config_source("hr", [str(estate)], personal_data=True)])
    service = BackupService.from_path(write_plan(tmp_path, plan))
    [copy] = service.backup("hr")
    assert copy.encryption.get("data_key")
    with age_worker.AgeWorker() as worker:
        worker.start()
        summary = service.restore(
            copy.id, tmp_path / "out", identity_file=age_key[0], worker=worker
        )
        assert worker.identities is not None
        assert str(service.identities(age_key[0])[0]) not in map(str, worker.identities)
    assert summary["files"] == copy.source_metadata["files"]
    assert len(worker_starts) == 1


def test_a_worker_never_given_identities_is_stopped_at_once(worker_starts) -> None:
    """A restore that fails before it decrypts (no such copy) closes a worker still waiting
    for its identities: killed, not waited for, and it leaves nothing running."""
    worker = age_worker.AgeWorker().start()
    with pytest.raises(RuntimeError, match="needs them"), worker.decrypting(io.BytesIO(b"")):
        pass
    worker.close()
    [process] = worker_starts
    assert process.returncode is not None
    worker.close()  # twice is harmless


def test_the_restore_command_with_its_early_worker(
    local_plan: Path, age_key, tmp_path: Path
) -> None:
    """The command's worker serves the restore; a restore that finds no copy ends at once."""
    [copy] = BackupService.from_path(local_plan).backup("dgx_config")
    copy_id = copy.id
    restored = run_cli(
        "--plan",
        str(local_plan),
        "restore",
        copy_id,
        "--to",
        str(tmp_path / "out"),
        "--identity",
        str(age_key[0]),
        check=True,
    )
    assert f"restored {copy_id}" in restored.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir())
    missing = run_cli(
        "--plan",
        str(local_plan),
        "restore",
        copy_id[:-1] + ("1" if copy_id.endswith("0") else "0"),
        "--to",
        str(tmp_path / "x"),
    )
    assert missing.returncode == 4, missing.stderr
