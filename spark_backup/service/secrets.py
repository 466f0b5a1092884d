"""The secrets a plan names: each one's version, age and rotation verdict, never its value."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pyrage import x25519

from spark_backup.engine.cadence import utcnow
from spark_backup.engine.crypto import identities_from_text
from spark_backup.engine.secrets import (
    REDACTOR,
    RotationFinding,
    RotationPolicy,
    SecretRef,
    VaultSecrets,
)
from spark_backup.errors import SecretError, SecretsUnavailableError, UsageError
from spark_backup.plan import SourceSettings
from spark_backup.service.runtime import PlanRuntime


@dataclass(frozen=True)
class SecretStatus:
    """One reference in the plan: where it is written, and what reading it found."""

    path: str
    ref: SecretRef
    # None when the secret could not be read (``error`` says why).
    finding: RotationFinding | None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.finding is None or self.finding.failed


class SecretsOperations(PlanRuntime):
    def rotation_policy(self) -> RotationPolicy:
        rotation = self.plan.secrets.rotation
        return RotationPolicy(rotation.max_age, rotation.unknown_age == "fail")

    def secrets_status(
        self, source: SourceSettings | None = None, now: dt.datetime | None = None
    ) -> list[SecretStatus]:
        """Each reference the plan (or what ``source`` needs) holds, read and judged. A sealed
        or unreachable backend raises ``SecretsUnavailableError``: no verdict is given without
        the backend's word."""
        policy = self.rotation_policy()
        now = now or utcnow()
        statuses = []
        for path, ref in dict.fromkeys(self.secret_references(source)):
            try:
                secret = self.secrets.read(ref)
            except SecretsUnavailableError:
                raise
            except SecretError as exc:
                statuses.append(SecretStatus(path, ref, None, str(exc)))
                continue
            statuses.append(SecretStatus(path, ref, policy.judge(secret, now)))
        return statuses

    def rotate_identity(self) -> tuple[str, list[str], int | None]:
        """Add a new age identity in front of those ``encryption.identity`` holds in Vault, as a
        new version of that secret; return the new recipient, the old ones (which copies still
        need until they expire) and the secret's new version."""
        ref = self.plan.encryption.identity
        if ref is None or ref.scheme != "vault":
            raise UsageError(
                "encryption.identity is not a vault: reference: rotate-key keeps the identities "
                "in Vault (with identity_file, add a key with age-keygen and keep the old file)"
            )
        backend = self.secrets.backend("vault")
        assert isinstance(backend, VaultSecrets)
        current = self.secrets.resolve_for("encryption.identity", ref)
        old = [str(identity.to_public()) for identity in identities_from_text(current, str(ref))]
        new = x25519.Identity.generate()
        stamp = utcnow().date().isoformat()
        text = f"# added {stamp} by spark-backup secrets rotate-key\n{new}\n{current.strip()}\n"
        REDACTOR.add(str(new))
        version = backend.write(ref, text)
        return str(new.to_public()), old, version
