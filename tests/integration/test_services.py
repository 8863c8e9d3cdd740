"""The test services themselves do real I/O: if these fail, every other integration test will."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import redis
import sqlalchemy as sa

from tests.support.services import RedisProcess, S3Endpoint

pytestmark = pytest.mark.integration


def test_redis_round_trip(redis_client: redis.Redis) -> None:
    # Given a flushed server
    assert redis_client.dbsize() == 0
    # When a key is written
    redis_client.set("icefleet:test:key", b"value")
    # Then it reads back
    assert redis_client.get("icefleet:test:key") == b"value"


def test_redis_process_restarts_on_same_port_with_its_data(redis_process: RedisProcess) -> None:
    # Given a key written to an append-only server
    client = redis.Redis.from_url(redis_process.url)
    client.set("survivor", b"1")
    client.close()
    port = redis_process.port
    # When the server is stopped and started again
    redis_process.stop()
    assert not redis_process.running
    redis_process.start()
    # Then it is back on the same port, with the key
    assert redis_process.port == port
    client = redis.Redis.from_url(redis_process.url)
    assert client.get("survivor") == b"1"
    client.close()


def test_postgres_catalog_creates_a_namespace(postgres_catalog_url: str, tmp_path: Path) -> None:
    from pyiceberg.catalog.sql import SqlCatalog

    # Given an empty database of our own
    engine = sa.create_engine(postgres_catalog_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT current_user")).scalar() is not None
        tables = sa.inspect(conn).get_table_names()
    engine.dispose()
    assert tables == []
    # When a SQL catalog is created on it, with a namespace
    catalog = SqlCatalog(
        "pg", uri=postgres_catalog_url, warehouse=tmp_path.as_uri(), init_catalog_tables="true"
    )
    catalog.create_namespace("events")
    # Then the namespace is listed, and stored in PostgreSQL
    assert ("events",) in catalog.list_namespaces()
    catalog.engine.dispose()


def test_s3_object_round_trip(s3_endpoint: S3Endpoint, s3_bucket: str) -> None:
    # Given a fresh bucket
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_endpoint.client()
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    # When an object is put
    client.put_object(Bucket=bucket, Key="hello.txt", Body=b"hello")
    # Then it reads back
    assert client.get_object(Bucket=bucket, Key="hello.txt")["Body"].read() == b"hello"
    client.close()


def test_s3_parquet_round_trip_with_pyarrow(s3_endpoint: S3Endpoint, s3_bucket: str) -> None:
    # Given pyarrow's S3 filesystem pointed at the moto server
    fs = pafs.S3FileSystem(
        access_key=s3_endpoint.access_key_id,
        secret_key=s3_endpoint.secret_access_key,
        region=s3_endpoint.region,
        endpoint_override=s3_endpoint.host_port,
        scheme="http",
    )
    table = pa.table({"id": ["a", "b", "c"], "n": [1, 2, 3]})
    path = f"{s3_bucket.removeprefix('s3://')}/events/part-0.parquet"
    # When a Parquet file is written there
    pq.write_table(table, path, filesystem=fs)
    # Then it reads back unchanged, and boto3 sees the same object
    assert pq.read_table(path, filesystem=fs).equals(table)
    bucket, key = path.split("/", 1)
    client = s3_endpoint.client()
    assert client.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
    client.close()


def test_s3_credentials_stay_in_the_fixture_value(s3_endpoint: S3Endpoint) -> None:
    # The fake credentials travel in the fixture value: not in os.environ, not in repr.
    assert os.environ.get("AWS_SECRET_ACCESS_KEY") != s3_endpoint.secret_access_key
    assert s3_endpoint.secret_access_key not in repr(s3_endpoint)


def test_s3_env_points_default_boto3_at_moto(s3_env: S3Endpoint, s3_bucket: str) -> None:
    import boto3

    # Given only the environment that s3_env set for this test
    client = boto3.client("s3")
    # When listing buckets with default configuration
    names = [b["Name"] for b in client.list_buckets()["Buckets"]]
    # Then the call reached moto, which holds this test's bucket
    assert s3_bucket.removeprefix("s3://") in names
    client.close()


def test_pyiceberg_table_on_postgres_catalog_and_s3_warehouse(
    postgres_catalog_url: str, s3_endpoint: S3Endpoint, s3_bucket: str
) -> None:
    from pyiceberg.catalog.sql import SqlCatalog

    # Given the production shape: a PostgreSQL SQL catalog with its warehouse on S3
    catalog = SqlCatalog(
        "pg_s3",
        uri=postgres_catalog_url,
        warehouse=f"{s3_bucket}/warehouse",
        **s3_endpoint.fileio_properties(),
    )
    catalog.create_namespace("events")
    rows = pa.table({"id": pa.array(["a", "b"], pa.string()), "n": pa.array([1, 2], pa.int64())})
    table = catalog.create_table("events.smoke", schema=rows.schema)
    # When rows are appended
    table.append(rows)
    # Then a fresh load of the table reads them back from S3
    assert catalog.load_table("events.smoke").scan().to_arrow().sort_by("id").equals(rows)
    catalog.engine.dispose()
