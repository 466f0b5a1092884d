"""age X25519 keys: parse recipients for backup, load identities for restore.

Copies are standard age files, so ``age -d -i KEY`` opens them without this project. Private keys
are read only where a restore or a deep verify runs, and never enter messages or logs: errors
name the file or variable they came from, not its contents.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyrage
from pyrage import x25519

from spark_backup.errors import CryptoError

IDENTITY_FILE_ENV = "SPARK_BACKUP_IDENTITY_FILE"
IDENTITY_ENV = "SPARK_BACKUP_IDENTITY"


def parse_recipient(text: str, origin: str) -> x25519.Recipient:
    try:
        return x25519.Recipient.from_str(text.strip())
    except pyrage.RecipientError:
        raise CryptoError(
            f"{origin}: not an age X25519 public key: {text.strip()[:16]!r}..."
        ) from None


def read_recipients_file(path: Path) -> list[str]:
    """Recipients in age's ``-R`` file format: one key per line, ``#`` comments."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CryptoError(f"{path}: recipients file not found") from None
    except OSError as exc:
        raise CryptoError(f"{path}: cannot read recipients file: {exc.strerror}") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise CryptoError(f"{path}: recipients file has no public keys")
    for key in keys:
        parse_recipient(key, str(path))
    return keys


@dataclass(frozen=True)
class Recipients:
    """The public keys a copy is encrypted to, as text (for manifests) and parsed (for pyrage)."""

    public_keys: tuple[str, ...]

    @classmethod
    def from_keys(cls, keys: Iterable[str], origin: str) -> Recipients:
        unique = tuple(dict.fromkeys(k.strip() for k in keys))
        if not unique:
            raise CryptoError(f"{origin}: no age recipients configured")
        for key in unique:
            parse_recipient(key, origin)
        return cls(unique)

    def parsed(self) -> list[x25519.Recipient]:
        return [x25519.Recipient.from_str(k) for k in self.public_keys]


def generate_identity(path: Path) -> str:
    """Write a new age identity file (mode 0600) the way ``age-keygen`` does; return its recipient."""
    identity = x25519.Identity.generate()
    public = str(identity.to_public())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(f"# public key: {public}\n{identity}\n")
    return public


def identity_from_environment() -> bool:
    """Whether an identity is given through the environment (it wins over the plan's)."""
    return bool(os.environ.get(IDENTITY_FILE_ENV) or os.environ.get(IDENTITY_ENV))


def load_identities(
    explicit_file: str | os.PathLike[str] | None = None, plan_file: Path | None = None
) -> list[x25519.Identity]:
    """Identities from, in order: an explicit file, $SPARK_BACKUP_IDENTITY_FILE,
    $SPARK_BACKUP_IDENTITY (the key text itself), the plan's ``encryption.identity_file``."""
    if explicit_file:
        return _identities_from_file(Path(explicit_file))
    if os.environ.get(IDENTITY_FILE_ENV):
        return _identities_from_file(Path(os.environ[IDENTITY_FILE_ENV]))
    if os.environ.get(IDENTITY_ENV):
        return identities_from_text(os.environ[IDENTITY_ENV], f"${IDENTITY_ENV}")
    if plan_file:
        return _identities_from_file(plan_file)
    raise CryptoError(
        f"no age identity to open the copy: pass --identity FILE, or set {IDENTITY_FILE_ENV} "
        f"or {IDENTITY_ENV}, or encryption.identity or encryption.identity_file in the plan"
    )


def _identities_from_file(path: Path) -> list[x25519.Identity]:
    try:
        text = path.expanduser().read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CryptoError(f"{path}: identity file not found") from None
    except OSError as exc:
        raise CryptoError(f"{path}: cannot read identity file: {exc.strerror}") from None
    return identities_from_text(text, str(path))


def identities_from_text(text: str, origin: str) -> list[x25519.Identity]:
    identities = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            identities.append(x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            # The line may be a private key: say where it is, never what it is.
            raise CryptoError(f"{origin}: line {number} is not an age X25519 identity") from None
    if not identities:
        raise CryptoError(f"{origin}: no age identities found")
    return identities
