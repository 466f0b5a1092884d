"""The mongodb kind against a MongoDB server (spark_backup_tests/mongo_server.py: the SIMULATED
wire-protocol server nx-27017 here, a real mongod where one is on the PATH): dumps in
mongodump's layout, restores into folders and databases checked by counts and digests, and the
bad inputs that must fail in one line with nothing left behind. BSON fidelity of the dump
format is tested with ``bson`` directly, since the simulated server drops some types."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import bson
import pytest
from bson import json_util
from bson.raw_bson import RawBSONDocument

from spark_backup.engine.streams import ChunkReader
from spark_backup.engine.tar_stream import TarWriter
from spark_backup.errors import IntegrityError, PlanError, RestoreRefused, SourceError
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup.sources.mongodb import dump as mongo_dump
from spark_backup.sources.mongodb import restore as restore_module
from spark_backup.sources.mongodb.bsonfile import CollectionDigest, iter_documents
from spark_backup.sources.mongodb.restore import check_dump_plaintext
from spark_backup.sources.mongodb.settings import MongoSource
from spark_backup_tests.contract.cases import fill_mongo_database
from spark_backup_tests.helpers import mongodb_source, plan_dict, run_cli, write_plan
from spark_backup_tests.mongo_server import mongo_server

SECRET = "pa55-w0rd-never-shown"


@pytest.fixture
def database() -> Iterator[str]:
    name = f"sbtest_{uuid.uuid4().hex[:10]}"
    with mongo_server().client() as client:
        fill_mongo_database(client, name)
        yield name
        for existing in client.list_database_names():
            if existing.startswith(name) or existing.startswith("sbcheck_"):
                client.drop_database(existing)


def _source(database: str, **extra) -> dict:
    return {**mongodb_source(mongo_server().uri, [database]), **extra}


@pytest.fixture
def plan(tmp_path: Path, age_key, database: str) -> Path:
    return write_plan(tmp_path, plan_dict([age_key[1]], [_source(database)]))


def test_dump_is_mongodumps_layout_with_counts_and_digests(
    plan: Path, age_key, database: str, tmp_path: Path
) -> None:
    service = BackupService.from_path(plan)
    (manifest,) = service.backup("docs")
    meta = manifest.source_metadata
    assert meta["databases"] == [database]
    assert meta["collections"][f"{database}.orders"]["documents"] == 300
    assert meta["collections"][f"{database}.customers"]["documents"] == 17
    assert "order-independent" in meta["digest_algorithm"]
    assert manifest.layers == ["age", "zstd", "tar"]

    target = tmp_path / "restored"
    service.restore(manifest.id, target, identity_file=age_key[0])
    orders = target / database / "orders.bson"
    metadata = json.loads((target / database / "orders.metadata.json").read_text())
    assert metadata["collectionName"] == "orders" and metadata["type"] == "collection"
    assert metadata["indexes"][0]["v"] == {"$numberInt": "2"}  # canonical extended JSON
    assert any(index["key"] == {"customer": {"$numberInt": "1"}} for index in metadata["indexes"])
    documents = bson.decode_all(orders.read_bytes())
    assert sorted(d["_id"] for d in documents) == list(range(300))
    digest = CollectionDigest()
    for document in documents:
        digest.add(bson.encode(document))
    assert digest.summary() == {
        k: v for k, v in meta["collections"][f"{database}.orders"].items() if k != "type"
    }


def test_restore_into_a_new_database_checks_counts_and_digests(
    plan: Path, age_key, database: str
) -> None:
    service = BackupService.from_path(plan)
    (manifest,) = service.backup("docs")
    target = f"{database}_restored"
    summary = service.restore_to("database", manifest.id, target, identity_file=age_key[0])
    assert summary["documents"] == 317 and summary["collections"] == 2
    with mongo_server().client() as client:
        assert client[target].orders.count_documents({}) == 300
        assert client[target].orders.find_one({"_id": 7})["lines"] == [{"sku": "s7", "qty": 2}]
        # A restore target that exists is refused, and left as it was.
        with pytest.raises(RestoreRefused, match="already exists"):
            service.restore_to("database", manifest.id, target, identity_file=age_key[0])
        assert client[target].orders.count_documents({}) == 300
        # The source's own database is never written unless forced.
        with pytest.raises(RestoreRefused, match="one the source dumps"):
            service.restore_to("database", manifest.id, database, identity_file=age_key[0])


def test_a_failed_database_restore_leaves_no_database(
    plan: Path, age_key, database: str, monkeypatch
) -> None:
    service = BackupService.from_path(plan)
    (manifest,) = service.backup("docs")
    # The orders file ends early, after some documents went in: the restore stops there and
    # drops the database it created.
    real = restore_module.iter_documents

    def cut_short(stream, label):
        for number, raw in enumerate(real(stream, label)):
            if number == 120 and label.endswith(".orders"):
                raise IntegrityError(f"{label}: BSON file is cut short (a partial document)")
            yield raw

    monkeypatch.setattr(restore_module, "iter_documents", cut_short)
    target = f"{database}_bad"
    with pytest.raises(IntegrityError, match=f"{target}.orders: BSON file is cut short"):
        service.restore_to("database", manifest.id, target, identity_file=age_key[0])
    with mongo_server().client() as client:
        assert target not in client.list_database_names()


def test_restore_to_db_on_the_command_line(plan: Path, age_key, database: str) -> None:
    backup = run_cli("--plan", str(plan), "backup", "docs", check=True)
    copy_id = BackupService.from_path(plan).copies("docs")[0].manifest.id
    result = run_cli(
        "--plan",
        str(plan),
        "restore",
        copy_id,
        "--to-db",
        f"{database}_cli",
        "--identity",
        str(age_key[0]),
        "--json",
    )
    assert result.returncode == 0, result.stderr + backup.stderr
    assert json.loads(result.stdout)["documents"] == 317


def test_a_collection_that_vanishes_during_the_dump_fails_the_copy(
    plan: Path, database: str, monkeypatch
) -> None:
    original = mongo_dump._spool_collection

    def spool_then_drop(client, namespace, spool):
        digest = original(client, namespace, spool)
        if namespace.collection == "orders":
            client[namespace.database].drop_collection("orders")
        return digest

    monkeypatch.setattr(mongo_dump, "_spool_collection", spool_then_drop)
    service = BackupService.from_path(plan)
    with pytest.raises(SourceError, match=f"collection {database}.orders vanished during the dump"):
        service.backup("docs")
    assert service.copies("docs") == []


def test_an_unreachable_server_fails_in_one_line_without_the_password(
    tmp_path: Path, age_key, monkeypatch
) -> None:
    monkeypatch.setenv("DOCS_PASSWORD", SECRET)
    source = _source(
        "shop",
        uri="mongodb://backup@127.0.0.1:9/?directConnection=true",
        password="env:DOCS_PASSWORD",
        connect_timeout="1s",
    )
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [source]))
    result = run_cli("--plan", str(plan), "backup", "docs", env={"DOCS_PASSWORD": SECRET})
    assert result.returncode == SourceError.exit_code
    assert "cannot reach the server" in result.stderr and SECRET not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert BackupService.from_path(plan).copies("docs") == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"uri": "mongodb://backup:hunter2@db1:27017/"}, "uri must not contain a password"),
        ({"password": "hunter2"}, "inline secret is not allowed"),
        ({"password_env": "DOCS_PASSWORD", "password": "env:X"}, "set password or password_env"),
        ({"uri": "postgres://db1"}, "expected a mongodb:// or mongodb+srv:// URI"),
        ({"include_collections": ["orders"]}, "expected DATABASE.COLLECTION globs"),
    ],
)
def test_plan_mistakes(tmp_path: Path, age_key, change: dict, expected: str) -> None:
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [{**_source("shop"), **change}]))
    with pytest.raises(PlanError, match=re.escape(expected)) as raised:
        load_plan(plan)
    assert "hunter2" not in str(raised.value)


def test_namespace_filters_and_slice_interval() -> None:
    source = MongoSource.model_validate(
        {
            **_source("shop"),
            "databases": "all",
            "exclude_databases": ["scratch"],
            "include_collections": ["shop.*", "crm.contacts"],
            "exclude_collections": ["shop.tmp_*"],
            "rpo": "1h",
        }
    )
    assert source.wants_collection("shop", "orders")
    assert not source.wants_collection("shop", "tmp_import")
    assert source.wants_collection("crm", "contacts") and not source.wants_collection("crm", "x")
    assert not source.wants_collection("admin", "users")
    assert not source.wants_collection("shop", "system.views")
    assert source.slice_cadence == "hourly"
    assert MongoSource.model_validate(_source("shop")).slice_cadence == "15min"


# --- the dump format, with bson directly (SIMULATED server not involved) -----------------------

EVERY_TYPE = {
    "double": 1.5,
    "string": "grüße",
    "document": {"a": {"b": [1, 2]}},
    "array": [1, "two", None],
    "binary": bson.Binary(b"\x00\x01", 0),
    "uuid": bson.Binary(uuid.UUID(int=7).bytes, 4),
    "objectid": bson.ObjectId("65a1b2c3d4e5f60718293a4b"),
    "bool": True,
    "datetime": dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC),
    "null": None,
    "regex": bson.Regex("^a.*", "i"),
    "dbpointer_like": bson.DBRef("c", 1),
    "code": bson.Code("function(){}"),
    "code_w_scope": bson.Code("function(){}", {"x": 1}),
    "int32": 7,
    "timestamp": bson.Timestamp(1_700_000_000, 3),
    "int64": bson.Int64(1 << 40),
    "decimal128": bson.Decimal128("1.10"),
    "minkey": bson.MinKey(),
    "maxkey": bson.MaxKey(),
}


def _archive(members: dict[str, bytes]) -> bytes:
    tar = TarWriter()

    def chunks():
        for name, data in members.items():
            yield from tar.file(name, len(data), io.BytesIO(data))
        yield from tar.end()

    return ChunkReader(chunks()).read()


def test_every_bson_type_round_trips_byte_for_byte_through_the_dump_format() -> None:
    raws = [bson.encode({"_id": i, **EVERY_TYPE}) for i in range(3)]
    # A symbol (0x0E, deprecated, which bson decodes to str) as a raw document: kept as is.
    symbol = b"\x0es\x00\x02\x00\x00\x00x\x00"
    raws.append(len(symbol + b"\x00\x00\x00\x00\x00").to_bytes(4, "little") + symbol + b"\x00")
    assert RawBSONDocument(raws[-1])["s"] == "x"
    data = b"".join(raws)
    archive = _archive({"shop/orders.bson": data, "shop/orders.metadata.json": b"{}"})
    with tarfile.open(fileobj=io.BytesIO(archive)) as opened:
        member = opened.extractfile("shop/orders.bson")
        assert member is not None
        assert list(iter_documents(member, "test")) == raws  # byte for byte
    metadata = mongo_dump.canonical_json({"options": {"validator": EVERY_TYPE}})
    assert mongo_dump.canonical_json(json_util.loads(metadata.decode())) == metadata


def test_digest_does_not_depend_on_order_but_on_every_byte() -> None:
    raws = [bson.encode({"_id": i, "v": i * 2}) for i in range(50)]
    forward, backward, changed = CollectionDigest(), CollectionDigest(), CollectionDigest()
    for raw in raws:
        forward.add(raw)
    for raw in reversed(raws):
        backward.add(raw)
    for raw in [*raws[:-1], bson.encode({"_id": 49, "v": 99})]:
        changed.add(raw)
    assert forward.digest == backward.digest != changed.digest


def test_a_bson_file_cut_short_fails_the_deep_verify(plan: Path, age_key) -> None:
    service = BackupService.from_path(plan)
    (manifest,) = service.backup("docs")
    database = manifest.source_metadata["databases"][0]
    raws = [bson.encode({"_id": i}) for i in range(300)]
    cut = b"".join(raws)[:-3]
    archive = _archive({f"{database}/orders.bson": cut})
    with pytest.raises(IntegrityError, match="cut short"):
        check_dump_plaintext(io.BytesIO(archive), manifest)


# --- dump_tool: mongodump (SIMULATED tool: no MongoDB Database Tools here) ---------------------

FAKE_MONGODUMP = """#!{python}
# SIMULATED mongodump: writes mongodump's layout for each --nsInclude with pymongo, and records
# its arguments and the mode of its --config file, so the test sees what spark-backup passed.
import json, os, sys
from pathlib import Path
import pymongo
from bson import CodecOptions, json_util
from bson.raw_bson import RawBSONDocument
args = sys.argv[1:]
if args == ["--version"]:
    print("mongodump version: simulated"); sys.exit(0)
uri = args[args.index("--uri") + 1]
out = Path(args[args.index("--out") + 1])
config = args[args.index("--config") + 1] if "--config" in args else None
(Path(sys.argv[0]).parent / "mongodump.json").write_text(json.dumps(
    {{"args": args, "config_mode": oct(os.stat(config).st_mode & 0o777) if config else None,
      "config": Path(config).read_text() if config else None}}))
client = pymongo.MongoClient(uri)
for spec in [a.split("=", 1)[1] for a in args if a.startswith("--nsInclude=")]:
    database, collection = spec.split(".", 1)
    folder = out / database
    folder.mkdir(parents=True, exist_ok=True)
    raw = client[database].get_collection(collection, codec_options=CodecOptions(document_class=RawBSONDocument))
    with open(folder / (collection + ".bson"), "wb") as handle:
        for document in raw.find():
            handle.write(document.raw)
    meta = {{"indexes": list(client[database][collection].list_indexes()), "collectionName": collection, "type": "collection", "options": {{}}}}
    (folder / (collection + ".metadata.json")).write_text(json_util.dumps(meta, json_options=json_util.CANONICAL_JSON_OPTIONS))
"""


def test_dump_tool_mongodump_gives_the_same_layout_and_checks(
    tmp_path: Path, age_key, database: str, monkeypatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "mongodump"
    tool.write_text(FAKE_MONGODUMP.format(python=sys.executable))
    tool.chmod(0o755)
    log = bin_dir / "mongodump.json"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("DOCS_PASSWORD", SECRET)
    source = _source(database, dump_tool="mongodump", password="env:DOCS_PASSWORD")
    service = BackupService.from_path(write_plan(tmp_path, plan_dict([age_key[1]], [source])))
    (manifest,) = service.backup("docs")
    called = json.loads(log.read_text())
    assert SECRET not in " ".join(called["args"])  # the password travels in the config file
    assert called["config_mode"] == "0o600" and SECRET in called["config"]
    assert sorted(a for a in called["args"] if a.startswith("--nsInclude")) == [
        f"--nsInclude={database}.customers",
        f"--nsInclude={database}.orders",
    ]
    meta = manifest.source_metadata
    assert meta["dump_tool"] == "mongodump" and manifest.tools["mongodump"].endswith("simulated")
    assert meta["collections"][f"{database}.orders"]["documents"] == 300
    assert service.verify(service.copies("docs")[0], service.identities(age_key[0])).ok
    summary = service.restore_to(
        "database", manifest.id, f"{database}_tool", identity_file=age_key[0]
    )
    assert summary["documents"] == 317


def test_dump_tool_mongodump_missing_is_one_line(tmp_path: Path, age_key, database, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no mongodump there
    source = _source(database, dump_tool="mongodump")
    service = BackupService.from_path(write_plan(tmp_path, plan_dict([age_key[1]], [source])))
    with pytest.raises(SourceError, match="mongodump is not on the PATH"):
        service.backup("docs")
    assert service.copies("docs") == []


def test_the_system_is_observed_by_its_counts(plan: Path, database: str) -> None:
    """A standalone server (as the simulated one is): the namespaces' document counts; a write
    changes the observation, a read does not."""
    service = BackupService.from_path(plan)
    source = service.source("docs")
    kind = service.kind_of(source)
    first = kind.observe(source, service.context(source))
    assert first.metadata == {"collections": 2, "documents": 317}
    assert kind.observe(source, service.context(source)).version == first.version
    with mongo_server().client() as client:
        client[database].orders.insert_one({"_id": "new"})
    assert kind.observe(source, service.context(source)).version != first.version
