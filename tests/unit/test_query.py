"""The pieces of ``icefleet query`` that need no catalog: names as typed in SQL, the tables a
query mentions, the FileIO properties handed to iceberg-rust, DataFusion's errors, and the JSON
and CSV writers. Queries over real tables: tests/integration/test_cli_query.py."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from decimal import Decimal

import pyarrow as pa
import pytest

from common.errors import QueryError, TableNotFoundError
from common.lake.query import file_io_properties, mentioned, query_error, sql_name
from workers.cli.query import cell, write_csv, write_json, write_table

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("identifier", "typed"),
    [
        (("events", "order_placed"), "events.order_placed"),
        (("Sales", "q1"), '"Sales".q1'),
        (("events", "2024-orders"), 'events."2024-orders"'),
        (("events", 'say "hi"'), 'events."say ""hi"""'),
    ],
)
def test_sql_name_quotes_only_what_needs_it(identifier: tuple[str, ...], typed: str) -> None:
    assert sql_name(identifier) == typed


def test_mentioned_finds_tables_named_as_words() -> None:
    tables = [("events", "order"), ("events", "order_placed"), ("events", "page_view")]
    found = mentioned("SELECT count(*) FROM events.ORDER_PLACED JOIN x.order o", tables)
    assert found == [("events", "order"), ("events", "order_placed")]
    assert mentioned("SELECT 1", tables) == []


def test_file_io_properties_keep_storage_keys_and_address_endpoints_by_path() -> None:
    properties = {
        "uri": "postgresql://u:secret@127.0.0.1/db",
        "warehouse": "s3://b",
        "s3.endpoint": "http://127.0.0.1:9000",
        "s3.secret-access-key": "k",
    }
    chosen = file_io_properties(properties)
    assert chosen == {
        "s3.endpoint": "http://127.0.0.1:9000",
        "s3.secret-access-key": "k",
        "s3.path-style-access": "true",
    }
    assert (
        file_io_properties({"s3.path-style-access": "false", "s3.endpoint": "x"})[
            "s3.path-style-access"
        ]
        == "false"
    )


def test_query_errors_name_the_missing_table_on_one_line() -> None:
    missing = query_error(
        ValueError("Error during planning: table 'datafusion.events.x' not found")
    )
    assert isinstance(missing, TableNotFoundError)
    assert missing.table == "events.x"
    other = query_error(ValueError("Schema error:\n  No field named y."))
    assert isinstance(other, QueryError)
    assert str(other) == "query failed: Schema error: No field named y."


def result() -> tuple[pa.Schema, list[pa.RecordBatch]]:
    table = pa.table(
        {
            "id": ["a", None],
            "at": pa.array([datetime(2025, 6, 1, 12, tzinfo=UTC), None], pa.timestamp("us", "UTC")),
            "price": pa.array([Decimal("1.10"), None], pa.decimal128(5, 2)),
            "ext": pa.array([[("k", "v")], None], pa.map_(pa.string(), pa.string())),
            "customer": [{"country": "DE"}, None],
        }
    )
    return table.schema, table.to_batches()


def test_json_is_an_array_of_objects_with_exact_values() -> None:
    schema, batches = result()
    stream = io.StringIO()
    write_json(schema, batches, stream)
    assert json.loads(stream.getvalue()) == [
        {
            "id": "a",
            "at": "2025-06-01T12:00:00+00:00",
            "price": "1.10",
            "ext": {"k": "v"},
            "customer": {"country": "DE"},
        },
        {"id": None, "at": None, "price": None, "ext": None, "customer": None},
    ]
    empty = io.StringIO()
    write_json(schema, [], empty)
    assert json.loads(empty.getvalue()) == []


def test_csv_has_a_header_and_nested_values_as_json() -> None:
    schema, batches = result()
    stream = io.StringIO()
    write_csv(schema, batches, stream)
    rows = list(csv.reader(io.StringIO(stream.getvalue())))
    assert rows == [
        ["id", "at", "price", "ext", "customer"],
        ["a", "2025-06-01T12:00:00+00:00", "1.10", '{"k":"v"}', '{"country":"DE"}'],
        ["", "", "", "", ""],
    ]
    assert cell(b"\x00\x01") == "AAE="


def test_table_output_shows_max_rows_and_counts_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given 5 rows in two batches
    table = pa.table({"n": list(range(5)), "name": ["a", None, "c", "d", "e"]})
    batches = table.to_batches(max_chunksize=3)

    # When the table output may show 2
    write_table(table.schema, batches, max_rows=2)

    # Then 2 rows are shown (a null as NULL) and the 3 others counted
    captured = capsys.readouterr()
    assert "NULL" in captured.out
    assert " c " not in captured.out
    assert captured.err.strip() == (
        "5 row(s); 3 more not shown (--max-rows, LIMIT, or --csv/--json)"
    )
