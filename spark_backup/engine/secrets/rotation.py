"""The rotation rule: a secret older than the policy's maximum age fails; so, by default, does a
secret whose age is unknown."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from spark_backup.engine.secrets.backends import SecretValue
from spark_backup.engine.secrets.config import ROTATION_MAX_AGE
from spark_backup.engine.settings import format_duration

Verdict = Literal["ok", "overdue", "unknown"]


@dataclass(frozen=True)
class RotationFinding:
    """The verdict on one secret's age."""

    secret: SecretValue
    verdict: Verdict
    age: dt.timedelta | None
    # Whether this finding fails the check (an unknown age may be allowed to warn only).
    failed: bool
    reason: str


@dataclass(frozen=True)
class RotationPolicy:
    """How old a secret may be, and whether an unknown age fails."""

    max_age: dt.timedelta = ROTATION_MAX_AGE
    unknown_age_fails: bool = True

    def judge(self, secret: SecretValue, now: dt.datetime) -> RotationFinding:
        age = secret.age(now)
        if age is None:
            return RotationFinding(
                secret,
                "unknown",
                None,
                self.unknown_age_fails,
                f"{secret.ref}: age unknown ({secret.ref.scheme} keeps no write date); move it "
                "to Vault or set secrets.rotation.unknown_age: warn",
            )
        if age > self.max_age:
            return RotationFinding(
                secret,
                "overdue",
                age,
                True,
                f"{secret.ref}: version {secret.version} is {age.days} days old, over the "
                f"rotation limit of {format_duration(self.max_age)}; rotate it",
            )
        return RotationFinding(
            secret,
            "ok",
            age,
            False,
            f"{secret.ref}: version {secret.version}, {age.days} days old",
        )
