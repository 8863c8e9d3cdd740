"""The write path: events in, Parquet files with exact DataFiles out (local warehouse, SQLite)."""

from __future__ import annotations

import contextlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.ingest.events import encode_ndjson
from common.ingest.routing import Router, TableName
from common.lake.catalog import TableStore, open_catalog
from common.lake.datafiles import data_file_from_json, data_file_to_json
from common.schema.layout import ENVELOPE_COLUMNS
from common.settings import Settings, load_settings
from common.write.batch_writer import BatchWriter
from common.write.datafile_writer import file_stem

pytestmark = pytest.mark.unit
WEBHOOKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "github-webhooks.ndjson"


def make_writer(home: Path, **overrides: Any) -> tuple[BatchWriter, Settings]:
    settings = load_settings({}, home=home, **overrides)
    store = TableStore(open_catalog(settings), lambda _table: contextlib.nullcontext())
    return BatchWriter(settings, store, Router(settings.routes, settings.namespace)), settings


def event(i: int, type_: str = "com.example.order", **data: Any) -> dict[str, Any]:
    when = datetime(2024, 3, 1, tzinfo=UTC) + timedelta(hours=i)
    return {
        "specversion": "1.0",
        "id": f"e-{i}",
        "source": "/shop",
        "type": type_,
        "time": when.isoformat().replace("+00:00", "Z"),
        "data": {"n": i, "name": f"item {i}", **data},
    }


def test_row_group_size_is_honoured_exactly(tmp_path: Path) -> None:
    # Given 5,000 events of one day and a row-group size of 1,000
    writer, _ = make_writer(tmp_path, row_group_rows=1_000)
    events = [{**event(0), "id": f"e-{i}"} for i in range(5_000)]
    # When the batch is written
    result = writer.write("rg", encode_ndjson(events))
    # Then one file holds 5 row groups of exactly 1,000 rows
    (files,) = result.files.values()
    assert len(files) == 1
    meta = pq.read_metadata(files[0].file_path.removeprefix("file://"))
    assert meta.num_row_groups == 5
    assert [meta.row_group(i).num_rows for i in range(5)] == [1_000] * 5
    assert files[0].record_count == 5_000


def test_one_file_per_table_and_day_at_a_path_derived_from_the_batch(tmp_path: Path) -> None:
    # Given events of two types over three days, and one without time
    writer, _ = make_writer(tmp_path)
    events = [event(i * 30) for i in range(4)] + [event(1, "com.example.signup")]
    no_time = event(99)
    del no_time["time"]
    # When written twice under the same batch id (no registry: both attempts write)
    first = writer.write("batch/../1", encode_ndjson([*events, no_time]))
    second = writer.write("batch/../1", encode_ndjson([*events, no_time]))
    # Then files are per (table, day), inside the table location, named after the batch
    paths = sorted(f.file_path for fs in first.files.values() for f in fs)
    assert len(first.files["events.order"]) == 5  # 4 days (0h, 30h, 60h, 90h) + null
    assert len(first.files["events.signup"]) == 1
    assert all("/../" not in p and file_stem("batch/../1") in p for p in paths)
    assert any("time_day=null" in p for p in paths)
    assert first.records == 6
    # And each attempt has paths of its own: one never overwrites another's files
    assert not set(paths) & {f.file_path for fs in second.files.values() for f in fs}


class FirstWins:
    """A pending registry as two racing attempts see it: neither knows the batch yet when it
    checks, and the first to register wins (as the real one's atomic registration does)."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], str] = {}

    def is_known(self, table: str, batch_id: str) -> bool:
        return False

    def register(
        self, table: str, batch_id: str, entry_json: str, duplicates: tuple[int, int] = (0, 0)
    ) -> bool:
        return self.entries.setdefault((table, batch_id), entry_json) is entry_json


def test_racing_attempts_across_a_schema_change_never_touch_the_registered_file(
    tmp_path: Path,
) -> None:
    # Given attempt A of a batch registered its file, then the table gained a column
    writer, _ = make_writer(tmp_path)
    writer.registry = FirstWins()
    payload = encode_ndjson([event(i) for i in range(20)])
    attempt_a = writer.write("dup", payload)
    (registered,) = attempt_a.files["events.order"]
    before = Path(registered.file_path.removeprefix("file://")).read_bytes()
    writer.write("other", encode_ndjson([event(0, extra="new column")]))
    # When attempt B of the same batch, which checked before A registered, writes under the
    # new schema
    attempt_b = writer.write("dup", payload)
    # Then B loses the registration and A's file is byte for byte what its DataFile describes
    assert attempt_b.files == {} and attempt_b.skipped_tables == ["events.order"]
    after = Path(registered.file_path.removeprefix("file://"))
    assert after.read_bytes() == before
    assert after.stat().st_size == registered.file_size_in_bytes
    assert pq.read_metadata(after).num_rows == registered.record_count == 20


def test_datafile_json_round_trip_is_lossless(tmp_path: Path) -> None:
    # Given a DataFile built from a written footer
    writer, _ = make_writer(tmp_path)
    result = writer.write("rt", encode_ndjson([event(i, flag=i % 2 == 0) for i in range(50)]))
    (files,) = result.files.values()
    original = files[0]
    # When it goes to JSON and back
    restored = data_file_from_json(data_file_to_json(original))
    # Then every field is equal
    for name in (
        "content",
        "file_path",
        "file_format",
        "record_count",
        "file_size_in_bytes",
        "column_sizes",
        "value_counts",
        "null_value_counts",
        "nan_value_counts",
        "lower_bounds",
        "upper_bounds",
        "split_offsets",
        "spec_id",
        "key_metadata",
    ):
        assert getattr(restored, name) == getattr(original, name), name
    assert restored.partition == original.partition
    assert json.loads(data_file_to_json(restored)) == json.loads(data_file_to_json(original))


def test_datafile_matches_the_file_on_disk(tmp_path: Path) -> None:
    writer, _ = make_writer(tmp_path)
    result = writer.write("sz", encode_ndjson([event(i) for i in range(10)]))
    (files,) = result.files.values()
    path = Path(files[0].file_path.removeprefix("file://"))
    assert path.stat().st_size == files[0].file_size_in_bytes
    assert pq.read_metadata(path).num_rows == files[0].record_count


def test_typed_columns_and_rescue_of_conflicting_values(tmp_path: Path) -> None:
    # Given a table whose column n is a long
    writer, _ = make_writer(tmp_path)
    writer.write("a", encode_ndjson([event(1)]))
    # When a later event has a string in n and a nested object
    odd = event(2)
    odd["data"]["n"] = "two"
    odd["data"]["nested"] = {"x": 1}
    result = writer.write("b", encode_ndjson([odd]))
    (files,) = result.files.values()
    rows = pq.read_table(files[0].file_path.removeprefix("file://")).to_pylist()
    # Then the value is not cast but rescued, the nested object is a new struct column,
    # and raw_event is intact
    assert rows[0]["n"] is None
    assert rows[0]["nested"] == {"x": 1}
    assert json.loads(rows[0]["_rescued_data"]) == {"n": "two"}
    assert json.loads(rows[0]["raw_event"]) == odd


def test_integers_beyond_64_bits_are_rescued_exactly(tmp_path: Path) -> None:
    # Given an event whose data holds an integer no long column can hold
    writer, _ = make_writer(tmp_path)
    big = 2**70 + 1
    payload = json.dumps(event(1)).replace('"n": 1', f'"n": {big}')
    # When written
    result = writer.write("big", payload)
    (files,) = result.files.values()
    row = pq.read_table(files[0].file_path.removeprefix("file://")).to_pylist()[0]
    # Then it is in _rescued_data with every digit, and raw_event is the input
    assert json.loads(row["_rescued_data"]) == {"n": big}
    assert row["raw_event"] == payload


def test_strict_mode_dead_letters_what_does_not_fit(tmp_path: Path) -> None:
    writer, _ = make_writer(tmp_path, schema_mode="strict")
    writer.write("a", encode_ndjson([event(1)]))
    extra = event(2, unexpected=True)
    result = writer.write("b", encode_ndjson([event(3), extra]))
    assert result.records == 1
    (dead,) = result.dead_letters
    assert dead.position == 1 and "unexpected" in dead.reason and dead.attribute == "data"


def test_raw_mode_keeps_only_the_envelope(tmp_path: Path) -> None:
    writer, _ = make_writer(tmp_path, schema_mode="raw")
    writer.write("a", encode_ndjson([event(1)]))
    table = writer.store.load(TableName.parse("events.order"))
    assert table is not None
    assert {f.name for f in table.schema().fields} == set(ENVELOPE_COLUMNS)


def test_invalid_events_are_dead_lettered_and_the_rest_lands(tmp_path: Path) -> None:
    writer, _ = make_writer(tmp_path)
    payload = "\n".join(
        [json.dumps(event(1)), "{not json", json.dumps({"id": "x"}), json.dumps(event(2))]
    )
    result = writer.write("mixed", payload)
    assert result.records == 2
    assert sorted(d.position for d in result.dead_letters) == [1, 2]


def test_every_github_webhook_lands_or_is_dead_lettered(tmp_path: Path) -> None:
    if not WEBHOOKS.exists():
        pytest.skip("shared/data/github-webhooks.ndjson not present")
    # Given the real GitHub webhook file
    lines = [line for line in WEBHOOKS.read_text().splitlines() if line.strip()]
    writer, _ = make_writer(tmp_path)
    # When written as one batch
    result = writer.write("gh", "\n".join(lines))
    # Then every event is in a file or dead-lettered, none lost
    assert result.records + len(result.dead_letters) == len(lines)
    written_ids: list[str] = []
    for files in result.files.values():
        for f in files:
            written_ids += pq.read_table(f.file_path.removeprefix("file://"), columns=["id"])[
                "id"
            ].to_pylist()
    dead_positions = {d.position for d in result.dead_letters}
    expected = [json.loads(line)["id"] for i, line in enumerate(lines) if i not in dead_positions]
    assert sorted(written_ids) == sorted(expected)
    assert len(result.files) == 30  # one table per event type


printable = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
events_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "id": printable,
            "source": printable,
            "time": st.datetimes(
                min_value=datetime(1971, 1, 1),
                max_value=datetime(2200, 1, 1),
                timezones=st.just(UTC),
            ),
            "data": st.dictionaries(
                st.sampled_from(["a", "b", "c", "Name", "x y"]),
                st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), printable),
                max_size=4,
            ),
        }
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=events_strategy)
def test_any_batch_keeps_id_source_time_and_raw_event(
    tmp_path: Path, batch: list[dict[str, Any]]
) -> None:
    # Given any batch of valid events
    home = tmp_path / f"h{abs(hash(str(batch)))}"
    writer, _ = make_writer(home)
    raw = [
        {
            "specversion": "1.0",
            "type": "com.example.prop",
            "id": e["id"],
            "source": e["source"],
            "time": e["time"].isoformat(),
            "data": e["data"],
        }
        for e in batch
    ]
    # When written and read back
    result = writer.write("prop", encode_ndjson(raw))
    rows = []
    for files in result.files.values():
        for f in files:
            rows += pq.read_table(f.file_path.removeprefix("file://")).to_pylist()
    # Then each event's id, source, time and raw_event are kept exactly
    assert not result.dead_letters
    got = sorted((r["id"], r["source"], r["time"]) for r in rows)
    assert got == sorted((e["id"], e["source"], e["time"]) for e in batch)
    canonical = sorted(json.dumps(json.loads(r["raw_event"]), sort_keys=True) for r in rows)
    assert canonical == sorted(json.dumps(e, sort_keys=True) for e in raw)


def test_created_table_partitions_by_day_of_time_whatever_the_data(tmp_path: Path) -> None:
    # Given a first batch whose data has many fields (placeholder ids must not clash)
    writer, _ = make_writer(tmp_path)
    writer.write("p", encode_ndjson([event(1, **{f"f{i}": i for i in range(30)})]))
    # Then the table's partition field is day(time), and the files evolve cleanly after
    table = writer.store.load(TableName.parse("events.order"), fresh=True)
    assert table is not None
    (field,) = table.spec().fields
    assert table.schema().find_field(field.source_id).name == "time"
    assert str(field.transform) == "day"
    writer.write("q", encode_ndjson([event(2, later={"x": [1, 2]})]))
    fresh = writer.store.load(TableName.parse("events.order"), fresh=True)
    assert fresh is not None and fresh.schema().find_field("later.x") is not None
