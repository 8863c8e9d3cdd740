"""Where a test's catalog and warehouse live, as the environment every process of it reads.

icefleet names its catalog with ``ICEFLEET_CATALOG`` and configures it the pyiceberg way
(``PYICEBERG_CATALOG__<NAME>__*``); with no name it is the embedded SQLite catalog with a local
warehouse under ``ICEFLEET_HOME``. A :class:`CatalogBackend` holds those variables, so the same
test runs in this process, in spawned children and in worker processes against any of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.services import S3Endpoint


def catalog_env(name: str, **properties: str) -> dict[str, str]:
    """``ICEFLEET_CATALOG=name`` and ``PYICEBERG_CATALOG__NAME__KEY`` for each property."""
    prefix = f"PYICEBERG_CATALOG__{name.upper()}__"
    return {"ICEFLEET_CATALOG": name, **{prefix + k.upper(): v for k, v in properties.items()}}


@dataclass(frozen=True)
class CatalogBackend:
    """A catalog's kind (``sqlite``, ``postgres``, ``s3``), its environment, and the FileIO
    properties an outside reader (iceberg-rust) needs for its warehouse."""

    kind: str
    env: dict[str, str] = field(default_factory=dict)
    file_io: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def catalog_name(self) -> str | None:
        """The ``ICEFLEET_CATALOG`` value (``Settings.catalog_name``); None for the embedded one."""
        return self.env.get("ICEFLEET_CATALOG")

    def apply(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Set the environment for this test (children inherit it); nothing else is named."""
        monkeypatch.delenv("ICEFLEET_CATALOG", raising=False)
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)

    def __str__(self) -> str:
        return self.kind


def sqlite_backend() -> CatalogBackend:
    """The embedded default: nothing configured, SQLite and a warehouse under ICEFLEET_HOME."""
    return CatalogBackend("sqlite")


def postgres_backend(url: str, warehouse: Path, name: str = "testpg") -> CatalogBackend:
    """A pyiceberg SQL catalog in PostgreSQL at ``url``, its warehouse the local ``warehouse``."""
    warehouse.mkdir(parents=True, exist_ok=True)
    return CatalogBackend(
        "postgres", catalog_env(name, type="sql", uri=url, warehouse=warehouse.as_uri())
    )


def s3_backend(
    endpoint: S3Endpoint, bucket: str, catalog_db: Path, name: str = "tests3"
) -> CatalogBackend:
    """A SQLite catalog at ``catalog_db`` whose warehouse is ``bucket`` on moto's S3."""
    s3 = endpoint.fileio_properties()
    env = catalog_env(
        name,
        type="sql",
        uri=f"sqlite:///{catalog_db}",
        warehouse=bucket,
        s3__endpoint=s3["s3.endpoint"],
        s3__access_key_id=s3["s3.access-key-id"],
        s3__secret_access_key=s3["s3.secret-access-key"],
        s3__region=s3["s3.region"],
    )
    # moto answers on 127.0.0.1 only: iceberg-rust must address buckets by path, not subdomain
    return CatalogBackend("s3", env, {**s3, "s3.path-style-access": "true"})
