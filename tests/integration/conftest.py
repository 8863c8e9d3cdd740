"""Fixtures shared by integration tests that run worker tasks in this process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import workers.runtime
from common.settings import load_settings
from workers.app import create_app
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
