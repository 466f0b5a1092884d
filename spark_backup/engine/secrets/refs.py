"""Secret references: how a plan names a secret without holding it.

``env:NAME`` is an environment variable (the embedded default); ``vault:MOUNT/PATH#FIELD`` is
field FIELD of the KV v2 secret PATH under mount MOUNT (``vault:kv/spark/pg#password``). A plan
field typed ``SecretReference`` accepts only these: anything else is taken for an inline secret
and refused, and the error names the field, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, PlainSerializer, PlainValidator

from spark_backup.engine.settings import ENV_NAME_PATTERN

SCHEMES = ("env", "vault")
_ENV_RE = re.compile(ENV_NAME_PATTERN)
_SEGMENT = r"[A-Za-z0-9_.-]+"
_VAULT_RE = re.compile(
    rf"^(?P<mount>{_SEGMENT})/(?P<path>{_SEGMENT}(?:/{_SEGMENT})*)#(?P<field>.+)$"
)
INLINE_REFUSED = (
    "inline secret is not allowed; write a reference: env:NAME or vault:MOUNT/PATH#FIELD"
)


@dataclass(frozen=True)
class SecretRef:
    """Where a secret is: ``scheme`` is the backend, ``location`` what it means to it."""

    scheme: str
    location: str

    def __str__(self) -> str:
        return f"{self.scheme}:{self.location}"

    @classmethod
    def env(cls, name: str) -> SecretRef:
        return parse_reference(f"env:{name}")

    @property
    def vault_parts(self) -> tuple[str, str, str]:
        """(mount, path, field) of a ``vault:`` reference."""
        match = _VAULT_RE.match(self.location)
        assert match, self
        return match["mount"], match["path"], match["field"]


def parse_reference(text: Any) -> SecretRef:
    """A reference from plan text; ``ValueError`` (that never repeats the text, which may be a
    secret someone pasted) for anything else."""
    if isinstance(text, SecretRef):
        return text
    if not isinstance(text, str):
        raise ValueError("expected a secret reference: env:NAME or vault:MOUNT/PATH#FIELD")
    scheme, sep, location = text.strip().partition(":")
    if not sep or scheme not in SCHEMES:
        raise ValueError(INLINE_REFUSED)
    if scheme == "env" and not _ENV_RE.match(location):
        raise ValueError("expected env:NAME with NAME an environment variable name")
    if scheme == "vault" and not _VAULT_RE.match(location):
        raise ValueError(
            "expected vault:MOUNT/PATH#FIELD, e.g. vault:kv/spark/pg#password (KV v2 mount, "
            "secret path, field)"
        )
    return SecretRef(scheme, location)


SecretReference = Annotated[
    SecretRef,
    PlainValidator(parse_reference),
    PlainSerializer(str, return_type=str),
]
"""A plan field that holds a reference to a secret, never its value."""


def env_reference(data: Any, legacy: str, field: str) -> Any:
    """Read an older plan's ``<field>_env: NAME`` as ``<field>: env:NAME`` (one way to name a
    secret from now on); for a model's ``mode="before"`` validator."""
    if not isinstance(data, dict) or legacy not in data:
        return data
    if field in data:
        raise ValueError(f"set {field} or {legacy}, not both")
    data = dict(data)
    name = data.pop(legacy)
    if name is not None:
        if not isinstance(name, str) or not _ENV_RE.match(name):
            raise ValueError(f"{legacy}: expected an environment variable name")
        data[field] = f"env:{name}"
    return data


def find_references(model: BaseModel, path: str = "") -> Iterator[tuple[str, SecretRef]]:
    """Every reference a settings model holds, with its field path as the plan writes it
    (``sources[0].password``)."""
    for name in type(model).model_fields:
        yield from _walk(getattr(model, name), f"{path}.{name}" if path else name)


def _walk(value: Any, path: str) -> Iterator[tuple[str, SecretRef]]:
    if isinstance(value, SecretRef):
        yield path, value
    elif isinstance(value, BaseModel):
        yield from find_references(value, path)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _walk(item, f"{path}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}")
