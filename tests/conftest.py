"""Shared fixtures: real servers started once per session, with a clean slate for each test.

- Redis: one ``redis-server`` per session, flushed before each test that uses ``redis_client``;
  ``redis_process`` gives a test its own server it may stop and restart.
- PostgreSQL: ``postgres_url`` (``ICEFLEET_TEST_POSTGRES_URL``, else the local default) and
  ``postgres_catalog_url``, a fresh empty database per test for a pyiceberg ``SqlCatalog``.
- S3: moto's server once per session (``s3_endpoint``), a fresh bucket per test (``s3_bucket``).
- Catalog: ``catalog_backend`` runs a test once on the embedded SQLite catalog and once on a
  PostgreSQL one (its own database), for the tests whose subject is the catalog.

Markers come from the directory (``tests/unit`` → ``unit`` and so on, see
:func:`pytest_collection_modifyitems`), so no test goes unmarked and ``make test-unit`` cannot
miss one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support.catalogs import CatalogBackend, postgres_backend, sqlite_backend
from tests.support.services import (
    DEFAULT_POSTGRES_URL,
    POSTGRES_URL_ENV,
    RedisProcess,
    S3Endpoint,
    check_postgres,
    fresh_postgres_database,
    moto_s3_server,
    redis_server,
    s3_test_bucket,
)

MARKER_BY_DIRECTORY = {
    "unit": "unit",
    "integration": "integration",
    "chaos": "chaos",
    "stack": "stack",  # make test-stack only (Docker); make test leaves it out
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test by the directory it is in: the directory says what a test may use."""
    root = Path(__file__).parent
    for item in items:
        try:
            top = item.path.relative_to(root).parts[0]
        except ValueError:
            continue
        marker = MARKER_BY_DIRECTORY.get(top)
        if marker is None:
            continue
        others = {m.name for m in item.iter_markers()} & set(MARKER_BY_DIRECTORY.values())
        if others - {marker}:
            raise pytest.UsageError(
                f"{item.nodeid} is marked {sorted(others - {marker})} but lives in tests/{top}: "
                f"move it to the directory of its marker"
            )
        item.add_marker(marker)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    """A test's own redis-server, which it may ``stop()``/``start()`` on the same port and dir."""
    with RedisProcess(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def icefleet_home(tmp_path: Path) -> Path:
    home = tmp_path / "icefleet-home"
    home.mkdir()
    return home


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """SQLAlchemy URL of the test PostgreSQL; skips locally (fails in CI) when unreachable."""
    url = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL
    check_postgres(url)
    return url


@pytest.fixture
def postgres_catalog_url(postgres_url: str) -> Iterator[str]:
    """URL of an empty database of its own for this test's SQL catalog; dropped afterwards."""
    with fresh_postgres_database(postgres_url) as url:
        yield url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[S3Endpoint]:
    """moto's S3 server on 127.0.0.1, with fake credentials carried by the returned value."""
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: S3Endpoint) -> Iterator[str]:
    """``s3://<bucket>``: a fresh, empty bucket on the moto server, deleted after the test."""
    with s3_test_bucket(s3_endpoint) as uri:
        yield uri


@pytest.fixture
def s3_env(s3_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """Point code that reads AWS_* env vars (boto3, subprocesses) at moto, for this test only."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_endpoint.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_endpoint.secret_access_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_endpoint.region)
    monkeypatch.setenv("AWS_REGION", s3_endpoint.region)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint.endpoint_url)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    return s3_endpoint


@pytest.fixture(params=["sqlite", "postgres"])
def catalog_backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> CatalogBackend:
    """The catalog for this test, in this process's environment (children inherit it): the
    embedded SQLite one, then a PostgreSQL one in a database of its own with a local warehouse.
    Pass ``catalog_backend.catalog_name`` to ``make_stack(catalog=...)``."""
    if request.param == "sqlite":
        backend = sqlite_backend()
    else:
        url = request.getfixturevalue("postgres_catalog_url")
        backend = postgres_backend(url, tmp_path / "pg-warehouse")
    backend.apply(monkeypatch)
    return backend
