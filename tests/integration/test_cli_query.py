"""``icefleet query`` and ``icefleet tables`` on the tables a real ``icefleet demo`` made.

The demo runs as a user runs it (its own redis-server, a writer, a committer; nothing configured)
and stops its fleet; the queries then read its tables with no fleet running, through iceberg-rust
(DataFusion over pyiceberg-core), and must return the counts the demo printed. The query the demo
suggests at its end is run as printed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "workers.cli.main"]
EVENTS = 1_500


def icefleet(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEFLEET_", "PYICEBERG_"))}
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@dataclass
class Demo:
    cwd: Path
    stdout: str
    rows: dict[str, int]  # "rows total" per table, as the demo printed it


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    cwd = tmp_path_factory.mktemp("demo")
    done = icefleet(cwd, "demo", "--events", str(EVENTS), "--writers", "1", "--batch-size", "500")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        # " events.page_view │ 1,046 │ 1,046 │ 1 │ 2 │ 1,046 "
        cells = [cell.strip() for cell in line.split("│")]
        if len(cells) == 6 and re.fullmatch(r"events\.\w+", cells[0]):
            rows[cells[0]] = int(cells[5].replace(",", ""))
    assert len(rows) == 3 and sum(rows.values()) == EVENTS, done.stdout
    return Demo(cwd, done.stdout, rows)


def test_query_counts_what_the_demo_printed(demo: Demo) -> None:
    # When each demo table is counted with query, once the demo's fleet is gone
    for table, printed in demo.rows.items():
        result = icefleet(demo.cwd, "query", "--json", f"SELECT count(*) AS n FROM {table}")

        # Then the count is the demo's
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == [{"n": printed}]

    # And tables lists the same rows (lag unknown: no fleet runs)
    listed = icefleet(demo.cwd, "tables", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {row["table"]: row["rows"] for row in json.loads(listed.stdout)} == demo.rows
    assert all(row["lag_ms"] is None for row in json.loads(listed.stdout))


def test_the_query_the_demo_suggests_runs_as_printed(demo: Demo) -> None:
    # Given the query line the demo printed at its end
    (line,) = [ln.strip() for ln in demo.stdout.splitlines() if "icefleet query" in ln]
    args = shlex.split(line)[1:]

    # When it runs as printed, and as CSV
    table = icefleet(demo.cwd, *args)
    as_csv = icefleet(demo.cwd, *args, "--csv")

    # Then the orders per country add up to the orders the demo printed
    assert table.returncode == 0, table.stderr
    assert "country" in table.stdout
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert sum(int(row["orders"]) for row in rows) == demo.rows["events.order_placed"]
    assert len({row["country"] for row in rows}) == len(rows) > 1


def test_query_refuses_writes_and_bad_sql_with_one_line(demo: Demo) -> None:
    for sql, says in (
        ("DROP TABLE events.page_view", "query failed"),
        ("SELEC 1", "query failed"),
        ("SELECT nosuchcolumn FROM events.page_view", "No field named nosuchcolumn"),
    ):
        result = icefleet(demo.cwd, "query", sql)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1
        assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    # And the table is still there, whole
    count = icefleet(demo.cwd, "query", "--csv", "SELECT count(*) AS n FROM events.page_view")
    assert count.stdout.splitlines() == ["n", str(demo.rows["events.page_view"])]
