"""Replaying oplog entries onto restored databases, in order and idempotently (an entry applied
twice leaves what applying it once leaves), under a database rename mapping.

- ``i``: the document, replaced or inserted by ``_id``;
- ``u``: ``$set``/``$unset`` modifiers (oplog format 1), a whole replacement document, or the
  ``$v: 2`` diff MongoDB 5+ writes (applied to the current document and stored back);
- ``d``: delete by ``_id``;
- ``c``: create, drop, dropDatabase, createIndexes, dropIndexes, and ``applyOps`` (the entry a
  transaction commits as), whose operations are replayed in turn; commands that cannot be
  replayed faithfully (renameCollection across databases, collMod, ...) stop the replay with a
  clear error rather than leave a silently different database;
- ``n``: nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from spark_backup.errors import IntegrityError

_IGNORED_COMMANDS = frozenset({"commitTransaction", "abortTransaction", "startIndexBuild"})


@dataclass
class OplogApplier:
    client: Any
    mapping: Mapping[str, str]
    applied: int = 0
    skipped: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def apply(self, entry: Mapping[str, Any]) -> None:
        op = entry.get("op")
        namespace = str(entry.get("ns", ""))
        database, _, collection = namespace.partition(".")
        if op == "n":
            self.skipped += 1
            return
        if op == "c" and "applyOps" in entry.get("o", {}):
            for inner in entry["o"]["applyOps"]:
                self.apply(inner)
            return
        if database not in self.mapping:
            self.skipped += 1  # a database this restore does not hold
            return
        target = self.client[self.mapping[database]]
        if op == "i":
            document = entry["o"]
            target[collection].replace_one({"_id": document["_id"]}, document, upsert=True)
        elif op == "u":
            self._update(target[collection], entry["o2"], entry["o"])
        elif op == "d":
            target[collection].delete_one({"_id": entry["o"]["_id"]})
        elif op == "c":
            self._command(target, entry["o"], entry)
        else:
            raise IntegrityError(f"oplog entry {entry.get('ts')}: unknown operation {op!r}")
        self.applied += 1
        self.counts[op] = self.counts.get(op, 0) + 1

    def _update(self, collection: Any, query: Mapping[str, Any], change: Mapping[str, Any]):
        selector = {"_id": query["_id"]}
        if change.get("$v") == 2 and "diff" in change:
            current = collection.find_one(selector)
            if current is None:
                return  # deleted later in the log: its delete is replayed too
            collection.replace_one(selector, apply_diff(current, change["diff"]))
        elif any(key.startswith("$") for key in change):
            modifiers = {k: v for k, v in change.items() if k != "$v"}
            collection.update_one(selector, modifiers)
        else:
            collection.replace_one(selector, change, upsert=True)

    def _command(self, database: Any, command: Mapping[str, Any], entry: Mapping) -> None:
        name = next(iter(command))
        if name == "create":
            if command["create"] not in database.list_collection_names():
                options = {k: v for k, v in command.items() if k not in ("create", "idIndex")}
                database.command("create", command["create"], **options)
        elif name == "drop":
            database.drop_collection(command["drop"])
        elif name == "dropDatabase":
            for collection in database.list_collection_names():
                database.drop_collection(collection)
        elif name == "createIndexes":
            spec = {k: v for k, v in command.items() if k not in ("createIndexes", "v")}
            database.command("createIndexes", command["createIndexes"], indexes=[spec])
        elif name == "dropIndexes":
            index = command.get("index")
            if index not in (None, "*"):
                from pymongo.errors import OperationFailure

                with suppress(OperationFailure):  # already gone: idempotent
                    database[command["dropIndexes"]].drop_index(index)
        elif name in _IGNORED_COMMANDS:
            return
        else:
            raise IntegrityError(
                f"oplog entry {entry.get('ts')}: command {name!r} on {entry.get('ns')} cannot be "
                "replayed by spark-backup; restore up to just before it (--to-time), then apply "
                "it by hand, or use mongorestore --oplogReplay (docs/runbooks/mongodb.md)"
            )


def apply_diff(document: dict[str, Any], diff: Mapping[str, Any]) -> dict[str, Any]:
    """A ``$v: 2`` update's diff applied to a decoded document: ``u`` updates fields, ``i``
    inserts them, ``d`` deletes them, ``s<field>`` descends into an object or (``a: true``) an
    array, whose ``u<n>``/``s<n>`` address elements and ``l`` truncates or extends it."""
    for name in diff.get("d", {}):
        document.pop(name, None)
    for section in ("u", "i"):
        for name, value in diff.get(section, {}).items():
            document[name] = value
    for key, sub in diff.items():
        if key.startswith("s") and len(key) > 1:
            name = key[1:]
            current = document.get(name)
            if sub.get("a") is True:
                document[name] = _apply_array_diff(list(current or []), sub)
            else:
                document[name] = apply_diff(dict(current or {}), sub)
    return document


def _apply_array_diff(array: list[Any], diff: Mapping[str, Any]) -> list[Any]:
    if "l" in diff:
        length = int(diff["l"])
        array = array[:length] + [None] * max(0, length - len(array))
    for key, value in diff.items():
        if key in ("a", "l"):
            continue
        index = int(key[1:])
        while len(array) <= index:
            array.append(None)
        if key.startswith("u"):
            array[index] = value
        elif key.startswith("s"):
            element = array[index]
            if value.get("a") is True:
                array[index] = _apply_array_diff(list(element or []), value)
            else:
                array[index] = apply_diff(dict(element or {}), value)
    return array
