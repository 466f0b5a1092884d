"""The resolver: a reference in, a value out, from the backend the reference names, and every
value it hands out registered with the redactor first."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from spark_backup.engine.secrets.backends import EnvSecrets, SecretsBackend, SecretValue
from spark_backup.engine.secrets.config import SecretsConfig
from spark_backup.engine.secrets.redact import REDACTOR, Redactor
from spark_backup.engine.secrets.refs import SecretRef
from spark_backup.errors import SecretError


class SecretResolver:
    def __init__(
        self,
        backends: Mapping[str, SecretsBackend | Callable[[], SecretsBackend]],
        redactor: Redactor = REDACTOR,
    ):
        # A backend may be given as a factory: Vault's client is made only when a plan's
        # vault: reference is first read.
        self._backends = dict(backends)
        self._redactor = redactor
        self._cache: dict[SecretRef, SecretValue] = {}
        self._lock = threading.Lock()
        redactor.install_log_filter()

    def backend(self, scheme: str) -> SecretsBackend:
        with self._lock:
            backend = self._backends.get(scheme)
            if backend is None:
                raise SecretError(
                    f"{scheme}: references need a secrets.{scheme} section in the plan"
                )
            if callable(backend) and not hasattr(backend, "read"):
                backend = self._backends[scheme] = backend()
            return backend  # type: ignore[return-value]

    def read(self, ref: SecretRef) -> SecretValue:
        """The secret with its version and age (read once per resolver)."""
        if ref not in self._cache:
            secret = self.backend(ref.scheme).read(ref)
            self._redactor.add(secret.reveal())
            self._cache[ref] = secret
        return self._cache[ref]

    def resolve(self, ref: SecretRef) -> str:
        """The secret's value, for the one call that needs it."""
        return self.read(ref).reveal()

    def resolve_for(self, user: str, ref: SecretRef) -> str:
        """``resolve``, with errors that say who needed the secret (``store 'offsite'``)."""
        try:
            return self.resolve(ref)
        except SecretError as exc:
            raise type(exc)(f"{user}: {exc}") from None


def open_secrets(
    config: SecretsConfig,
    resolve: Callable[[str], Path],
    environ: Mapping[str, str] | None = None,
) -> SecretResolver:
    """The resolver a plan's ``secrets`` section describes: environment variables always,
    Vault where the section has one."""
    env = os.environ if environ is None else environ
    backends: dict[str, SecretsBackend | Callable[[], SecretsBackend]] = {"env": EnvSecrets(env)}
    vault = config.vault
    if vault is not None:

        def make_vault() -> SecretsBackend:
            from spark_backup.engine.secrets.backends import VaultSecrets

            address = vault.address or env.get("VAULT_ADDR")
            if not address:
                raise SecretError("secrets.vault.address: not set, and neither is VAULT_ADDR")
            return VaultSecrets(
                address,
                env.get(vault.token_env),
                namespace=vault.namespace,
                timeout=vault.timeout.total_seconds(),
                verify=str(resolve(vault.ca_cert)) if vault.ca_cert else True,
            )

        backends["vault"] = make_vault
    return SecretResolver(backends)
