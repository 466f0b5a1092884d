"""The commands on copies, for every kind alike: backup, list, verify, restore, prune."""

from __future__ import annotations

import datetime as dt
import gc
import json
import sys
from contextlib import ExitStack, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from spark_backup.cli.app import CliState, cli, pass_state, progress_bar
from spark_backup.console import error_line, print_columns, printable, size, stderr, stdout
from spark_backup.errors import (
    IntegrityError,
    SecretsUnavailableError,
    SignatureError,
    SparkBackupError,
)

# The service, the engine and the kinds' contract load when a command runs, not when the
# command line starts (``--help`` lists this module's commands).
if TYPE_CHECKING:
    from spark_backup.engine.catalog import DamagedManifest
    from spark_backup.engine.drill_record import DrillRecord
    from spark_backup.engine.manifest import Manifest
    from spark_backup.service.locks import LockStatus
    from spark_backup.sources.base import CopyRef, LogRange, RestoreTarget

# --- backup ------------------------------------------------------------------------------------


@cli.command()
@click.argument("sources", nargs=-1)
@click.option("--all", "all_sources", is_flag=True, help="Back up every source in the plan.")
@click.option("--partition", help="Partition key (default: the current day, week or month).")
@click.option(
    "--artifact",
    help="Which artifact of the source (default: its primary one; `plan check` lists them).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as JSON.")
@pass_state
def backup(
    state: CliState,
    sources: tuple[str, ...],
    all_sources: bool,
    partition: str | None,
    artifact: str | None,
    as_json: bool,
) -> None:
    """Back up SOURCES (new copies each time; existing copies are never replaced). A failing
    source does not stop the others; the exit code is the first failure's."""
    service = state.copy_service
    names = [s.name for s in service.plan.sources] if all_sources else list(sources)
    if not names:
        raise click.UsageError("name at least one source, or pass --all")
    manifests = []
    failures: list[SparkBackupError] = []
    for name in names:
        try:
            with progress_bar(state.progress, f"backup {name}", None) as progress:
                made = service.backup(name, partition, progress, artifact)
        except SparkBackupError as error:
            error_line(error)
            failures.append(error)
            if isinstance(error, SecretsUnavailableError):
                _report_outage(state.service, name, error)
            continue
        manifests += made
        for manifest in made:
            _print_backup(manifest, as_json)
    if as_json:
        click.echo(json.dumps([asdict(m) for m in manifests], indent=2))
    if failures:
        sys.exit(failures[0].exit_code)


def _report_outage(service: Any, source: str, error: SecretsUnavailableError) -> None:
    """A sealed or unreachable secrets backend needs a person: a ticket through the plan's desk
    (the Dagster layer's run failure sensor does the same for scheduled runs)."""
    try:
        outcome = service.report_failure(service.secrets_outage(source, error))
    except (SparkBackupError, OSError) as exc:
        error_line(f"no ticket for the secrets outage: {exc}")
        return
    if outcome.action != "duplicate":
        stderr.print(
            f"ticket {outcome.action}: {outcome.ticket or 'queued'} (secrets unavailable)",
            highlight=False,
        )


def _print_backup(manifest: Manifest, as_json: bool) -> None:
    warnings = manifest.source_metadata.get("warning_count", 0)
    if not as_json:
        part = f"  {printable(manifest.part)}" if manifest.part else ""
        stdout.print(
            f"{manifest.id}  {printable(manifest.partition)}{part}  "
            f"{size(manifest.plaintext.bytes)} -> "
            f"{size(manifest.stored.bytes)}  {manifest.duration_seconds:.1f}s  "
            f"sha256 {manifest.stored.sha256[:16]}..."
            + (f"  {warnings} warning(s)" if warnings else ""),
            highlight=False,
        )
    for warning in manifest.source_metadata.get("warnings", []):
        _warn(manifest.source, warning)


def _warn(subject: str, message: str) -> None:
    stderr.print(f"warning: {subject}: {printable(message)}", highlight=False, soft_wrap=True)


# --- list --------------------------------------------------------------------------------------


@cli.command("list")
@click.argument("source", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per copy, as an array.")
@click.option(
    "--kind",
    "kind_name",
    metavar="KIND",
    help="Only copies of this kind; with --json, each with its catalogue entry where the kind "
    "keeps one (a vector index's dimension, vectors, metric, embedding model).",
)
@pass_state
def list_(state: CliState, source: str | None, as_json: bool, kind_name: str | None) -> None:
    """List committed copies, oldest first. A manifest that cannot be read is listed as
    damaged (exit 3); every other copy is listed as usual."""
    # The process ends with this command, and its thousands of objects per copy are freed by
    # reference counting: cyclic collections would only walk them again (a fifth of the CPU
    # of listing 5,000 copies).
    gc.disable()
    service = state.listing_service
    refs, damaged = service.listing(source) if source else service.all_listings()
    if kind_name is not None:
        from spark_backup.sources import registry

        registry.kind(kind_name)  # an unknown kind is an error, not an empty list
        refs = [ref for ref in refs if ref.manifest.kind == kind_name]
    locks = {ref.manifest.id: service.lock_status(ref) for ref in refs}
    ranges = _log_ranges(service, refs)
    drills = service.drills_of(refs)
    if as_json:
        replicas = _replicas(service, refs)
        rows = [
            _copy_row(r, locks[r.manifest.id], ranges.get(r.manifest.id), drills.get(r.manifest.id))
            | ({"replicas": replicas[r.manifest.id]} if r.manifest.id in replicas else {})
            for r in refs
        ]
        rows += [_damaged_row(d) for d in damaged]
        click.echo(json.dumps(rows, indent=2))
    else:
        columns = (*LIST_COLUMNS, LOG_COLUMN) if ranges else LIST_COLUMNS
        print_columns(
            columns,
            (
                _list_row(ref, locks[ref.manifest.id], drills.get(ref.manifest.id))
                + _log_cell(ranges, ref)
                for ref in refs
            ),
        )
        for entry in damaged:
            error_line(f"damaged manifest: {entry.error}")
    if damaged:
        sys.exit(_exit_code([d.exit_code for d in damaged]))


LIST_COLUMNS = (
    "id",
    "source",
    "part",
    "partition",
    "finished",
    "size",
    "stored",
    "store",
    "signature",
    "WORM",
    "drilled",
)
LOG_COLUMN = "log needed"


def _list_row(ref: CopyRef, lock: LockStatus | None, drill: DrillRecord | None) -> tuple[str, ...]:
    m = ref.manifest
    return (
        m.id,
        m.source,
        m.part,
        m.partition,
        m.finished_at[:19],
        size(m.plaintext.bytes),
        size(m.stored.bytes),
        ref.store.name,
        ref.signature,
        _worm_cell(lock),
        _drill_cell(drill),
    )


def _log_cell(ranges: dict[str, LogRange], ref: CopyRef) -> tuple[str, ...]:
    """The log a base copy needs and whether the archive holds it; nothing when no source
    listed has a log."""
    if not ranges:
        return ()
    found = ranges.get(ref.manifest.id)
    if found is None:
        return ("",)
    held = "archived" if found.complete else f"MISSING {found.missing}"
    return (f"{found.first}..{found.last} {held}",)


def _worm_cell(lock: LockStatus | None) -> str:
    """The lock as the store reports it now: mode and date, or what is wrong with it."""
    if lock is None:
        return "-"
    if lock.problems:
        return "; ".join(lock.problems)
    state = "until" if lock.active else "ended"
    return f"{lock.mode} {state} {(lock.retain_until or '')[:10]}"


def _log_ranges(service: Any, refs: list[CopyRef]) -> dict[str, LogRange]:
    """The log each base copy needs, from the kinds that archive one, for sources in the plan."""
    from spark_backup.sources.base import ContinuousLog

    ranges: dict[str, LogRange] = {}
    in_plan = {source.name: source for source in service.plan.sources}
    for name in dict.fromkeys(ref.manifest.source for ref in refs):
        source = in_plan.get(name)
        if source is None:
            continue
        kind = service.kind_of(source)
        if isinstance(kind, ContinuousLog) and kind.log_enabled(source):
            mine = [r.manifest for r in refs if r.manifest.source == name]
            ranges.update(kind.log_ranges(service, source, mine))
    return ranges


def _replicas(service: Any, refs: list[CopyRef]) -> dict[str, dict[str, Any]]:
    """Per copy of a source with ``replicate_to``: each target's newest replica record
    (``replicated`` false: not yet, or the last push or check failed; none: never tried)."""
    found: dict[str, dict[str, Any]] = {}
    listed = {ref.manifest.source for ref in refs}
    for source in service.plan.sources:
        if source.name not in listed or not source.replicate_to:
            continue
        for target, records in service.replica_states(source.name).items():
            for ref in refs:
                if ref.manifest.source != source.name:
                    continue
                record = records.get(ref.manifest.id)
                found.setdefault(ref.manifest.id, {})[target] = (
                    {
                        "replicated": record.replicated,
                        "recorded_at": record.recorded_at,
                        "location": record.location,
                        "problem": record.problem,
                    }
                    if record
                    else None
                )
    return found


def _drill_cell(record: DrillRecord | None) -> str:
    """``passed 2026-11-29 12.3s/2h``: the newest drill, its restore time against the RTO."""
    if record is None:
        return "-"
    from spark_backup.engine.settings import format_duration

    verdict = "passed" if record.passed and record.within_rto else "FAILED"
    rto = format_duration(dt.timedelta(seconds=record.rto_seconds))
    return f"{verdict} {record.drilled_at[:10]} {record.drill_seconds:.1f}s/{rto}"


def _drill_row(record: DrillRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    return {
        "drilled_at": record.drilled_at,
        "passed": record.passed,
        "restore_seconds": record.restore_seconds,
        "drill_seconds": record.drill_seconds,
        "rto_seconds": record.rto_seconds,
        "within_rto": record.within_rto,
        "check": record.check,
        "description": record.description,
    }


def _copy_row(
    ref: CopyRef,
    lock: LockStatus | None = None,
    log: LogRange | None = None,
    drill: DrillRecord | None = None,
) -> dict[str, Any]:
    m = ref.manifest
    extra: dict[str, Any] = {"log": {**asdict(log), "complete": log.complete}} if log else {}
    entry = _catalogue(m)
    if entry is not None:
        extra["catalogue"] = entry
    return {
        "id": m.id,
        "source": m.source,
        "kind": m.kind,
        "part": m.part,
        "partition": m.partition,
        "started_at": m.started_at,
        "finished_at": m.finished_at,
        "plaintext_bytes": m.plaintext.bytes,
        "plaintext_sha256": m.plaintext.sha256,
        "stored_bytes": m.stored.bytes,
        "stored_sha256": m.stored.sha256,
        "store": ref.store.name,
        "uri": ref.store.object_uri(m.data_key),
        "lock": m.lock,
        "signature": ref.signature,
        # The lock as the store reports it now (the manifest's "lock" is what was asked for).
        "worm": lock.as_dict() if lock else None,
        "drill": _drill_row(drill),
        **extra,
    }


def _catalogue(manifest: Manifest) -> dict[str, Any] | None:
    """The copy's catalogue entry, from kinds that keep one (a copy of a kind this version does
    not know has none)."""
    from spark_backup.sources import registry
    from spark_backup.sources.base import Catalogued

    kind = registry.kinds().get(manifest.kind)
    return kind.catalogue(manifest) if isinstance(kind, Catalogued) else None


def _damaged_row(entry: DamagedManifest) -> dict[str, Any]:
    return {"id": entry.copy_id, "damaged": entry.error, "uri": entry.uri}


def _exit_code(codes: list[int]) -> int:
    """A refused signature (11) outranks damage (3): a forgery is the graver finding."""
    return (
        SignatureError.exit_code if SignatureError.exit_code in codes else IntegrityError.exit_code
    )


# --- verify ------------------------------------------------------------------------------------


@cli.command()
@click.argument("selector", required=False, metavar="[SOURCE|ID]")
@click.option(
    "--deep",
    is_flag=True,
    help="Also decrypt and decompress (needs an identity) and check the plaintext.",
)
@click.option(
    "--identity", type=click.Path(dir_okay=False), help="age identity file (implies --deep)."
)
@click.option("--json", "as_json", is_flag=True, help="Results as JSON.")
@pass_state
def verify(
    state: CliState, selector: str | None, deep: bool, identity: str | None, as_json: bool
) -> None:
    """Re-read copies and compare them with their manifests. Exit 3 if any copy fails.

    Plain: the stored bytes' sha256 and size (no key needed). --deep: also decrypt (age
    authenticates every chunk), decompress (zstd frame checksums), compare the plaintext's
    sha256 and size, and check the kind's format."""
    from spark_backup.service import VerifyOutcome

    service = state.copy_service
    refs, damaged = service.select(selector)
    identities = service.identities(identity) if (deep or identity) else None
    outcomes = [VerifyOutcome.of_damaged(d, bool(identities)) for d in damaged]
    for outcome in outcomes:
        if not as_json:
            stdout.print(f"[red]FAILED[/red]  {printable(outcome.error)}", highlight=False)
    # A deep verify decrypts every copy in one age worker process.
    with service.decryption_worker(identities) if identities else nullcontext() as worker:
        for ref in refs:
            with progress_bar(
                # A deep verify counts plaintext bytes, a stored-bytes check counts stored bytes.
                state.progress,
                f"verify {ref.manifest.id}",
                (ref.manifest.plaintext if identities else ref.manifest.stored).bytes,
            ) as progress:
                outcome = service.verify(ref, identities, progress, worker)
            outcomes.append(outcome)
            if not as_json:
                status = "[green]ok[/green]" if outcome.ok else "[red]FAILED[/red]"
                detail = f"  {printable(outcome.error)}" if outcome.error else ""
                stdout.print(
                    f"{status}  {outcome.copy_id}{detail}", highlight=False, soft_wrap=True
                )
                for caution in outcome.cautions:
                    _warn(outcome.copy_id, caution)
    failed = [o for o in outcomes if not o.ok]
    if as_json:
        click.echo(json.dumps([asdict(o) for o in outcomes], indent=2))
    elif not outcomes:
        stdout.print("no copies to verify")
    else:
        checks = outcomes[-1].checks or ("stored sha256 and size",)
        stdout.print(
            f"{len(outcomes) - len(failed)} of {len(outcomes)} copies intact "
            f"({'deep' if identities else 'plain'} verify: {', '.join(checks)})"
        )
    if failed:
        sys.exit(_exit_code([o.exit_code for o in failed]))


# --- restore -----------------------------------------------------------------------------------


def _restore_targets() -> dict[str, RestoreTarget]:
    """Every restore target a registered kind offers, by name."""
    from spark_backup.sources import registry
    from spark_backup.sources.base import RestoreTargets

    found: dict[str, RestoreTarget] = {}
    for kind in registry.kinds().values():
        if isinstance(kind, RestoreTargets):
            for target in kind.restore_targets():
                found.setdefault(target.name, target)
    return found


def _target_param(target: RestoreTarget) -> str:
    return f"target_{target.name}"


class RestoreCommand(click.Command):
    """``restore``, with one option per restore target the registered kinds offer (``--to-db``
    for databases, ...) and their switches. Finding them loads every kind (about 0.1 s), so
    they are added only when the command line may use them: for ``--help``, without ``--to``,
    or with an option that is not restore's own."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        own = {name for param in self.params for name in (*param.opts, *param.secondary_opts)}
        options = [a.split("=", 1)[0] for a in args[: _end_of_options(args)] if a[:1] == "-"]
        if "--to" not in options or any(name not in own for name in options):
            self._add_kind_targets()
        return super().parse_args(ctx, args)

    def _add_kind_targets(self) -> None:
        if getattr(self, "_targets_added", False):
            return
        self._targets_added = True
        flags: dict[str, list[str]] = {}
        for target in _restore_targets().values():
            self.params.append(
                click.Option(
                    [target.option, _target_param(target)],
                    metavar=target.metavar,
                    help=target.help,
                )
            )
            for flag, text in target.flags.items():
                flags.setdefault(flag, []).append(text)
        for flag, texts in flags.items():
            self.params.append(
                click.Option([f"--{flag.replace('_', '-')}", flag], is_flag=True, help=texts[0])
            )


def _end_of_options(args: list[str]) -> int:
    """Where the options end: at ``--``, after which every word is an argument."""
    return args.index("--") if "--" in args else len(args)


@cli.command(cls=RestoreCommand)
@click.argument("copy_id")
@click.option("--to", "target", help="Staging folder.")
@click.option("--identity", type=click.Path(dir_okay=False), help="age identity file.")
@click.option("--overwrite", is_flag=True, help="Replace files that already exist in the target.")
@click.option(
    "--skip-unsafe", is_flag=True, help="Leave out unsafe archive members instead of refusing."
)
@click.option("--json", "as_json", is_flag=True, help="Summary as JSON.")
@pass_state
def restore(
    state: CliState,
    copy_id: str,
    target: str | None,
    identity: str | None,
    overwrite: bool,
    skip_unsafe: bool,
    as_json: bool,
    **target_options: Any,
) -> None:
    """Restore copy COPY_ID into a staging folder (--to, never in place) or into a target its
    kind offers (--to-db for a database dump, ...)."""
    # With only --to and restore's own options, the kinds' targets were not loaded: none chosen.
    targets = _restore_targets() if target is None or target_options else {}
    chosen = {
        name: value
        for name, t in targets.items()
        if (value := target_options.get(_target_param(t))) is not None
    }
    if (target is None) == (not chosen) or len(chosen) > 1:
        options = " or ".join(["--to DIR", *(f"{t.option} {t.metavar}" for t in targets.values())])
        raise click.UsageError(f"give exactly one of {options}")
    flags = {k: v for k, v in target_options.items() if not k.startswith("target_")}
    with ExitStack() as stack:
        # The decryption worker starts first, its identities sent once the plan is read, so
        # that its interpreter and imports overlap opening the plan and finding the copy.
        worker = None
        if not chosen:
            from spark_backup.engine.age_worker import AgeWorker

            worker = stack.enter_context(AgeWorker()).start()
        service = state.copy_service
        total = service.find(copy_id).manifest.plaintext.bytes
        with progress_bar(state.progress, f"restore {copy_id}", total) as progress:
            if chosen:
                ((name, value),) = chosen.items()
                summary = service.restore_to(
                    name, copy_id, value, identity_file=identity, flags=flags, progress=progress
                )
            else:
                summary = service.restore(
                    copy_id,
                    Path(target or "."),
                    identity_file=identity,
                    overwrite=overwrite,
                    skip_unsafe=skip_unsafe,
                    progress=progress,
                    worker=worker,
                )
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    if "database" in summary:
        stdout.print(
            f"restored {copy_id} into database {printable(summary['database'])}: "
            f"{summary['tables']} tables, {summary['rows']} rows (row counts match the dump) in "
            f"{summary['seconds']:.1f}s",
            highlight=False,
        )
        return
    stdout.print(
        f"restored {copy_id} into {printable(summary['target'])}: {summary['files']} files, "
        f"{summary['directories']} directories, {summary['symlinks']} links, "
        f"{size(summary['bytes'])} in {summary['seconds']:.1f}s",
        highlight=False,
    )
    for caution in summary.get("cautions", []):
        _warn(copy_id, caution)
    for stale in summary.get("stale_staging_removed", []):
        stdout.print(
            f"removed staging folder {printable(stale)}: left by a restore that was killed",
            highlight=False,
            soft_wrap=True,
        )
    for skipped in summary.get("skipped", []):
        stderr.print(f"skipped unsafe member {printable(skipped)}", highlight=False)
    if summary.get("modes_stripped_count"):
        listed = summary["modes_stripped"]
        more = summary["modes_stripped_count"] - len(listed)
        stdout.print(
            f"restored {summary['modes_stripped_count']} members without their setuid, setgid, "
            "sticky or group/world write bits: "
            + ", ".join(printable(m) for m in listed)
            + (f" and {more} more" if more > 0 else ""),
            highlight=False,
            soft_wrap=True,
        )


# --- prune -------------------------------------------------------------------------------------


@cli.command()
@click.option("--apply", is_flag=True, help="Delete; without it, only show what would go.")
@click.option(
    "--identity",
    type=click.Path(dir_okay=False),
    help="age identity file: repack blob-layer packs (default: the plan's identity, if any).",
)
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
@pass_state
def prune(state: CliState, apply: bool, identity: str | None, as_json: bool) -> None:
    """Apply retention: expire copies no rule keeps, remove orphans and unfinished uploads of
    interrupted backups and the staging folders of killed restores. Copies under an Object
    Lock, and copies whose manifest cannot be read, are never deleted. With an identity,
    blob-layer packs mostly unneeded are rewritten (defaults.repack_unused) and swept later."""
    report = state.service.prune(dry_run=not apply, identity_file=identity)
    if as_json:
        click.echo(json.dumps(asdict(report), indent=2))
    else:
        verb = "would delete" if report.dry_run else "deleted"
        for copy_id, reasons in sorted(report.kept.items()):
            stdout.print(f"kept {copy_id}: {', '.join(reasons)}", highlight=False)
        for copy_id in report.expired:
            stdout.print(
                f"{verb} {copy_id}: newer copies fill every daily, weekly and monthly slot",
                highlight=False,
            )
        for copy_id in report.locked:
            stdout.print(
                f"kept {copy_id}: expired by retention but under Object Lock", highlight=False
            )
        for orphan in report.orphans:
            stdout.print(f"{verb} orphaned data {printable(orphan)}", highlight=False)
        for upload in report.incomplete_uploads:
            stdout.print(
                f"{verb} unfinished upload {printable(upload)}: a write that stopped",
                highlight=False,
            )
        for staging in report.stale_restore_staging:
            stdout.print(
                f"{verb} staging folder {printable(staging)}: left by a restore that was killed",
                highlight=False,
            )
        for key in report.log_expired:
            stdout.print(
                f"{verb} log {printable(key)}: older than every base copy kept", highlight=False
            )
        for key in report.shared_expired:
            stdout.print(
                f"{verb} shared object {printable(key)}: no committed copy needs it",
                highlight=False,
            )
        for pack in report.repacked:
            stdout.print(
                f"{'would rewrite' if report.dry_run else 'rewrote'} pack {pack['source']}:"
                f"{pack['pack']}: {pack['size'] - pack['used']} of {pack['size']} bytes unused; "
                "the pack itself is deleted once announced for orphan_grace",
                highlight=False,
            )
        for pack in report.repack_locked:
            stdout.print(f"kept sparse pack {pack}: under Object Lock", highlight=False)
        for reason in report.repack_skipped:
            stdout.print(reason, highlight=False)
        if report.repacked:
            stdout.print(
                f"repack: {len(report.repacked)} packs, "
                f"{report.repack_reclaimed_bytes} bytes reclaimed once they are deleted",
                highlight=False,
            )
        for entry in report.damaged:
            error_line(f"kept a copy whose manifest is damaged: {entry}")
        stdout.print(
            f"{len(report.kept)} kept, {len(report.expired)} expired, {len(report.locked)} "
            f"locked, {len(report.orphans)} orphans, {len(report.incomplete_uploads)} unfinished "
            f"uploads, {len(report.stale_restore_staging)} stale restore staging folders"
            + ("" if apply else " (dry run: pass --apply)")
        )
    if report.damaged:
        sys.exit(IntegrityError.exit_code)


# --- erase -------------------------------------------------------------------------------------


@cli.command()
@click.argument("source")
@click.option("--before", required=True, help="Erase every whole month before this date.")
@click.option("--apply", is_flag=True, help="Destroy the keys; without it, only show what would.")
@click.option("--json", "as_json", is_flag=True, help="Report as JSON.")
@pass_state
def erase(state: CliState, source: str, before: str, apply: bool, as_json: bool) -> None:
    """Serve an erasure request by crypto-shredding: destroy the data keys of a personal_data
    source's months before --before. Their copies can no longer be opened; their objects stay
    (locked ones until their retention ends). Irreversible with --apply."""
    import datetime as dt

    from spark_backup.errors import UsageError

    try:
        day = dt.date.fromisoformat(before)
    except ValueError:
        raise UsageError(f"--before {before!r} is not a date (YYYY-MM-DD)") from None
    report = state.service.erase(source, day, dry_run=not apply)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    verb = "would destroy" if not apply else "destroyed"
    for month in report["months"]:
        stdout.print(f"{verb} the data key of {source} {month}", highlight=False)
    stdout.print(
        f"{len(report['copies'])} copies {'would become' if not apply else 'are now'} "
        f"unreadable" + ("" if apply else " (dry run: pass --apply)"),
        highlight=False,
    )
