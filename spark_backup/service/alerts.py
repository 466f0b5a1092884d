"""Alerts: what needs a person now, evaluated from the stores alone (no Dagster needed), and sent
through the ticket desk.

- ``freshness``: an artifact's newest copy is older than its ``max_age`` (the plan's default is
  24 h, overridable per source), or a part it should have is missing;
- ``drill``: the newest drill of a source failed or exceeded the RTO;
- ``drill_overdue``: a source's last drill is older than ``defaults.drill_max_age`` (or it was
  never drilled);
- the log's lag check (``wal_archive_lag``, named by the kind): the log is not in the store
  within the RPO;
- ``secrets_unavailable``: the secrets backend a source's backups need (Vault, OpenBao) is
  sealed or cannot be reached. Its backups would fail, and nothing else about the source can be
  told without its store's credentials: the ticket says so instead of a bare error. ``backup``
  on the command line reports the same failure when it meets the outage.

Each alert's event names the state it describes (the newest copy, the drill record), so sending
the same state again is recognised by the desk and sends nothing twice.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from spark_backup.engine.cadence import utcnow
from spark_backup.engine.settings import format_duration
from spark_backup.errors import SecretError, SecretsUnavailableError
from spark_backup.notify import Failure, Outcome
from spark_backup.plan import SourceSettings
from spark_backup.service.drills import DrillOperations
from spark_backup.service.freshness import FreshnessOperations
from spark_backup.service.notify import NotifyOperations
from spark_backup.sources.base import ContinuousLog

FRESHNESS_ALERT = "freshness"
DRILL_ALERT = "drill"
DRILL_OVERDUE_ALERT = "drill_overdue"
SECRETS_ALERT = "secrets_unavailable"


@dataclass(frozen=True)
class Alert:
    failure: Failure

    @property
    def line(self) -> str:
        return f"{self.failure.source}: {self.failure.check}: {self.failure.summary}"


class AlertOperations(FreshnessOperations, DrillOperations, NotifyOperations):
    def evaluate_alerts(self, now: dt.datetime | None = None) -> list[Alert]:
        now = now or utcnow()
        alerts: list[Alert] = []
        for source in self.plan.sources:
            try:
                self._read_secrets_of(source)
                alerts += self._source_alerts(source, now)
            except SecretsUnavailableError as exc:
                alerts.append(Alert(self.secrets_outage(source.name, exc, now)))
        return alerts

    def _read_secrets_of(self, source: SourceSettings) -> None:
        """Read every secret a backup of ``source`` needs: ``SecretsUnavailableError`` if its
        backend is sealed or unreachable. A secret that is merely missing is the rotation
        check's finding, not an outage."""
        for _path, ref in self.secret_references(source):
            try:
                self.secrets.read(ref)
            except SecretsUnavailableError:
                raise
            except SecretError:
                continue

    def secrets_outage(
        self, source_name: str, error: SecretsUnavailableError, now: dt.datetime | None = None
    ) -> Failure:
        """The ticket for a source whose secrets backend is down: one ticket per source, a
        comment at most once an hour while the outage lasts. The error names the reference and
        the backend, never a value."""
        stamp = f"{(now or utcnow()).astimezone(dt.UTC):%Y%m%dT%H}"
        return Failure(
            source_name,
            "",
            SECRETS_ALERT,
            f"alert:{SECRETS_ALERT}:{stamp}",
            f"backups of {source_name} cannot read their secrets: {error}",
            "No weaker source of the secret is tried: unseal or restore the secrets backend "
            "(docs/runbooks/vault.md), then run the failed backups again.",
        )

    def _source_alerts(self, source: SourceSettings, now: dt.datetime) -> list[Alert]:
        alerts: list[Alert] = []
        for artifact in self.artifacts(source):
            status = self.freshness(source.name, artifact.name, now)
            if status.ok:
                continue
            limit = format_duration(status.max_age)
            if status.newest is None:
                summary = f"no copy of {source.name} ({artifact.name}) exists (allowed age {limit})"
            elif status.missing_parts:
                summary = (
                    f"{source.name} ({artifact.name}) has no copy of "
                    f"{', '.join(status.missing_parts)} (allowed age {limit})"
                )
            else:
                assert status.age is not None
                summary = (
                    f"newest copy of {source.name} ({artifact.name}) {status.newest.id} is "
                    f"{status.age.total_seconds() / 3600:.1f} h old (allowed {limit})"
                )
            newest = status.newest.id if status.newest else "none"
            alerts.append(
                Alert(
                    Failure(
                        source.name,
                        "",
                        FRESHNESS_ALERT,
                        f"alert:{FRESHNESS_ALERT}:{artifact.name}:{newest}",
                        summary,
                    )
                )
            )
        alerts += self._drill_alerts(source.name, source.rto, now)
        kind = self.kind_of(source)
        if isinstance(kind, ContinuousLog) and kind.log_enabled(source):
            lag = kind.lag(self, source, now)
            if not lag.ok:
                behind = (
                    f"{lag.lag.total_seconds():.0f} s behind"
                    if lag.lag is not None
                    else "nothing archived"
                )
                alerts.append(
                    Alert(
                        Failure(
                            source.name,
                            "",
                            kind.lag_check_name,
                            f"alert:{kind.lag_check_name}:{lag.newest or 'none'}",
                            f"{kind.log_name} of {source.name} is {behind} "
                            f"(RPO {format_duration(lag.rpo)})",
                        )
                    )
                )
        return alerts

    def _drill_alerts(self, source_name: str, rto: dt.timedelta, now: dt.datetime) -> list[Alert]:
        last = self.last_drill(source_name)
        allowed = self.plan.defaults.drill_max_age
        alerts = []
        if last is None or now - last.drilled > allowed:
            when = f"last drilled {last.drilled_at[:19]}" if last else "never drilled"
            alerts.append(
                Alert(
                    Failure(
                        source_name,
                        "",
                        DRILL_OVERDUE_ALERT,
                        f"alert:{DRILL_OVERDUE_ALERT}:{last.drilled_at if last else 'never'}",
                        f"restore drill of {source_name} overdue: {when} "
                        f"(allowed {format_duration(allowed)})",
                    )
                )
            )
        if last is not None and not (last.passed and last.within_rto):
            why = (
                last.description
                if not last.passed
                else f"restore took {last.drill_seconds:.1f} s, RTO {format_duration(rto)}"
            )
            alerts.append(
                Alert(
                    Failure(
                        source_name,
                        last.partition,
                        DRILL_ALERT,
                        f"alert:{DRILL_ALERT}:{last.copy_id}:{last.drilled_at}",
                        f"restore drill of {last.copy_id} failed: {why}",
                    )
                )
            )
        return alerts

    def preview_alerts(self, alerts: list[Alert]) -> list[str]:
        """What sending would do, one line per alert, without sending anything."""
        desk = self.ticket_desk()
        return [desk.preview(alert.failure) for alert in alerts]

    def send_alerts(self, alerts: list[Alert]) -> list[Outcome]:
        desk = self.ticket_desk()
        return [self.report_failure(alert.failure, desk) for alert in alerts]
