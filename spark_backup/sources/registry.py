"""The registry of artifact kinds: the one place the rest of spark-backup asks about kinds.

Kinds register through the ``spark_backup.kinds`` entry-point group (``pyproject.toml``), so a
kind shipped in another package plugs in without a change here, and no module outside a kind's
own package names it. ``register`` adds one at run time (tests, plugins under development).
Kinds load on first use, each by its name: importing the registry imports no kind, and
reading a plan loads only the kinds it names.

A kind's own commands are listed by ``--help`` and run by PostgreSQL's ``archive_command``, so
they are found without loading the kind: a kind that has commands also names them in the
``spark_backup.commands`` group, under its own name, pointing at the same sequence its
``cli_commands`` returns (the contract tests hold the two equal).

Finding every installed package's entry points reads each package's metadata (5 ms, in every
command); a kind or a command that spark-backup ships itself is found in its own metadata alone,
and takes precedence over another package's of the same name. Only other names, and the lists
of every kind or command, need the scan.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import TYPE_CHECKING

from spark_backup.errors import NotFoundError, PlanError

# The kinds' contract loads with the first kind: ``--help`` finds the kinds' commands without it.
if TYPE_CHECKING:
    import click

    from spark_backup.sources.base import SourceKind

ENTRY_POINT_GROUP = "spark_backup.kinds"
COMMANDS_ENTRY_POINT_GROUP = "spark_backup.commands"
DISTRIBUTION = "spark-backup"

# The kinds loaded so far, by name; a kind loads when first asked for by name (reading a plan
# loads the kinds it names, not all of them), every kind when all are asked for.
_kinds: dict[str, SourceKind] | None = None
_all_loaded = False
# The ``spark_backup.kinds`` entry points by name, read once (a scan of every installed package).
_entry_points: dict[str, metadata.EntryPoint] | None = None
# Bumped on every change, so that models built from the registry know when to rebuild.
_version = 0


def _index() -> dict[str, metadata.EntryPoint]:
    global _entry_points
    if _entry_points is None:
        found = sorted(_installed().select(group=ENTRY_POINT_GROUP), key=lambda e: e.name)
        own = _own().select(group=ENTRY_POINT_GROUP)
        _entry_points = {entry.name: entry for entry in [*found, *own]}
        _entry_points = {name: _entry_points[name] for name in sorted(_entry_points)}
    return _entry_points


def _entry(name: str) -> metadata.EntryPoint | None:
    """The kind entry point called ``name``: spark-backup's own without a scan, else any."""
    own = _own().select(group=ENTRY_POINT_GROUP, name=name)
    return next(iter(own), None) or _index().get(name)


@functools.cache
def _installed() -> metadata.EntryPoints:
    """Every installed entry point: one scan of the installed packages serves both groups."""
    return metadata.entry_points()


@functools.cache
def _own() -> metadata.EntryPoints:
    """spark-backup's own entry points, from its own metadata alone (none if it has none, as
    when run from a source tree: the scan then finds what there is)."""
    try:
        return metadata.distribution(DISTRIBUTION).entry_points
    except metadata.PackageNotFoundError:
        return metadata.EntryPoints(())


def _load(entry: metadata.EntryPoint) -> SourceKind:
    from spark_backup.sources.base import SourceKind

    kind = entry.load()
    if not isinstance(kind, SourceKind) or kind.name != entry.name:
        raise PlanError(
            f"entry point {entry.name} = {entry.value} ({ENTRY_POINT_GROUP}) is not the "
            f"SourceKind named {entry.name!r}"
        )
    return kind


def _loaded() -> dict[str, SourceKind]:
    """Every kind, loaded."""
    global _kinds, _all_loaded
    if not _all_loaded:
        loaded = _kinds or {}
        # Entry-point kinds first, in name order, then those registered at run time.
        found = {
            name: loaded[name] if name in loaded else _load(entry)
            for name, entry in _index().items()
        }
        _kinds = {**found, **loaded}
        _all_loaded = True
    assert _kinds is not None
    return _kinds


def names() -> list[str]:
    """The name of every registered kind, without loading any."""
    if _all_loaded:
        assert _kinds is not None
        return list(_kinds)
    return [*_index(), *(name for name in _kinds or {} if name not in _index())]


def kinds() -> dict[str, SourceKind]:
    """Every registered kind by name."""
    return dict(_loaded())


def known(name: str) -> bool:
    """Whether a kind called ``name`` is registered, loading none."""
    if _kinds is not None and name in _kinds:
        return True
    return not _all_loaded and _entry(name) is not None


def kind(name: str) -> SourceKind:
    """The kind called ``name``, loading only it."""
    global _kinds
    if _kinds is not None and name in _kinds:
        return _kinds[name]
    entry = None if _all_loaded else _entry(name)
    if entry is None:
        raise NotFoundError(
            f"unknown source kind {name!r} (this version knows: {', '.join(names())})"
        )
    _kinds = {**(_kinds or {}), name: _load(entry)}
    return _kinds[name]


def register(new: SourceKind) -> None:
    """Add a kind (or replace one of the same name)."""
    global _version
    _loaded()[new.name] = new
    _version += 1


def unregister(name: str) -> None:
    global _version
    _loaded().pop(name, None)
    _version += 1


def version() -> int:
    return _version


# The last answer of ``commands()`` and what it was computed from (reading the entry points
# costs milliseconds, and ``--help`` asks once per command it lists).
_commands: tuple[tuple[int, bool], list[click.Command]] | None = None


def commands() -> list[click.Command]:
    """Every kind's own commands, by kind name. Once the kinds are loaded they are asked
    (``cli_commands``, which covers kinds registered at run time); before that, only the
    modules the ``spark_backup.commands`` entry points name are imported, never the kinds."""
    global _commands
    state = (_version, _all_loaded)
    if _commands is None or _commands[0] != state:
        if _all_loaded:
            found = {name: list(kind.cli_commands()) for name, kind in _loaded().items()}
        else:
            found = {entry.name: list(entry.load()) for entry in command_entry_points()}
        _commands = (state, [command for name in sorted(found) for command in found[name]])
    return list(_commands[1])


def command(name: str) -> click.Command | None:
    """The kind command called ``name``: among the commands of spark-backup's own kinds first
    (found without a scan while the kinds are not loaded), else among every kind's."""
    if not _all_loaded:
        for entry in command_entry_points(own=True):
            found = next((c for c in entry.load() if c.name == name), None)
            if found is not None:
                return found
    return next((c for c in commands() if c.name == name), None)


def command_entry_points(own: bool = False) -> list[metadata.EntryPoint]:
    """The ``spark_backup.commands`` entry points by kind name: every installed package's
    (spark-backup's own taking precedence), or with ``own`` spark-backup's alone."""
    found = _own().select(group=COMMANDS_ENTRY_POINT_GROUP)
    if not own:
        every = _installed().select(group=COMMANDS_ENTRY_POINT_GROUP)
        found = {entry.name: entry for entry in [*every, *found]}.values()
    return sorted(found, key=lambda e: e.name)
