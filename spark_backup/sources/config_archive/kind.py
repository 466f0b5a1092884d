"""Configuration archives: DGX, Kubernetes and VPN configuration trees as POSIX tar streams.

Backup: ``reader.py`` walks the trees and GNU tar writes the archive. Restore extracts with
``engine.safe_tar`` into a staging folder (``engine.staging``) that is published only after the
copy's checksums were confirmed; existing files are never overwritten unless asked to.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrage import x25519

from spark_backup.engine.cadence import utcnow
from spark_backup.engine.manifest import Manifest
from spark_backup.engine.staging import remove_tree
from spark_backup.engine.streams import Readable, drain
from spark_backup.errors import IntegrityError, SparkBackupError, UsageError
from spark_backup.sources.base import (
    Artifact,
    CopyRef,
    Observable,
    Runtime,
    SemanticCheck,
    SourceContext,
    SourceKind,
    restore_tar_copy,
)
from spark_backup.sources.config_archive.names import CHANGED_FILES, KIND_NAME, TORN_FILES
from spark_backup.sources.config_archive.settings import ConfigArchiveSource

if TYPE_CHECKING:
    from spark_backup.sources.capability_values import FolderRestore, Observation, SemanticResult
    from spark_backup.sources.config_archive.reader import ConfigArchiveReader

ARCHIVE = "archive"


class ConfigArchiveKind(SourceKind[ConfigArchiveSource], Observable, SemanticCheck):
    name = KIND_NAME
    settings = ConfigArchiveSource
    labels = frozenset({"tar"})
    semantic_check_name = "tree"

    def artifacts(self, source: ConfigArchiveSource, context: SourceContext) -> list[Artifact]:
        return [
            Artifact(
                ARCHIVE,
                source.cadence,
                context.max_age,
                primary=True,
                description=f"{source.cadence} tar archives of {', '.join(source.paths)}",
            )
        ]

    def artifact_of(self, manifest: Manifest) -> str:
        return ARCHIVE

    def readers(
        self, source: ConfigArchiveSource, context: SourceContext, artifact: str = ARCHIVE
    ) -> list[ConfigArchiveReader]:
        from spark_backup.sources.config_archive.reader import ConfigArchiveReader

        if artifact != ARCHIVE:
            raise UsageError(f"source {source.name!r} has no artifact {artifact!r} ({ARCHIVE})")
        return [
            ConfigArchiveReader(
                source.name,
                [context.resolve(p) for p in source.paths],
                include=source.include,
                exclude=source.exclude,
                one_file_system=source.one_file_system,
                allow_torn_files=source.allow_torn_files,
            )
        ]

    def probe(self, source: ConfigArchiveSource, context: SourceContext) -> None:
        """Walk the paths as a backup would, reading nothing but names."""
        self.readers(source, context)[0].collect()

    def restore_to_folder(
        self,
        copy: CopyRef,
        identities: list[x25519.Identity],
        target: Path,
        options: FolderRestore,
    ) -> dict[str, Any]:
        return restore_tar_copy(copy, identities, target, options)

    def cautions(self, manifest: Manifest) -> list[str]:
        # Copies made before changed files were recorded have no such list.
        recorded = manifest.source_metadata
        return [
            f"{path} was torn: it shrank while the backup read it, and the copy holds it padded "
            "with zeros"
            for path in recorded.get(TORN_FILES, [])
        ] + [
            f"{path} was torn: it changed while the backup read it, and the copy holds as many "
            "bytes as it had when the read began, which may mix its old and new content"
            for path in recorded.get(CHANGED_FILES, [])
        ]

    def check_plaintext(self, plain: Readable, manifest: Manifest) -> None:
        """The archive must list the files and links the backup recorded. (Not their bytes: the
        walk sizes a file before tar reads it, and a live file may grow in between; the
        plaintext sha256 covers the content.)"""
        from spark_backup.engine.safe_tar import count_members  # tarfile: where a tar is read
        from spark_backup.engine.tar_stream import TarFormatError

        try:
            counts = asdict(count_members(plain))
        except TarFormatError as exc:
            raise IntegrityError(f"copy {manifest.id}: not a readable tar archive: {exc}") from None
        recorded = manifest.source_metadata
        for name in ("files", "symlinks"):
            if name in recorded and counts[name] != recorded[name]:
                raise IntegrityError(
                    f"copy {manifest.id}: archive holds {counts[name]} {name}, the manifest "
                    f"recorded {recorded[name]}"
                )

    def observe(self, source: ConfigArchiveSource, context: SourceContext) -> Observation:
        """A digest of every member's name, type, size, mode and mtime, as a backup would walk
        them: it changes when anything a backup would archive changed."""
        from spark_backup.sources.capability_values import Observation

        reader = self.readers(source, context)[0]
        digest = hashlib.sha256()
        for member in reader.members():
            st = os.lstat(member)
            digest.update(
                f"{member}\0{stat.S_IFMT(st.st_mode)}\0{st.st_mode}\0{st.st_size}\0"
                f"{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape")
            )
        stats = reader.stats
        return Observation(
            digest.hexdigest()[:16],
            {"files": stats.files, "directories": stats.directories, "bytes": stats.bytes},
        )

    def semantic_check(
        self,
        runtime: Runtime,
        copy: CopyRef,
        identities: list[x25519.Identity],
        scratch: Path,
    ) -> SemanticResult:
        """Restore into ``scratch`` and count what arrived against what the backup archived;
        every regular file must read to its end. Then what the source's ``drill`` asks for: the
        Kubernetes manifests validated (and applied into a namespace of the drill's own), the
        WireGuard configurations parsed and brought up as a tunnel, the OpenVPN configurations
        parsed with every file they name."""
        from spark_backup.sources.capability_values import FolderRestore, SemanticResult

        target = scratch / "tree"
        try:
            self.restore_to_folder(copy, identities, target, FolderRestore())
            files = symlinks = size = 0
            for directory, folders, names in os.walk(target):
                for name in (*folders, *names):
                    path = os.path.join(directory, name)
                    st = os.lstat(path)
                    if stat.S_ISLNK(st.st_mode):
                        symlinks += 1
                    elif stat.S_ISREG(st.st_mode):
                        files += 1
                        with open(path, "rb") as handle:
                            size += drain(handle)
            recorded = copy.manifest.source_metadata
            expected = (recorded.get("files"), recorded.get("symlinks"))
            passed = expected == (files, symlinks)
            descriptions = [
                f"restored {files} files and {symlinks} links"
                + ("" if passed else f"; the backup archived {expected[0]} and {expected[1]}")
            ]
            metrics: dict[str, Any] = {"files": files, "symlinks": symlinks, "bytes": size}
            for check in self._drill_checks(runtime, copy.manifest.source):
                result = check(target, scratch)
                passed = passed and result.passed
                descriptions.append(result.description)
                metrics.update(result.metrics)
        finally:
            remove_tree(target)
        return SemanticResult(passed, "; ".join(descriptions), metrics)

    def _drill_checks(self, runtime: Runtime, source_name: str) -> list:
        """The source's ``drill`` checks, each (restored tree, scratch) -> a result with
        ``passed``, ``description`` and ``metrics``."""
        try:
            source = runtime.source(source_name)
        except SparkBackupError:
            return []  # a copy of a source the plan no longer has: the tree check alone
        if not isinstance(source, ConfigArchiveSource):
            return []
        checks = []
        if source.drill.kubernetes is not None:
            from spark_backup.sources.config_archive.kubernetes import kubernetes_drill

            kubernetes = source.drill.kubernetes
            checks.append(
                lambda tree, scratch: kubernetes_drill(tree, kubernetes, scratch, utcnow())
            )
        if source.drill.wireguard is not None:
            from spark_backup.sources.config_archive.wireguard import wireguard_drill

            wireguard = source.drill.wireguard
            checks.append(lambda tree, scratch: wireguard_drill(tree, wireguard, scratch))
        if source.drill.openvpn is not None:
            from spark_backup.sources.config_archive.openvpn import openvpn_drill

            openvpn = source.drill.openvpn
            checks.append(lambda tree, scratch: openvpn_drill(tree, openvpn))
        return checks
