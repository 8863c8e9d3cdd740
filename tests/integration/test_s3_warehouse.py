"""The write and commit paths against an S3 warehouse served by moto on 127.0.0.1 (real HTTP)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import redis

from common.commit.committer import Committer, committed_seq
from common.coord.locks import TableLock
from common.coord.pending import PendingRegistry
from common.errors import ConfigError
from common.ingest.events import encode_ndjson
from common.ingest.routing import Router
from common.lake.catalog import TableStore, open_catalog
from common.settings import load_settings
from common.write.batch_writer import BatchWriter
from tests.support.catalogs import s3_backend
from tests.support.services import S3Endpoint

pytestmark = pytest.mark.integration


def events(n: int) -> list[dict[str, Any]]:
    return [
        {
            "specversion": "1.0",
            "id": f"s3-{i}",
            "source": "/s3",
            "type": "com.example.upload",
            "time": f"2024-05-0{1 + i % 3}T10:00:00Z",
            "data": {"size": i, "name": f"obj-{i}"},
        }
        for i in range(n)
    ]


def test_write_and_commit_to_an_s3_warehouse(
    monkeypatch: pytest.MonkeyPatch,
    s3_endpoint: S3Endpoint,
    s3_bucket: str,
    icefleet_home: Path,
    redis_client: redis.Redis,
) -> None:
    # Given a catalog named by ICEFLEET_CATALOG whose warehouse is an S3 bucket on moto
    backend = s3_backend(s3_endpoint, s3_bucket, icefleet_home / "catalog.db")
    backend.apply(monkeypatch)
    settings = load_settings(backend.env, row_group_rows=100)
    catalog = open_catalog(settings)
    store = TableStore(catalog, lambda t: TableLock(redis_client, t, ttl_ms=10_000, wait_s=10))
    registry = PendingRegistry(redis_client)
    writer = BatchWriter(settings, store, Router(), registry)

    # When a batch of 900 events over three days is written and committed
    result = writer.write("s3-batch", encode_ndjson(events(900)))
    committed = Committer(settings, catalog, redis_client, registry).commit_table("events.upload")

    # Then three objects exist in the bucket with the sizes and row groups their DataFiles claim
    files = result.files["events.upload"]
    assert len(files) == 3 and all(f.file_path.startswith(s3_bucket + "/") for f in files)
    fs = pafs.S3FileSystem(
        endpoint_override=s3_endpoint.host_port,
        scheme="http",
        access_key=s3_endpoint.access_key_id,
        secret_key=s3_endpoint.secret_access_key,
        region=s3_endpoint.region,
    )
    for data_file in files:
        path = data_file.file_path.removeprefix("s3://")
        assert fs.get_file_info(path).size == data_file.file_size_in_bytes
        meta = pq.read_metadata(path, filesystem=fs)
        assert meta.num_rows == data_file.record_count == 300
        assert meta.num_row_groups == 3
    # And one snapshot holds them, read back row by row through the catalog
    assert [c.files for c in committed] == [3]
    table = catalog.load_table(("events", "upload"))
    assert committed_seq(table) == 1
    rows = table.scan().to_arrow().to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(f"s3-{i}" for i in range(900))
    assert all(json.loads(r["raw_event"])["id"] == r["id"] for r in rows)


def test_unloadable_catalog_error_names_variable_without_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a configured catalog of an unknown type carrying a secret
    monkeypatch.setenv("PYICEBERG_CATALOG__BROKEN__TYPE", "no-such-type")
    monkeypatch.setenv("PYICEBERG_CATALOG__BROKEN__S3__SECRET_ACCESS_KEY", "very-secret-value")
    # When it is opened
    with pytest.raises(ConfigError) as raised:
        open_catalog(load_settings({"ICEFLEET_CATALOG": "broken"}))
    # Then the error names ICEFLEET_CATALOG and hides the secret
    assert "ICEFLEET_CATALOG" in str(raised.value)
    assert "very-secret-value" not in str(raised.value)


def test_unknown_catalog_name_says_how_to_configure_it() -> None:
    with pytest.raises(ConfigError, match="PYICEBERG_CATALOG__NOPE__TYPE"):
        open_catalog(load_settings({"ICEFLEET_CATALOG": "nope"}))


def test_local_default_catalog_lives_under_home(icefleet_home: Path) -> None:
    # Given nothing configured but ICEFLEET_HOME
    settings = load_settings({"ICEFLEET_HOME": str(icefleet_home)})
    # When the catalog is opened and a table written
    store = TableStore(open_catalog(settings), lambda t: contextlib.nullcontext())
    BatchWriter(settings, store, Router()).write("local", encode_ndjson(events(3)))
    # Then the catalog and the data are under ICEFLEET_HOME
    assert (icefleet_home / "catalog.db").exists()
    assert list((icefleet_home / "warehouse").rglob("*.parquet"))
