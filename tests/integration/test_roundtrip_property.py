"""The seed's property: any CloudEvents -> writer -> Parquet -> committed -> read back with pyiceberg
and with iceberg-rust: every event's attributes and ``raw_event`` are equal to what was sent.

The generator is the seed's: any (non-empty) strings for ``id`` and ``source``, times across the
whole RFC 3339 range (years 1 to 9999) in any of a few offsets, ``data`` absent, null, a string,
or an object of mixed values. Each example is one batch in one shared table (real Redis, the
SQLite catalog, the real writer and committer), read back by its ``_batch_id``. The example
count stays moderate so the test runs in CI in well under a minute.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.stack import Stack, make_stack

pytestmark = pytest.mark.integration

TABLE = "events.prop"
ATTRIBUTES = ("id", "source", "type", "specversion", "subject", "datacontenttype")
OFFSETS = (UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)))

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)
values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False), text
)
data = st.one_of(st.none(), text, st.dictionaries(st.sampled_from(["a", "b", "c", "x y"]), values))
event = st.fixed_dictionaries(
    {
        "id": text,
        "source": text,
        "time": st.datetimes(
            min_value=datetime(1, 1, 2),
            max_value=datetime(9999, 12, 30),
            timezones=st.sampled_from(OFFSETS),
        ),
    },
    optional={"data": data, "subject": text},
)
serial = itertools.count()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    # dedupe off: examples reuse (source, id) with other content on purpose; this is about the
    # round trip of any event, not about identity (tests/integration/test_event_dedupe.py is)
    pipeline = make_stack(redis_url, tmp_path_factory.mktemp("prop") / "home", dedupe=False)
    redis.Redis.from_url(redis_url).flushall()
    yield pipeline
    pipeline.close()


def as_sent(generated: dict[str, Any]) -> dict[str, Any]:
    sent = {
        "specversion": "1.0",
        "type": "com.example.prop",
        **generated,
        "time": generated["time"].isoformat(),
    }
    if isinstance(generated.get("data"), dict):
        sent["datacontenttype"] = "application/json"
    return sent


def pyiceberg_rows(pipe: Stack, batch_id: str) -> list[dict[str, Any]]:
    scan = pipe.table(TABLE).scan(row_filter=f"_batch_id = '{batch_id}'")
    return scan.to_arrow().select([*ATTRIBUTES, "time", "raw_event"]).to_pylist()


def rust_rows(pipe: Stack, batch_id: str) -> list[dict[str, Any]]:
    from datafusion import SessionContext
    from pyiceberg_core.datafusion import IcebergDataFusionTable

    table = pipe.table(TABLE)
    ctx = SessionContext()
    ctx.register_table(
        "t",
        IcebergDataFusionTable(
            identifier=list(table.name()),
            metadata_location=table.metadata_location,
            file_io_properties={},
        ),
    )
    columns = ", ".join([*ATTRIBUTES, "time", "raw_event"])
    sql = f"SELECT {columns} FROM t WHERE _batch_id = '{batch_id}'"
    return ctx.sql(sql).to_arrow_table().to_pylist()


def by_raw_event(row: dict[str, Any]) -> str:
    return str(row["raw_event"])


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(event, min_size=1, max_size=12))
def test_any_events_read_back_equal_with_pyiceberg_and_iceberg_rust(
    pipe: Stack, batch: list[dict[str, Any]]
) -> None:
    # Given any batch of CloudEvents, as a producer sends them (one JSON line each)
    sent = [as_sent(e) for e in batch]
    lines = [orjson.dumps(e).decode() for e in sent]
    batch_id = f"prop-{next(serial)}"
    # When a writer writes it and the committer commits it
    result = pipe.writer.write(batch_id, "\n".join(lines) + "\n", enqueued_at_ms=0)
    assert not result.dead_letters, result.dead_letters
    pipe.commit(TABLE)
    # Then both readers return each event once, attributes and raw_event equal to what was sent
    expected = sorted(
        (
            {
                **{name: sent_event.get(name) for name in ATTRIBUTES},
                "time": generated["time"].astimezone(UTC),
                "raw_event": line,
            }
            for sent_event, generated, line in zip(sent, batch, lines, strict=True)
        ),
        key=by_raw_event,
    )
    assert sorted(pyiceberg_rows(pipe, batch_id), key=by_raw_event) == expected
    assert sorted(rust_rows(pipe, batch_id), key=by_raw_event) == expected


def test_the_property_table_is_whole_afterwards(pipe: Stack) -> None:
    # Every file the examples wrote carries page checksums and reads back verified
    from common.maintenance.verify import verify_table

    if not pipe.catalog.table_exists(("events", "prop")):
        pytest.skip("no example ran")
    report = verify_table(pipe.table(TABLE), deep=True)
    assert report.ok and report.notes == [], report.problems + report.notes
