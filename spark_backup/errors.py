"""Errors that reach an operator.

Every error spark-backup raises on purpose is a ``SparkBackupError``: its message is one line that
names the file, field or object at fault, and its ``exit_code`` is what the CLI returns, so that
scripts can tell a bad plan from an unreachable store from a damaged copy. Messages never carry
secrets: callers pass names and references, never credential values; as a second line of
defence every message passes through the redactor of resolved secret values.
"""

from __future__ import annotations


class SparkBackupError(Exception):
    """Base class; ``exit_code`` is the CLI's exit status for this kind of failure."""

    exit_code = 1

    def __init__(self, *args: object):
        from spark_backup.engine.secrets.redact import REDACTOR

        super().__init__(*(REDACTOR.redact(a) if isinstance(a, str) else a for a in args))


class PlanError(SparkBackupError):
    """The protection plan is missing, malformed or inconsistent."""

    exit_code = 2


class UsageError(SparkBackupError):
    """A command was given a value it cannot use (a partition key that is no partition)."""

    exit_code = 2


class IntegrityError(SparkBackupError):
    """A stored copy does not match its manifest (checksum, size or format)."""

    exit_code = 3


class SignatureError(IntegrityError):
    """A copy's signature does not check (altered, forged, signed by an untrusted key), or an
    unsigned copy is not one the plan accepts: a verdict of its own, apart from damage."""

    exit_code = 11


class NotFoundError(SparkBackupError):
    """A source, copy or object that was asked for does not exist."""

    exit_code = 4


class StoreError(SparkBackupError):
    """A store could not be reached, refused a request, or failed part way."""

    exit_code = 5


class ObjectLockedError(StoreError):
    """A delete or overwrite was refused because the object is under retention or legal hold."""


class SourceError(SparkBackupError):
    """What the plan says to back up cannot be read."""

    exit_code = 6


class RestoreRefused(SparkBackupError):
    """A restore would write outside its target, overwrite files, or extract an unsafe member."""

    exit_code = 7


class CryptoError(SparkBackupError):
    """An age recipient or identity is malformed, missing, or does not open the copy."""

    exit_code = 8


class SecretError(SparkBackupError):
    """A secret reference names nothing, is not allowed, or its backend refused to read it."""

    exit_code = 9


class SecretsUnavailableError(SecretError):
    """The secrets backend is sealed or cannot be reached: nothing that needs a secret from it
    runs, and no weaker source is tried instead."""

    exit_code = 10


class ErasedError(CryptoError):
    """The copy's data key was destroyed by an erasure (crypto-shredding): it cannot be opened."""
