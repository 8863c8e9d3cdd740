"""Data files reach S3 (moto's server on 127.0.0.1) with a CRC32C the store records, computed
from the bytes the Parquet writer produced; deep verify and compaction on an S3 warehouse.

moto records the checksum an upload carries but, unlike S3, R2 and MinIO, does not compare it
with the body it received: the refusal of a changed byte cannot be shown against it. What is
shown: the header is sent with every data file and equals the CRC32C of the stored bytes, and
a store that confirms another checksum (or none) is noticed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import redis

from common.commit.committer import Committer
from common.coord.locks import TableLock
from common.coord.pending import PendingRegistry
from common.errors import CorruptDataFileError
from common.ingest.events import encode_ndjson
from common.ingest.routing import Router
from common.lake.catalog import TableStore, open_catalog
from common.lake.uploads import ObjectWriter, crc32c_b64
from common.maintenance.compaction import CompactionOptions, compact_table
from common.maintenance.deletes import live_data_files
from common.maintenance.verify import verify_table
from common.settings import load_settings
from common.write.batch_writer import BatchWriter
from tests.integration.test_s3_warehouse import events
from tests.support.catalogs import s3_backend
from tests.support.services import S3Endpoint

pytestmark = pytest.mark.integration

TABLE = "events.upload"


def stored_checksums(endpoint: S3Endpoint, paths: list[str]) -> list[tuple[str | None, str]]:
    """(CRC32C the store recorded, CRC32C of the bytes it holds) of each object."""
    client = endpoint.client()
    out = []
    for path in paths:
        bucket, key = path.removeprefix("s3://").split("/", 1)
        head = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        out.append((head.get("ChecksumCRC32C"), crc32c_b64(body)))
    client.close()
    return out


def writer(settings: Any, catalog: Any, client: redis.Redis) -> BatchWriter:
    store = TableStore(catalog, lambda t: TableLock(client, t, ttl_ms=10_000, wait_s=10))
    return BatchWriter(settings, store, Router(), PendingRegistry(client))


def test_data_files_and_compacted_files_carry_a_crc32c_the_store_recorded(
    monkeypatch: pytest.MonkeyPatch,
    s3_endpoint: S3Endpoint,
    s3_bucket: str,
    icefleet_home: Path,
    redis_client: redis.Redis,
) -> None:
    # Given an S3 warehouse on moto
    backend = s3_backend(s3_endpoint, s3_bucket, icefleet_home / "catalog.db")
    backend.apply(monkeypatch)
    # dedupe off: the six batches repeat the same 30 event ids on purpose (files are the point)
    settings = load_settings(
        {"ICEFLEET_CATALOG": backend.catalog_name or "", "ICEFLEET_DEDUPE": "off"}
    )
    catalog = open_catalog(settings)
    batches = writer(settings, catalog, redis_client)
    # When six batches (three days each) are written and committed
    for n in range(6):
        batches.write(f"s3-{n}", encode_ndjson(events(30)))
    Committer(settings, catalog, redis_client).commit_table(TABLE)
    table = catalog.load_table(("events", "upload"))
    written = sorted(live_data_files(table))
    # Then every data file was stored with the CRC32C of its bytes, sent with the upload
    assert len(written) == 18
    assert all(recorded == actual for recorded, actual in stored_checksums(s3_endpoint, written))
    # And deep verify reads every page of them from S3
    report = verify_table(table, deep=True)
    assert report.ok and report.checked == 18 and report.notes == []

    # When compacted (its inputs read verified, its outputs uploaded the same way)
    result = compact_table(table, CompactionOptions(min_files=5), objects=ObjectWriter())
    # Then the three outputs carry their CRC32C too, and hold every row
    assert result.written_files == 3
    assert all(r == a for r, a in stored_checksums(s3_endpoint, result.outputs))
    table = table.refresh()
    assert table.scan().to_arrow().num_rows == 180


def test_a_store_that_confirms_another_checksum_or_none_is_noticed(
    s3_endpoint: S3Endpoint, s3_bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    import pyarrow as pa
    from pyiceberg.io.pyarrow import PyArrowFileIO

    io = PyArrowFileIO(s3_endpoint.fileio_properties())
    objects = ObjectWriter()
    client = objects._client(io.properties)
    answer: dict[str, Any] = {}

    def store_says(parsed: dict[str, Any], **_: Any) -> None:
        parsed.pop("ChecksumCRC32C", None)
        parsed.update(answer)

    client.meta.events.register("after-call.s3.PutObject", lambda **kw: store_says(kw["parsed"]))
    # A store that recorded other bytes than those sent: the write fails, naming the object
    answer["ChecksumCRC32C"] = "AAAAAA=="
    with pytest.raises(CorruptDataFileError, match="the store recorded CRC32C AAAAAA=="):
        objects.write(io, f"{s3_bucket}/a.parquet", pa.py_buffer(b"bytes"))
    # A store that confirms nothing: written, with a warning that it may not verify
    answer.clear()
    with caplog.at_level(logging.WARNING, logger="common.lake.uploads"):
        objects.write(io, f"{s3_bucket}/b.parquet", pa.py_buffer(b"bytes"))
        objects.write(io, f"{s3_bucket}/c.parquet", pa.py_buffer(b"bytes"))
    assert [r.getMessage() for r in caplog.records if r.name == "common.lake.uploads"] == [
        "the object store did not confirm the CRC32C of an upload: it may not verify "
        "additional checksums (MinIO, R2 and S3 do)"
    ]
