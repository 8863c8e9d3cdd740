"""Fixtures shared by integration tests: worker tasks run in this process (``rt``), and a fleet
of real worker processes (``fleet``) on the catalog a test module's ``backend`` fixture gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import workers.runtime
from common.settings import Settings, load_settings
from tests.support.catalogs import CatalogBackend
from tests.support.fleet import running_fleet
from workers.app import create_app
from workers.fleet import Fleet
from workers.runtime import Runtime


@pytest.fixture
def rt(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Runtime]:
    """The worker runtime of this process: test Redis, SQLite catalog, commits due at once.

    Tasks are called with ``.apply()``: the writer and committer code of a worker, without
    worker processes.
    """
    settings = load_settings(
        {}, redis_url=redis_url, home=tmp_path / "home", commit_interval_ms=1, canary_interval_s=90
    )
    app = create_app(settings)
    runtime = Runtime(settings, redis_client)
    monkeypatch.setattr(workers.runtime, "_runtime", runtime)
    yield runtime
    app.close()


@pytest.fixture
def fleet_settings(
    backend: CatalogBackend,
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """The environment of a fleet on ``backend`` (a test module's ``backend`` fixture), set for
    this test, and the settings it loads."""
    backend.apply(monkeypatch)
    monkeypatch.setenv("ICEFLEET_REDIS_URL", redis_url)
    monkeypatch.setenv("ICEFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ICEFLEET_COMMIT_INTERVAL_MS", "500")
    return load_settings()


@pytest.fixture
def fleet(fleet_settings: Settings) -> Iterator[Fleet]:
    """Two writers and a committer on ``fleet_settings``, reaped afterwards."""
    with running_fleet(fleet_settings, writers=2, log_lines=40, check_reaped=True) as fleet:
        yield fleet
