"""One case per kind for the kind contract suite: a plan with one source of the kind, backed by
the real thing (a configuration tree, a database on the machine's PostgreSQL server, a file).
A kind registered without a case here fails the suite: a new kind cannot skip it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from spark_backup_tests.helpers import (
    config_source,
    llm_source,
    make_estate,
    make_model_dir,
    mongodb_source,
    plan_dict,
    write_plan,
)

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@dataclass
class KindCase:
    plan: Path
    source: str


def _sql(statement: str, dbname: str = "postgres") -> None:
    with closing(psycopg.connect(dbname=dbname, connect_timeout=5, **PG)) as conn:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(statement)


def _plan(tmp_path: Path, public_key: str, source: dict[str, Any]) -> Path:
    # One daily copy kept: a second copy of the same day expires the first.
    retention = {"daily": 1, "weekly": 0, "monthly": 0}
    return write_plan(tmp_path, plan_dict([public_key], [{**source, "retention": retention}]))


@contextmanager
def config_archive_case(tmp_path: Path, public_key: str) -> Iterator[KindCase]:
    estate = make_estate(tmp_path / "estate")
    yield KindCase(_plan(tmp_path, public_key, config_source("trees", [str(estate)])), "trees")


@contextmanager
def postgres_case(tmp_path: Path, public_key: str) -> Iterator[KindCase]:
    database = f"sbcontract_{uuid.uuid4().hex[:10]}"
    _sql(f"CREATE DATABASE {database}")
    try:
        _sql(
            "CREATE TABLE items (id int PRIMARY KEY, name text); "
            "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 250) g",
            database,
        )
        source = {
            "name": "pg",
            "kind": "postgres",
            "cadence": "daily",
            "owner": "team:dba",
            "databases": [database],
            "base_backup": {"enabled": False},
            "wal_archiving": False,
            **PG,
        }
        yield KindCase(_plan(tmp_path, public_key, source), "pg")
    finally:
        _sql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


def fill_mongo_database(client, database: str, documents: int = 300) -> None:
    """Two collections with an index and nested, typed documents the simulated server keeps."""
    import datetime as dt

    from bson import ObjectId

    db = client[database]
    db.orders.insert_many(
        {
            "_id": i,
            "customer": f"c{i % 17}",
            "total": i * 1.25,
            "placed": dt.datetime(2026, 1, 1) + dt.timedelta(minutes=i),
            "lines": [{"sku": f"s{i}", "qty": i % 5}],
        }
        for i in range(documents)
    )
    db.orders.create_index([("customer", 1)])
    db.customers.insert_many({"_id": ObjectId(), "name": f"c{i}"} for i in range(17))


@contextmanager
def mongodb_case(tmp_path: Path, public_key: str) -> Iterator[KindCase]:
    from spark_backup_tests.mongo_server import mongo_server

    server = mongo_server()
    database = f"sbcontract_{uuid.uuid4().hex[:10]}"
    with server.client() as client:
        fill_mongo_database(client, database)
        try:
            source = mongodb_source(server.uri, [database])
            yield KindCase(_plan(tmp_path, public_key, source), "docs")
        finally:
            for name in client.list_database_names():
                if name == database or name.startswith("sbcheck_"):
                    client.drop_database(name)


@contextmanager
def toy_case(tmp_path: Path, public_key: str) -> Iterator[KindCase]:
    from spark_backup_tests.contract.toy_kind import MAGIC

    blob = tmp_path / "model.bin"
    blob.write_bytes(MAGIC + bytes(range(256)) * 64)
    source = {"name": "blob", "kind": "toy_blob", "cadence": "daily", "owner": "team:ml"}
    yield KindCase(_plan(tmp_path, public_key, {**source, "path": str(blob)}), "blob")


@contextmanager
def llm_artifacts_case(tmp_path: Path, public_key: str) -> Iterator[KindCase]:
    import os

    model = make_model_dir(tmp_path / "adapter")
    os.environ["SPARK_TEST_CHUNK_KEY"] = "contract-chunk-key-0123456789"
    try:
        yield KindCase(_plan(tmp_path, public_key, llm_source("adapter", str(model))), "adapter")
    finally:
        os.environ.pop("SPARK_TEST_CHUNK_KEY", None)


@contextmanager
def faiss_case(tmp_path: Path, public_key: str) -> Iterator[KindCase]:
    from spark_backup_tests.faiss_data import faiss_source, make_index

    folder = tmp_path / "rag"
    make_index(folder, "ivf")
    source = faiss_source(folder, probes={"queries": 3, "k": 5, "nprobe": 4})
    yield KindCase(_plan(tmp_path, public_key, source), "rag")


CASES: dict[str, Callable[[Path, str], Any]] = {
    "config_archive": config_archive_case,
    "postgres": postgres_case,
    "mongodb": mongodb_case,
    "llm_artifacts": llm_artifacts_case,
    "faiss": faiss_case,
    "toy_blob": toy_case,
}
