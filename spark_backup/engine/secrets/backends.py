"""The secrets backends: environment variables (the embedded default) and HashiCorp Vault /
OpenBao KV version 2 through ``hvac``.

A backend reads one reference into a ``SecretValue`` with what is known of its age and version.
Errors name the reference and the backend's address, never a value. A sealed or unreachable
Vault is ``SecretsUnavailableError``, told apart by exception type, and nothing falls back to
another backend.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from spark_backup.engine.secrets.refs import SecretRef
from spark_backup.errors import SecretError, SecretsUnavailableError


@dataclass(frozen=True)
class SecretValue:
    """A resolved secret. ``repr`` and ``str`` never show the value; ``reveal`` does, for the
    one call that needs it (a connection, a passfile, a key)."""

    ref: SecretRef
    _value: str = field(repr=False)
    version: int | None = None
    # When this version was written; None where the backend cannot tell (environment).
    created_at: dt.datetime | None = None

    def reveal(self) -> str:
        return self._value

    def __str__(self) -> str:
        return f"<secret {self.ref}>"

    def age(self, now: dt.datetime) -> dt.timedelta | None:
        return now - self.created_at if self.created_at else None


class SecretsBackend(Protocol):
    scheme: str

    def read(self, ref: SecretRef) -> SecretValue: ...


class EnvSecrets:
    """Environment variables: no version and no age (the rotation check says so)."""

    scheme = "env"

    def __init__(self, environ: Mapping[str, str] | None = None):
        self._environ = os.environ if environ is None else environ

    def read(self, ref: SecretRef) -> SecretValue:
        value = self._environ.get(ref.location)
        if not value:
            raise SecretError(f"{ref}: environment variable {ref.location} is not set")
        return SecretValue(ref, value)


class VaultSecrets:
    """KV version 2 secrets of a Vault or OpenBao server, read with a token."""

    scheme = "vault"

    def __init__(
        self,
        address: str,
        token: str | None,
        *,
        namespace: str | None = None,
        timeout: float = 10.0,
        verify: bool | str = True,
    ):
        import hvac  # loads only where a plan names a vault: reference

        self.address = address
        self._client = hvac.Client(
            url=address, token=token, namespace=namespace, timeout=timeout, verify=verify
        )
        self._has_token = bool(token)

    def read(self, ref: SecretRef) -> SecretValue:
        mount, path, name = ref.vault_parts
        if not self._has_token:
            raise SecretError(f"{ref}: no Vault token (set the variable secrets.vault.token_env)")
        response = self._call(
            ref,
            lambda: self._client.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, raise_on_deleted_version=True
            ),
        )
        data = response.get("data") or {}
        fields = data.get("data") or {}
        metadata = data.get("metadata") or {}
        if name not in fields:
            raise SecretError(
                f"{ref}: the secret {mount}/{path} has no field {name!r} "
                f"(fields: {', '.join(sorted(fields)) or 'none'})"
            )
        value = fields[name]
        if not isinstance(value, str) or not value:
            raise SecretError(f"{ref}: field {name!r} is empty or not a string")
        return SecretValue(
            ref,
            value,
            version=metadata.get("version"),
            created_at=_parse_time(metadata.get("created_time")),
        )

    def write(self, ref: SecretRef, value: str) -> int:
        """Write ``value`` into the reference's field as a new version of the secret (its other
        fields kept); the new version's number."""
        mount, path, name = ref.vault_parts
        response = self._call(
            ref,
            lambda: self._client.secrets.kv.v2.patch(
                path=path, secret={name: value}, mount_point=mount
            ),
        )
        return int((response.get("data") or {}).get("version") or 0)

    def _call(self, ref: SecretRef, request: Any) -> Any:
        import hvac.exceptions
        import requests

        try:
            return request()
        except hvac.exceptions.VaultDown:
            raise SecretsUnavailableError(
                f"{ref}: Vault at {self.address} is sealed; unseal it (bao operator unseal) and "
                "run again. No other secrets source is tried"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise SecretsUnavailableError(
                f"{ref}: Vault at {self.address} cannot be reached ({type(exc).__name__}). "
                "No other secrets source is tried"
            ) from None
        except hvac.exceptions.InvalidPath:
            mount, path, _ = ref.vault_parts
            raise SecretError(
                f"{ref}: no secret {path!r} under KV v2 mount {mount!r} at {self.address}"
            ) from None
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized):
            raise SecretError(
                f"{ref}: Vault at {self.address} refused the token (permission denied)"
            ) from None
        except hvac.exceptions.VaultError as exc:
            raise SecretError(
                f"{ref}: Vault at {self.address} answered {type(exc).__name__}"
            ) from None


def _parse_time(text: Any) -> dt.datetime | None:
    if not isinstance(text, str) or not text:
        return None
    # Vault writes RFC 3339 with nanoseconds (2026-11-29T20:05:14.123456789Z).
    head, _, rest = text.rstrip("Z").partition(".")
    fraction = "".join(c for c in rest if c.isdigit())[:6]
    try:
        value = dt.datetime.fromisoformat(f"{head}.{fraction or '0'}")
    except ValueError:
        return None
    return value.replace(tzinfo=dt.UTC)
