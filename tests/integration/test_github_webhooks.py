"""Real, messy nested JSON through the real fleet: the 172 GitHub webhook events of 30 types.

Every event lands exactly once in its table; for each event, every top-level ``data`` field is
either in a typed column with an equal value or in ``_rescued_data``; ``raw_event`` is
the input. The tables are read back with the independent iceberg-rust reader (pyiceberg-core's
DataFusion provider), not with the library that wrote them.
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from common.coord.deadletters import DeadLetterStore
from common.ingest.producer import Producer
from common.ingest.routing import Router
from common.lake.catalog import open_catalog
from common.settings import Settings, load_settings
from tests.support.fleet import running_fleet
from workers.fleet import Fleet

pytestmark = pytest.mark.integration
WEBHOOKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "github-webhooks.ndjson"


@pytest.fixture
def github_fleet(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Fleet]:
    monkeypatch.delenv("ICEFLEET_CATALOG", raising=False)
    monkeypatch.setenv("ICEFLEET_REDIS_URL", redis_url)
    monkeypatch.setenv("ICEFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ICEFLEET_COMMIT_INTERVAL_MS", "300")
    with running_fleet(load_settings(), writers=2) as fleet:
        yield fleet


def without_nulls(value: Any) -> Any:
    """Null, ``{}`` and absent are the same for a struct field (common/schema/inference.py); compare
    values with those dropped. raw_event keeps the exact input, checked separately."""
    if isinstance(value, dict):
        kept = {k: without_nulls(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None and v != {}}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def rust_rows(identifier: list[str], metadata_location: str) -> list[dict[str, Any]]:
    from datafusion import SessionContext
    from pyiceberg_core.datafusion import IcebergDataFusionTable

    ctx = SessionContext()
    ctx.register_table(
        "t",
        IcebergDataFusionTable(
            identifier=identifier, metadata_location=metadata_location, file_io_properties={}
        ),
    )
    return ctx.sql("SELECT * FROM t").to_arrow_table().to_pylist()  # type: ignore[no-any-return]


def test_every_github_event_lands_typed_or_rescued(
    github_fleet: Fleet, redis_client: redis.Redis
) -> None:
    if not WEBHOOKS.exists():
        pytest.skip("shared/data/github-webhooks.ndjson not present")
    # Given the 172 real webhook events, sent as raw lines in three batches
    lines = [line for line in WEBHOOKS.read_text().splitlines() if line.strip()]
    settings: Settings = github_fleet.settings
    with Producer(settings) as producer:
        for n in range(3):
            producer.enqueue(lines[n::3], batch_id=f"gh-{n}")
        # When the fleet has committed them
        result = producer.wait(timeout_s=120)
        assert result.done, result.describe()
    assert DeadLetterStore(redis_client).count() == 0

    # Then, read with iceberg-rust, each table holds exactly its events
    router = Router(settings.routes, settings.namespace)
    sent: dict[str, dict[str, str]] = {}
    for line in lines:
        event = json.loads(line)
        sent.setdefault(str(router.table_for(event["type"])), {})[event["id"]] = line
    assert len(sent) == 30
    catalog = open_catalog(settings)
    ctx = multiprocessing.get_context("spawn")
    checked_fields = typed_fields = 0
    with ctx.Pool(1) as pool:
        for name, by_id in sorted(sent.items()):
            table = catalog.load_table(tuple(name.split(".")))
            rows = pool.apply(rust_rows, (list(table.name()), table.metadata_location))
            assert sorted(r["id"] for r in rows) == sorted(by_id), name
            for row in rows:
                # raw_event is the input, byte for byte
                line = by_id[row["id"]]
                assert row["raw_event"] == line
                data = json.loads(line)["data"]
                rescued = json.loads(row["_rescued_data"]) if row["_rescued_data"] else {}
                # and every top-level data field is typed with an equal value, or rescued
                for key, value in data.items():
                    checked_fields += 1
                    if key in rescued:
                        assert rescued[key] == value, (name, key)
                    else:
                        assert key in row, (name, row["id"], key)
                        assert without_nulls(row[key]) == without_nulls(value), (name, key)
                        typed_fields += 1
    total = sum(len(json.loads(line)["data"]) for line in lines)
    assert checked_fields == total
    # and most of it is typed, not rescued
    print(f"{typed_fields} of {total} top-level data fields typed")
    assert typed_fields > 0.8 * total
