"""The command line starts at once: each quick command imports only what it needs (issue 12).

Structural, not timed: a command runs in a fresh interpreter that records, as it exits, which
modules were imported; heavy libraries and the kinds' operations must not be among them unless
the command uses them. ``benchmarks/bench_cli_startup.py`` measures the times themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_backup.sources import registry
from spark_backup_tests.faiss_data import faiss_source
from spark_backup_tests.helpers import (
    config_source,
    llm_source,
    mongodb_source,
    plan_dict,
    run_cli,
    write_plan,
)

# Records sys.modules at exit (after main()'s sys.exit), into the file $MODULES_OUT names.
_RECORDER = """
import atexit, json, os, sys
atexit.register(lambda: open(os.environ["MODULES_OUT"], "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["spark-backup", *sys.argv[1:]]
from spark_backup.cli import main
main()
"""

# Libraries no quick command needs (boto3: these tests use a local store).
NEVER = ("dagster", "boto3", "botocore")
# What reading a plan and its stores needs none of: the libraries that send tickets and mail.
NOT_FOR_READING = ("smtplib", "ssl", "urllib.request", "http.client")
# What wal-push, run for every WAL segment, needs none of besides: the service's other
# concerns (alerts, drills, retention, ...); the kind's operations get the plan opened alone.
NOT_FOR_WAL_PUSH = (
    *NOT_FOR_READING,
    "spark_backup.notify.desk",
    "spark_backup.service.backup_service",
    "spark_backup.service.alerts",
    "spark_backup.service.drills",
    "spark_backup.service.copies",
    "spark_backup.service.retention",
    "spark_backup.service.journal",
    # ... nor what the plan's sections name but only other commands do: writing the journal,
    # replicating, listing and expiring copies.
    "spark_backup.journal.journal",
    "spark_backup.journal.documents",
    "spark_backup.engine.replication.records",
    "spark_backup.engine.replication.targets",
    "spark_backup.engine.catalog",
    "spark_backup.engine.retention",
    # ... nor the secrets' rotation rule, nor the other commands' modules, nor tar
    "spark_backup.engine.secrets.rotation",
    "spark_backup.cli.copies",
    "spark_backup.cli.alerts",
    "tarfile",
    # ... nor the values the kinds' capabilities return (observations, log status, restore
    # targets, ...): base.py exports them on first use
    "spark_backup.sources.capability_values",
    # ... nor PostgreSQL's server, dump and base-backup modules (the kind's part names are in
    # postgres/parts.py)
    "spark_backup.sources.postgres.server",
    "spark_backup.sources.postgres.dump",
    "spark_backup.sources.postgres.basebackup",
    # ... nor the months' data keys (a copy of personal data is opened with them)
    "spark_backup.engine.datakeys",
    # ... nor the configuration kind's reader (its walk and GNU tar)
    "spark_backup.sources.config_archive.reader",
)
# What list needs none of: the service's other concerns (it reads locks, drills and replica
# records, see service/listing.py), and the pipeline that writes and reads copies.
NOT_FOR_LIST = (
    "spark_backup.service.backup_service",
    "spark_backup.service.copies",
    "spark_backup.service.alerts",
    "spark_backup.service.drills",
    "spark_backup.service.retention",
    "spark_backup.service.journal",
    "spark_backup.notify.desk",
    "spark_backup.engine.pipeline",
    "spark_backup.engine.age_worker",
    "spark_backup.sources.postgres.pitr",
    "spark_backup.sources.capability_values",
    "spark_backup.engine.retention",  # the WORM status's, not the lock read back per copy
    "spark_backup.sources.postgres.server",
    "spark_backup.sources.postgres.dump",
    "spark_backup.sources.postgres.basebackup",
    "spark_backup.sources.config_archive.reader",
)
# The kinds a plan does not name: reading it loads only the kinds of its own sources.
KINDS_NOT_IN_THE_QUICK_PLAN = (
    "spark_backup.sources.mongodb.kind",
    "spark_backup.sources.mongodb.settings",
    "spark_backup.sources.llm_artifacts.kind",
    "spark_backup.sources.llm_artifacts.settings",
    "spark_backup.sources.faiss.kind",
    "spark_backup.sources.faiss.settings",
    "pymongo",
    "bson",
    "pyfastcdc",
)
# What --help and --version must do without: validating a plan, printing with rich, the
# pipeline, a kind's operations, the kinds' contract (its dataclasses: the command line and the
# kinds' commands reach the plan through ``sources.holder``).
NOT_FOR_HELP = (
    *NEVER,
    "pydantic",
    "rich",
    "yaml",
    "psycopg",
    "psycopg2",
    "pymongo",
    "bson",
    "zstandard",
    "pyrage",
    "spark_backup.plan",
    "spark_backup.service",
    "spark_backup.engine",
    "spark_backup.sources.postgres.kind",
    "spark_backup.sources.mongodb.kind",
    "spark_backup.sources.config_archive",
    "spark_backup.sources.base",
)

STARTUP_MODULES = {"spark_backup.engine", "spark_backup.engine.gc_pause"}


def imported_by(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    out = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    done = subprocess.run(
        [sys.executable, "-c", _RECORDER, *args],
        env={**os.environ, "MODULES_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done, set(json.loads(out.read_text()))


def offending(modules: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        prefix
        for prefix in forbidden
        if any(m == prefix or m.startswith(prefix + ".") for m in modules)
    )


@pytest.mark.parametrize("args", [("--help",), ("--version",)])
def test_help_and_version_load_nothing_heavy(tmp_path: Path, args: tuple[str, ...]) -> None:
    done, modules = imported_by(tmp_path, *args)
    assert done.returncode == 0, done.stderr
    # the start-up's pause of the cyclic collector (gc alone) is the one engine module they load
    assert offending(modules - STARTUP_MODULES, NOT_FOR_HELP) == []


def test_help_lists_the_kinds_commands_without_loading_the_kinds(tmp_path: Path) -> None:
    done, modules = imported_by(tmp_path, "--help")
    for command in registry.commands():
        assert f"  {command.name} " in done.stdout
    # the kinds' commands are there, from entry-point metadata
    assert "wal-push" in done.stdout
    assert "mongo-pitr" in done.stdout
    assert not any(m.endswith(".kind") for m in modules if m.startswith("spark_backup.sources"))


@pytest.fixture
def quick_plan(tmp_path: Path, age_key, estate: Path) -> Path:
    """A local store with one copy, and a PostgreSQL source archiving WAL into it (wal-push
    contacts no server)."""
    postgres = {
        "name": "pg_main",
        "kind": "postgres",
        "cadence": "daily",
        "owner": "team:dba",
        "host": "127.0.0.1",
        "port": 5432,
        "user": "postgres",
    }
    plan = write_plan(
        tmp_path, plan_dict([age_key[1]], [config_source("etc", [str(estate)]), postgres])
    )
    run_cli("--plan", str(plan), "backup", "etc", check=True)
    return plan


def test_list_talks_to_no_server_and_as_json_prints_without_rich(
    tmp_path: Path, quick_plan: Path
) -> None:
    done, modules = imported_by(tmp_path, "--plan", str(quick_plan), "list")
    assert done.returncode == 0, done.stderr
    assert "etc-" in done.stdout
    assert offending(modules, (*NEVER, *NOT_FOR_READING, "psycopg", "psycopg2", "pymongo")) == []
    assert offending(modules, KINDS_NOT_IN_THE_QUICK_PLAN) == []
    assert offending(modules, NOT_FOR_LIST) == []
    done, modules = imported_by(tmp_path, "--plan", str(quick_plan), "list", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["source"] == "etc"
    assert offending(modules, (*NEVER, "psycopg", "psycopg2", "pymongo", "rich")) == []


def test_wal_push_loads_neither_psycopg_nor_rich(tmp_path: Path, quick_plan: Path) -> None:
    """PostgreSQL runs it for every WAL segment: it reads the plan and writes to the store,
    and never needs a connection or a table."""
    segment = tmp_path / "pg_wal" / "000000010000000000000001"
    segment.parent.mkdir()
    segment.write_bytes(bytes(range(256)) * 64)
    done, modules = imported_by(tmp_path, "--plan", str(quick_plan), "wal-push", str(segment))
    assert done.returncode == 0, done.stderr
    assert offending(modules, (*NEVER, "psycopg", "psycopg2", "pymongo", "rich")) == []
    assert offending(modules, NOT_FOR_WAL_PUSH) == []
    assert offending(modules, KINDS_NOT_IN_THE_QUICK_PLAN) == []
    # what it does need, so the list above is about the right process
    assert {"spark_backup.service.runtime", "pyrage", "zstandard"} <= modules


# What backup, verify and restore need none of: the service's other concerns (they get the
# plan opened with copies, their journal and locks alone, see CliState.copy_service).
NOT_FOR_COPIES = (
    *NOT_FOR_READING,
    "spark_backup.notify.desk",
    "spark_backup.service.backup_service",
    "spark_backup.service.alerts",
    "spark_backup.service.drills",
    "spark_backup.service.retention",
    "spark_backup.service.replication",
    "spark_backup.service.kpis",
    "spark_backup.service.compliance",
    "spark_backup.service.disaster",
)


def test_backup_verify_and_restore_load_only_their_concern_and_the_plans_kinds(
    tmp_path: Path, quick_plan: Path, age_key
) -> None:
    """Restore to a folder does not load every kind to offer their restore targets."""
    plan = ("--plan", str(quick_plan))
    identity = ("--identity", str(age_key[0]))
    done, modules = imported_by(tmp_path, *plan, "backup", "etc")
    assert done.returncode == 0, done.stderr
    copy_id = done.stdout.split()[0]
    runs = {"backup": modules}
    for name, args in {
        "verify": ("verify", copy_id),
        "verify --deep": ("verify", *identity, copy_id),
        "restore": ("restore", copy_id, *identity, "--to", str(tmp_path / "restored")),
    }.items():
        done, runs[name] = imported_by(tmp_path, *plan, *args)
        assert done.returncode == 0, (name, done.stderr)
    assert (tmp_path / "restored").is_dir()
    for name, modules in runs.items():
        assert offending(modules, (*NEVER, "psycopg", "psycopg2", "pymongo")) == [], name
        assert offending(modules, NOT_FOR_COPIES) == [], name
        assert offending(modules, ("rich",)) == [], name  # their lines are plain text
        assert offending(modules, KINDS_NOT_IN_THE_QUICK_PLAN) == [], name
        # what they do need, so the lists above are about the right process
        assert "spark_backup.service.copies" in modules, name
    # a backup and a verify make none of the capabilities' values; a restore its options
    for name in ("backup", "verify", "verify --deep"):
        assert offending(runs[name], ("spark_backup.sources.capability_values",)) == [], name
    assert "spark_backup.sources.capability_values" in runs["restore"]
    # the kinds' restore targets are still offered where asked for
    done, modules = imported_by(tmp_path, *plan, "restore", "--help")
    assert "--to-db" in done.stdout
    assert "spark_backup.sources.mongodb.kind" in modules
    done, _ = imported_by(tmp_path, *plan, "restore", copy_id)
    assert done.returncode == 2
    assert "give exactly one of --to DIR or --to-db NAME" in done.stderr


def test_a_plan_of_every_kind_is_read_without_the_kinds_machinery(
    tmp_path: Path, age_key, estate: Path
) -> None:
    """Every kind named, so every kind loads: still no driver, no FAISS, no Dagster, and no
    cryptography in a plan without signing (the blob layer derives its chunk keys with it
    only in a backup)."""
    postgres = {"name": "pg_main", "kind": "postgres", "cadence": "daily", "owner": "team:dba"}
    sources = [
        config_source("etc", [str(estate)]),
        postgres,
        mongodb_source("mongodb://127.0.0.1:1", ["app"]),
        llm_source("adapters", str(tmp_path / "model")),
        faiss_source(tmp_path / "rag"),
    ]
    plan = write_plan(tmp_path, plan_dict([age_key[1]], sources))
    done, modules = imported_by(tmp_path, "--plan", str(plan), "list", "--json")
    assert done.returncode == 0, done.stderr
    assert {f"spark_backup.sources.{s['kind']}.kind" for s in sources} <= modules
    heavy = (*NEVER, "psycopg", "psycopg2", "pymongo", "faiss", "cryptography", "rich")
    assert offending(modules, heavy) == []


def test_commands_found_by_entry_point_are_the_kinds_own() -> None:
    """The ``spark_backup.commands`` entry points index exactly what each kind's
    ``cli_commands`` returns, so ``--help`` (which reads the index) and a loaded kind agree."""
    indexed = {entry.name: list(entry.load()) for entry in registry.command_entry_points()}
    kinds = registry.kinds()
    assert set(indexed) <= set(kinds), "a commands entry point names no kind"
    for name, kind in kinds.items():
        assert indexed.get(name, []) == list(kind.cli_commands()), name


def test_a_command_missing_from_the_index_is_still_found(monkeypatch) -> None:
    """An install whose entry-point metadata lacks the commands group still runs them: the
    kinds are asked when a name is not in the index."""
    from spark_backup.cli import cli

    monkeypatch.setattr(registry, "_commands", None)
    monkeypatch.setattr(registry, "_kinds", None)
    monkeypatch.setattr(registry, "_all_loaded", False)
    monkeypatch.setattr(registry, "command_entry_points", lambda own=False: [])
    context = cli.make_context("spark-backup", ["--help"], resilient_parsing=True)
    assert cli.get_command(context, "wal-push") is not None
    assert cli.get_command(context, "no-such-command") is None


def test_a_kind_loads_by_its_name_alone() -> None:
    """Naming the kinds loads none; asking for one loads it and no other; asking for all loads
    them all, in the order the registry always gave."""
    script = """
import json, sys
from spark_backup.sources import registry
names = registry.names()
before = sorted(m for m in sys.modules if m.startswith("spark_backup.sources.") and m.endswith(".kind"))
registry.kind("config_archive")
one = sorted(m for m in sys.modules if m.startswith("spark_backup.sources.") and m.endswith(".kind"))
print(json.dumps([names, before, one, list(registry.kinds())]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    names, before, one, everything = json.loads(done.stdout)
    assert names == everything == sorted(names)
    assert {"config_archive", "postgres"} <= set(names)
    assert before == []
    assert one == ["spark_backup.sources.config_archive.kind"]


def test_the_core_commands_table_names_what_each_module_registers() -> None:
    """``CORE_COMMANDS`` imports a command's module only when it is asked for: it must name
    every command each module of ``spark_backup.cli`` registers, and by that module."""
    import importlib

    from spark_backup.cli import app

    folder = Path(app.__file__).parent
    for path in sorted(folder.glob("*.py")):
        importlib.import_module(f"spark_backup.cli.{path.stem}")
    registered = {name: command.callback.__module__ for name, command in app.cli.commands.items()}
    assert registered == app.CORE_COMMANDS


def test_a_command_imports_no_other_commands_module(tmp_path: Path) -> None:
    done, modules = imported_by(tmp_path, "wal-push", "--help")
    assert done.returncode == 0, done.stderr
    assert offending(modules, tuple(set(app_commands().values()))) == []
    done, modules = imported_by(tmp_path, "list", "--help")
    assert done.returncode == 0, done.stderr
    assert offending(modules, tuple(set(app_commands().values()))) == ["spark_backup.cli.copies"]


def app_commands() -> dict[str, str]:
    from spark_backup.cli.app import CORE_COMMANDS

    return CORE_COMMANDS


_GC_RECORDER = """
import atexit, gc, json, os, sys
usual = gc.get_threshold()
atexit.register(lambda: print(json.dumps([usual, gc.get_threshold(), gc.get_freeze_count()]), file=sys.stderr))
sys.argv = ["spark-backup", *sys.argv[1:]]
from spark_backup.__main__ import main
main()
"""


def test_the_cyclic_collector_runs_rarely_until_the_plan_is_open(
    tmp_path: Path, quick_plan: Path
) -> None:
    """Start-up's objects live as long as the process: the collector waits until the command
    has opened its plan, then runs as usual, without walking them again (frozen)."""

    def thresholds(*args: str) -> tuple[list[int], list[int], int]:
        done = subprocess.run(
            [sys.executable, "-c", _GC_RECORDER, *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        usual, at_exit, frozen = json.loads(done.stderr.splitlines()[-1])
        return usual, at_exit, frozen

    segment = tmp_path / "pg_wal" / "000000010000000000000001"
    segment.parent.mkdir()
    segment.write_bytes(bytes(range(256)) * 64)
    for args in (("wal-push", str(segment)), ("list",)):
        usual, at_exit, frozen = thresholds("--plan", str(quick_plan), *args)
        assert at_exit == usual, args
        assert frozen > 10_000, args  # the modules, classes and the plan's models
    usual, at_exit, frozen = thresholds("--help")  # no plan: start-up lasts to the end
    assert at_exit[0] > usual[0] and frozen == 0


def test_reading_a_plan_inspects_no_builtin_default_factory(
    tmp_path: Path, age_key, estate: Path
) -> None:
    """A builtin as a field's ``default_factory`` (``list``) makes pydantic parse its signature
    with ``tokenize`` (2 ms to compile its patterns): the models of a plan of the core kinds
    default their lists with ``Field(default=[])`` instead."""
    postgres = {"name": "pg_main", "kind": "postgres", "cadence": "daily", "owner": "team:dba"}
    sources = [
        config_source("etc", [str(estate)]),
        postgres,
        mongodb_source("mongodb://127.0.0.1:1", ["app"]),
    ]
    plan = write_plan(tmp_path, plan_dict([age_key[1]], sources))
    script = """
import sys, tokenize
from spark_backup.plan import load_plan
load_plan(sys.argv[1])
print(tokenize._compile.cache_info().currsize)
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(plan)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "0"


def test_the_kinds_spark_backup_ships_are_found_without_a_scan(monkeypatch) -> None:
    """Reading every installed package's entry points costs milliseconds in every command: a
    kind or command of spark-backup's own is found in its own metadata; another package's
    (here a toy kind) only by the scan, which is then made once."""
    from importlib import metadata

    toy = metadata.EntryPoint(
        name="toy_blob",
        value="spark_backup_tests.contract.toy_kind:KIND",
        group=registry.ENTRY_POINT_GROUP,
    )
    scans: list[int] = []

    def installed() -> metadata.EntryPoints:
        scans.append(1)
        return metadata.EntryPoints((toy,))

    monkeypatch.setattr(registry, "_installed", installed)
    monkeypatch.setattr(registry, "_entry_points", None)
    monkeypatch.setattr(registry, "_kinds", None)
    monkeypatch.setattr(registry, "_all_loaded", False)
    monkeypatch.setattr(registry, "_commands", None)
    assert registry.known("postgres") and registry.known("config_archive")
    assert registry.kind("postgres").name == "postgres"
    assert registry.command("wal-push") is not None
    assert scans == []
    assert registry.known("toy_blob")
    assert registry.kind("toy_blob").name == "toy_blob"
    assert not registry.known("no_such_kind")
    assert {"postgres", "toy_blob"} <= set(registry.names())
    assert len(scans) == 1  # _index() keeps what the scan found


_PRINTED = [
    "plain",
    "",
    "trailing spaces   ",
    "  leading",
    "x" * 200,
    "x" * 201,
    "w " * 99 + "ww",
    "two\nlines\n\nand a blank",
    "ends with a newline\n",
    "restored etc into /tmp/r: 20 files, 5 directories, 0 links, 9.4 KiB in 0.1s",
    "1 of 1 copies intact (deep verify: stored sha256 and size, decrypted with age)",
    "[green]ok[/green]  etc-20261130T083247.597Z-e1985eff",
    "[red]FAILED[/red]  copy etc-1: sha256 differs",
    "[red]error:[/red] s3://bucket: access denied",
    "[green][red]nested[/red][/green]",
    "[bold]other style[/bold]",
    "a name like \\[red]x, escaped",
    "back\\slash",
    "emoji :thumbs_up: code",
    "tab\there",
    "caf\u00e9 \u4e2d\u6587",
    "control \x1b[31m",
]


@pytest.mark.parametrize("text", _PRINTED)
@pytest.mark.parametrize("options", [{}, {"highlight": False}, {"soft_wrap": True}])
def test_a_print_without_rich_writes_what_rich_would(
    text: str, options: dict[str, bool], monkeypatch
) -> None:
    """``stdout.print`` writes plain lines to a pipe without loading rich: byte for byte what
    rich writes there (and rich itself prints everything else)."""
    import io

    from rich.console import Console

    from spark_backup.console import _LazyConsole

    for variable in ("FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(variable, raising=False)
    expected = io.StringIO()
    Console(file=expected, width=200).print(text, **options)
    printed = io.StringIO()
    monkeypatch.setattr(sys, "stdout", printed)
    lazy = _LazyConsole(to_stderr=False)
    lazy.print(text, **options)
    assert printed.getvalue() == expected.getvalue()
    assert lazy.is_terminal is False


def test_plain_lines_print_without_rich_and_markup_still_fails_as_in_rich(monkeypatch) -> None:
    import io

    from rich.errors import MarkupError

    from spark_backup.console import _LazyConsole

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    lazy = _LazyConsole(to_stderr=False)
    lazy.print("[green]ok[/green]  copy", highlight=False)
    assert lazy._console is None  # written without a rich console
    with pytest.raises(MarkupError):
        lazy.print("[/red] closes nothing")
    assert lazy._console is not None


def test_the_contract_exports_every_value_of_its_capabilities() -> None:
    """``capability_values`` holds what the capabilities return or take, apart so that reading a
    plan builds none of it; ``base`` (the contract kinds import from) still exports each one."""
    import dataclasses

    from spark_backup.sources import base, capability_values

    defined = [
        name
        for name, value in vars(capability_values).items()
        if dataclasses.is_dataclass(value) and value.__module__ == capability_values.__name__
    ]
    assert len(defined) == 11
    for name in defined:
        assert getattr(base, name) is getattr(capability_values, name), name
