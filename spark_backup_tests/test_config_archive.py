"""Configuration archives: what goes into the tar stream, and a restore that only ever writes
inside its staging target."""

from __future__ import annotations

import io
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from spark_backup.engine.pipeline import CompressionSettings, write_copy
from spark_backup.errors import RestoreRefused, SourceError
from spark_backup.globs import glob_to_regex
from spark_backup.service import BackupService
from spark_backup.sources.config_archive.reader import ConfigArchiveReader
from spark_backup_tests.helpers import BytesSource, config_source, plan_dict, run_cli, write_plan


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("*.swp", "/etc/wireguard/.wg0.conf.swp", True),
        ("*.swp", "/etc/wireguard/wg0.conf", False),
        ("/etc/kubernetes/**/*.yaml", "/etc/kubernetes/manifests/a/b.yaml", True),
        ("/etc/kubernetes/**/*.yaml", "/etc/kubernetes/b.yaml", True),
        ("/etc/kubernetes/*.yaml", "/etc/kubernetes/manifests/b.yaml", False),
        ("secrets/*.key", "/etc/app/secrets/tls.key", True),
        ("secrets/*.key", "/etc/app/secrets/sub/tls.key", False),
        ("wg?.conf", "/etc/wireguard/wg0.conf", True),
        ("wg[!0].conf", "/etc/wireguard/wg0.conf", False),
        ("wg[0-9].conf", "/etc/wireguard/wg7.conf", True),
        ("/etc/nvidia", "/etc/nvidia", True),
        ("/etc/nvidia", "/etc/nvidia/x", False),
    ],
)
def test_globs(pattern: str, path: str, matches: bool) -> None:
    assert bool(glob_to_regex(pattern).match(path)) is matches


def _members(service: BackupService, manifest, identity) -> dict[str, tarfile.TarInfo]:
    from spark_backup.engine.pipeline import open_copy

    ref = service.find(manifest.id)
    with (
        open_copy(ref.store, manifest, service.identities(identity)) as plain,
        tarfile.open(fileobj=plain, mode="r|") as archive,
    ):
        members = {m.name: m for m in archive}
    return members


def test_archive_keeps_modes_owners_mtimes_and_links(
    service: BackupService, estate: Path, age_key
) -> None:
    [manifest] = service.backup("dgx_config")
    members = _members(service, manifest, age_key[0])
    prefix = str(estate).lstrip("/")
    wg = members[f"{prefix}/wireguard/wg0.conf"]
    assert stat.S_IMODE(wg.mode) == 0o600
    assert wg.mtime == 1_700_000_000
    assert wg.uid == os.getuid() and wg.uname
    assert stat.S_IMODE(members[f"{prefix}/scripts/reload.sh"].mode) == 0o755
    link = members[f"{prefix}/nvidia/current.cfg"]
    assert link.issym() and link.linkname == "fabricmanager.cfg"
    assert members[f"{prefix}/empty"].isdir()
    assert f"{prefix}/wireguard/.wg0.conf.swp" not in members  # excluded by the plan
    assert manifest.source_metadata["files"] == 5
    assert manifest.source_metadata["symlinks"] == 1
    assert manifest.source_metadata["excluded"] == 1
    assert manifest.tools["tar"].startswith("tar (GNU tar)")


def test_include_selects_files_and_their_folders(tmp_path: Path, age_key, estate: Path) -> None:
    plan = plan_dict([age_key[1]], [config_source("k8s", [str(estate)], include=["*.yaml"])])
    service = BackupService.from_path(write_plan(tmp_path, plan))
    members = _members(service, service.backup("k8s")[0], age_key[0])
    files = sorted(n for n, m in members.items() if m.isfile())
    assert files == [f"{str(estate).lstrip('/')}/kube/manifests/ns.yaml"]
    assert f"{str(estate).lstrip('/')}/nvidia" not in members  # no folder without included files


def test_patterns_that_leave_nothing_are_an_error(tmp_path: Path, age_key, estate: Path) -> None:
    plan = plan_dict([age_key[1]], [config_source("k8s", [str(estate)], include=["*.nothing"])])
    service = BackupService.from_path(write_plan(tmp_path, plan))
    with pytest.raises(SourceError, match="left nothing to back up"):
        service.backup("k8s")


def test_special_files_are_skipped_with_a_warning(tmp_path: Path, age_key, estate: Path) -> None:
    os.mkfifo(estate / "nvidia" / "control.fifo")
    plan = plan_dict([age_key[1]], [config_source("dgx", [str(estate)])])
    [manifest] = BackupService.from_path(write_plan(tmp_path, plan)).backup("dgx")
    assert manifest.source_metadata["skipped_special"] == 1
    assert any("control.fifo" in w for w in manifest.source_metadata["warnings"])


def test_missing_path_is_one_line_and_nothing_is_written(tmp_path: Path, age_key) -> None:
    plan = plan_dict([age_key[1]], [config_source("vpn", [str(tmp_path / "etc/wireguard")])])
    result = run_cli("--plan", str(write_plan(tmp_path, plan)), "backup", "vpn")
    assert result.returncode == 6
    assert (
        result.stderr.strip()
        == f"error: source 'vpn': path {tmp_path / 'etc/wireguard'} does not exist"
    )
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.json"))


def test_file_vanishing_during_tar_aborts_the_copy(
    service: BackupService, estate: Path, monkeypatch
) -> None:
    original = ConfigArchiveReader.members

    def members_then_delete(self):
        names = list(original(self))
        (estate / "wireguard" / "wg0.conf").unlink()  # gone between the walk and tar
        yield from names

    monkeypatch.setattr(ConfigArchiveReader, "members", members_then_delete)
    with pytest.raises(SourceError, match=r"wg0.conf.*(No such file|Cannot stat)"):
        service.backup("dgx_config")
    assert service.copies() == []


def test_unreadable_file_found_during_the_walk_aborts_the_copy(
    service: BackupService, monkeypatch
) -> None:
    original = ConfigArchiveReader.members

    def members_then_fail(self):
        names = original(self)
        yield next(names)  # tar is already archiving when the walk fails
        yield next(names)
        raise SourceError("source 'dgx_config': cannot read /x: permission denied")

    monkeypatch.setattr(ConfigArchiveReader, "members", members_then_fail)
    with pytest.raises(SourceError, match="cannot read /x"):
        service.backup("dgx_config")
    assert service.copies() == []
    assert not [p for p in service.store("local").root.rglob("*") if p.is_file()]


@pytest.mark.parametrize("owner", ["nobody", "the walking user"])
def test_unreadable_file_is_named(tmp_path: Path, age_key, owner: str) -> None:
    """A file its reader may not read. Root reads everything, so as root the backup runs
    without the capabilities that bypass file permissions, and the file belongs to 'nobody'
    (readable by its owner alone) or to root without even its owner's read bit: the walk
    trusts the owner's read bit only when it is set."""
    import sys

    secret = tmp_path / "etc" / "secret.key"
    secret.parent.mkdir()
    secret.write_text("x")
    if os.geteuid() == 0:
        if owner == "nobody":
            os.chown(secret, 65534, 65534)
            secret.chmod(0o600)
        else:
            secret.chmod(0o044)  # others may read, the owner may not
        without_override = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    else:
        secret.chmod(0o000 if owner == "nobody" else 0o044)
        without_override = []
    plan = write_plan(
        tmp_path, plan_dict([age_key[1]], [config_source("etc", [str(secret.parent)])])
    )
    result = subprocess.run(
        [
            *without_override,
            sys.executable,
            "-m",
            "spark_backup",
            "--no-progress",
            "--plan",
            str(plan),
            "backup",
            "etc",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 6, result.stderr
    assert result.stderr.strip() == f"error: source 'etc': cannot read {secret}: permission denied"
    assert not list(tmp_path.rglob("*.json"))


# --- restore -----------------------------------------------------------------------------------


def _tar_bytes(build) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        build(archive)
    return buffer.getvalue()


def _store_tar(service: BackupService, build) -> str:
    service.store("local").check()  # creates the store's folder, as a backup does
    manifest = write_copy(
        service.store("local"),
        BytesSource(_tar_bytes(build), kind="config_archive", layers=["tar"]),
        source_name="dgx_config",
        partition="2026-11-23",
        recipients=service.recipients(),
        compression=CompressionSettings(),
    )
    return manifest.id


def _add(
    archive: tarfile.TarFile, name: str, *, data: bytes = b"x", kind=tarfile.REGTYPE, link: str = ""
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    archive.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (lambda a: _add(a, "/etc/passwd"), "absolute"),
        (lambda a: _add(a, "etc/../../escape.conf"), "contains '..'"),
        (
            lambda a: _add(a, "etc/link", kind=tarfile.SYMTYPE, link="../../../etc"),
            "leads outside the destination",
        ),
        (lambda a: _add(a, "etc/abs", kind=tarfile.SYMTYPE, link="/etc/shadow"), "absolute"),
        (
            lambda a: _add(a, "etc/hard", kind=tarfile.LNKTYPE, link="/etc/shadow"),
            "not to a file extracted before it",
        ),
        (lambda a: _add(a, "dev/sda", kind=tarfile.BLKTYPE), "special file"),
        (lambda a: _add(a, "dev/null", kind=tarfile.CHRTYPE), "special file"),
    ],
)
def test_restore_refuses_unsafe_members(
    service: BackupService, age_key, tmp_path: Path, build, reason: str
) -> None:
    copy_id = _store_tar(service, lambda a: (_add(a, "etc/ok.conf"), build(a)))
    target = tmp_path / "restore"
    with pytest.raises(RestoreRefused, match=f"refusing unsafe archive member .*{reason}"):
        service.restore(copy_id, target, identity_file=age_key[0])
    # Not even the safe member, no staging left, and the target it created removed again.
    assert not target.exists()
    assert not (tmp_path / "escape.conf").exists()


def test_skip_unsafe_restores_the_rest_and_reports(
    service: BackupService, age_key, tmp_path: Path
) -> None:
    copy_id = _store_tar(
        service,
        lambda a: (
            _add(a, "etc/ok.conf"),
            _add(a, "etc/localtime", kind=tarfile.SYMTYPE, link="/usr/share/zoneinfo/UTC"),
        ),
    )
    summary = service.restore(
        copy_id, tmp_path / "restore", identity_file=age_key[0], skip_unsafe=True
    )
    assert (tmp_path / "restore/etc/ok.conf").read_bytes() == b"x"
    assert not os.path.lexists(tmp_path / "restore/etc/localtime")
    assert len(summary["skipped"]) == 1 and summary["skipped"][0].startswith("etc/localtime")


def test_restore_never_overwrites_unless_told(
    service: BackupService, estate: Path, age_key, tmp_path: Path
) -> None:
    [manifest] = service.backup("dgx_config")
    target = tmp_path / "restore"
    service.restore(manifest.id, target, identity_file=age_key[0])
    restored = target / str(estate).lstrip("/") / "wireguard/wg0.conf"
    restored.write_text("edited by an operator")
    with pytest.raises(
        RestoreRefused, match=r"restore would overwrite .* and 3 more; .*--overwrite"
    ):
        service.restore(manifest.id, target, identity_file=age_key[0])
    assert restored.read_text() == "edited by an operator"
    assert [p.name for p in target.iterdir()] == [
        str(estate).lstrip("/").split("/")[0]
    ]  # no staging left

    service.restore(manifest.id, target, identity_file=age_key[0], overwrite=True)
    assert restored.read_text() == (estate / "wireguard/wg0.conf").read_text()


def test_restore_into_a_file_is_refused(service: BackupService, age_key, tmp_path: Path) -> None:
    [manifest] = service.backup("dgx_config")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RestoreRefused, match="exists and is not a directory"):
        service.restore(manifest.id, tmp_path / "file", identity_file=age_key[0])


def test_restored_tree_matches_the_estate(
    service: BackupService, estate: Path, age_key, tmp_path: Path
) -> None:
    from spark_backup.demo import compare_trees

    [manifest] = service.backup("dgx_config")
    summary = service.restore(manifest.id, tmp_path / "restore", identity_file=age_key[0])
    assert compare_trees([estate], tmp_path / "restore", exclude=["*.swp"]) == []
    assert summary["files"] == 5 and summary["symlinks"] == 1
    restored = tmp_path / "restore" / str(estate).lstrip("/")
    assert (restored / "wireguard/wg0.conf").stat().st_mtime == 1_700_000_000
    shutil.rmtree(tmp_path / "restore")


def _path_max_escape(archive: tarfile.TarFile) -> None:
    """The public proof of concept for CVE-2025-4517: symlink chains longer than PATH_MAX make
    tarfile's real-path check (before Python 3.11.13) miss a link that leaves the target."""
    long_dir, steps, path = "d" * 247, "abcdefghijklmnop", ""
    for step in steps:
        _add(archive, posixpath.join(path, long_dir), kind=tarfile.DIRTYPE)
        _add(archive, posixpath.join(path, step), kind=tarfile.SYMTYPE, link=long_dir)
        path = posixpath.join(path, long_dir)
    chain = posixpath.join(*steps, "l" * 254)
    _add(archive, chain, kind=tarfile.SYMTYPE, link="../" * len(steps))
    _add(archive, "escape", kind=tarfile.SYMTYPE, link=chain + "/../../outside")
    _add(archive, "escape/pwned.txt", data=b"written outside the target\n")


@pytest.mark.parametrize(
    ("build", "reason"),
    [
        (_path_max_escape, "goes through the archive's link 'a'"),
        (
            lambda a: (_add(a, "x", kind=tarfile.SYMTYPE, link="."), _add(a, "x/f")),
            "goes through the archive's link 'x'",
        ),
        (
            lambda a: (_add(a, "x", kind=tarfile.SYMTYPE, link="sub"), _add(a, "x")),
            "goes through the archive's link 'x'",
        ),
        (
            lambda a: (
                _add(a, "d1", kind=tarfile.DIRTYPE),
                _add(a, "d1/up", kind=tarfile.SYMTYPE, link=".."),
                _add(a, "x", kind=tarfile.SYMTYPE, link="d1"),
                _add(a, "y", kind=tarfile.SYMTYPE, link="x/up/.."),
            ),
            "'x/up/..' leads outside the destination",
        ),
        (
            lambda a: (
                _add(a, "x", kind=tarfile.SYMTYPE, link="."),
                _add(a, "y", kind=tarfile.SYMTYPE, link="x/../.."),
            ),
            "leads outside the destination",
        ),
        (
            # A '..' after a link in a member's name would be followed through the link.
            lambda a: (
                _add(a, "t", kind=tarfile.SYMTYPE, link="deep/er"),
                _add(a, "t/../b/pwned.txt"),
            ),
            "contains '..'",
        ),
        (
            # A hard link to a link: tarfile would re-create the link unfiltered at its place.
            lambda a: (
                _add(a, "1/2/s", kind=tarfile.SYMTYPE, link="../../etc/shadow"),
                _add(a, "h", kind=tarfile.LNKTYPE, link="1/2/s"),
            ),
            "not to a file extracted before it",
        ),
        (
            lambda a: (
                _add(a, "a", kind=tarfile.SYMTYPE, link="b"),
                _add(a, "b", kind=tarfile.SYMTYPE, link="a"),
            ),
            "leads outside the destination",
        ),
    ],
)
def test_restore_refuses_writes_through_the_archives_own_links(
    service: BackupService, age_key, tmp_path: Path, build, reason: str
) -> None:
    copy_id = _store_tar(service, build)
    target = tmp_path / "restore" / "target"
    with pytest.raises(RestoreRefused, match=reason):
        service.restore(copy_id, target, identity_file=age_key[0])
    assert not (tmp_path / "restore").exists()  # nothing published, no folder left


def test_links_between_members_that_stay_inside_are_restored(
    service: BackupService, age_key, tmp_path: Path
) -> None:
    """Shapes real configuration trees have: alternatives-style chains, Kubernetes ConfigMap
    mounts (``..data`` links), a versioned folder behind a ``current`` link, in any order."""
    copy_id = _store_tar(
        service,
        lambda a: (
            _add(a, "etc/nvidia/550", kind=tarfile.DIRTYPE),
            _add(a, "etc/nvidia/550/fm.cfg", data=b"fm"),
            _add(a, "etc/nvidia/a_fm.cfg", kind=tarfile.SYMTYPE, link="current/fm.cfg"),
            _add(a, "etc/nvidia/current", kind=tarfile.SYMTYPE, link="550"),
            _add(a, "etc/alias.cfg", kind=tarfile.SYMTYPE, link="nvidia/a_fm.cfg"),
            _add(a, "etc/up.cfg", kind=tarfile.SYMTYPE, link="../etc/nvidia/550/fm.cfg"),
            _add(a, "etc/cm/..2026_11_27", kind=tarfile.DIRTYPE),
            _add(a, "etc/cm/..2026_11_27/config.yaml", data=b"cm"),
            _add(a, "etc/cm/..data", kind=tarfile.SYMTYPE, link="..2026_11_27"),
            _add(a, "etc/cm/config.yaml", kind=tarfile.SYMTYPE, link="..data/config.yaml"),
            _add(a, "etc/nvidia/hard.cfg", kind=tarfile.LNKTYPE, link="etc/nvidia/550/fm.cfg"),
        ),
    )
    summary = service.restore(copy_id, tmp_path / "r", identity_file=age_key[0])
    assert summary["symlinks"] == 6 and summary["skipped"] == []
    for name in ("etc/alias.cfg", "etc/up.cfg", "etc/nvidia/a_fm.cfg", "etc/nvidia/hard.cfg"):
        assert (tmp_path / "r" / name).read_bytes() == b"fm", name
    assert (tmp_path / "r/etc/cm/config.yaml").read_bytes() == b"cm"


def test_a_path_below_a_linked_folder_is_archived_at_its_real_place(
    tmp_path: Path, age_key
) -> None:
    """Merged-/usr hosts reach /lib/... through /lib -> usr/lib: the archive holds the real path,
    so it restores and verifies like any other."""
    real = tmp_path / "usr" / "lib" / "nvidia"
    real.mkdir(parents=True)
    (real / "driver.conf").write_text("options nvidia NVreg_EnableGpuFirmware=0\n")
    (tmp_path / "lib").symlink_to("usr/lib")
    plan = write_plan(
        tmp_path, plan_dict([age_key[1]], [config_source("drv", [str(tmp_path / "lib/nvidia")])])
    )
    service = BackupService.from_path(plan)
    [manifest] = service.backup("drv")
    assert any("reached through a link" in w for w in manifest.source_metadata["warnings"])
    assert service.verify(service.find(manifest.id), service.identities(age_key[0])).ok
    service.restore(manifest.id, tmp_path / "r", identity_file=age_key[0])
    restored = tmp_path / "r" / str(real).lstrip("/") / "driver.conf"
    assert restored.read_text().startswith("options nvidia")
