"""The sampled validation: which files each run checks (a rotation through tables and files), what
it records in Redis, and how the metrics and ``icefleet status`` show it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from common.coord import keys
from common.maintenance.deletes import live_data_files
from common.maintenance.sampling import choose, last_run, sample_verify
from common.observe.metrics import create_metrics
from tests.support.corruption import flip_byte_in_data_page
from tests.support.events import make_events
from tests.support.readback import local_path
from tests.support.stack import Stack, make_stack
from workers.cli.status import collect, render

pytestmark = pytest.mark.integration

TABLES = {"a.one": ["a1", "a2", "a3"], "b.two": [], "c.three": ["c1", "c2"]}


def runs(tables: dict[str, list[str]], budget: int, count: int) -> list[dict[str, list[str]]]:
    cursor: dict[str, str] = {}
    out = []
    for _ in range(count):
        chosen, cursor = choose(sorted(tables), lambda t: tables[t], cursor, budget)
        out.append(chosen)
    return out


def test_runs_rotate_through_every_file_of_every_table() -> None:
    assert runs(TABLES, 2, 4) == [
        {"a.one": ["a1", "a2"]},
        {"a.one": ["a3"], "c.three": ["c1"]},
        {"c.three": ["c2"], "a.one": ["a1"]},  # c.three ran out: on to the next table
        {"a.one": ["a2", "a3"]},
    ]


def test_a_budget_larger_than_the_warehouse_checks_each_file_once_per_run() -> None:
    assert runs(TABLES, 100, 2) == [{"a.one": ["a1", "a2", "a3"], "c.three": ["c1", "c2"]}] * 2


def test_tables_and_files_that_went_away_are_skipped() -> None:
    chosen, cursor = choose(["c.three"], lambda t: TABLES[t], {"table": "gone", "gone": "x"}, 5)
    assert chosen == {"c.three": ["c1", "c2"]} and "gone" not in cursor
    assert choose([], lambda t: [], {}, 5) == ({}, {})


@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    budget=st.integers(1, 7),
)
def test_every_file_is_checked_within_files_over_budget_runs(sizes: list[int], budget: int) -> None:
    tables = {f"n.t{i}": [f"t{i}-{j}" for j in range(size)] for i, size in enumerate(sizes)}
    total = sum(sizes)
    seen = []
    for run in runs(tables, budget, total // budget + len(tables) + 1):
        checked = [path for paths in run.values() for path in paths]
        assert len(checked) <= budget
        seen += checked
    assert set(seen) == {path for paths in tables.values() for path in paths}


# --- against Redis and a real table ------------------------------------------------------------


@pytest.fixture
def pipe(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> Iterator[Stack]:
    pipeline = make_stack(redis_url, tmp_path / "home")
    for n in range(5):
        pipeline.write(f"b{n}", make_events(f"b{n}", 20))
        pipeline.commit()
    yield pipeline
    pipeline.close()


def test_runs_record_their_results_and_the_metrics_and_status_show_them(
    pipe: Stack, redis_client: redis.Redis
) -> None:
    # Given five files, one of which has a byte flipped in a data page
    bad = sorted(live_data_files(pipe.table()))[3]
    flip_byte_in_data_page(local_path(bad), "raw_event")
    clock = iter([1_000.0, 2_000.0, 3_000.0])
    assert last_run(redis_client) is None
    # When the sampled validation runs three times, two files a run
    results = [
        sample_verify(redis_client, ["events.order"], pipe.table, 2, clock=lambda: next(clock))
        for _ in range(3)
    ]
    # Then each run checked at most two files, together all five, and the bad one was found once
    assert [r.files for r in results] == [2, 2, 1]
    assert [r.failures for r in results] == [0, 1, 0]
    assert results[1].bad_files[0]["file"] == bad
    assert "CRC checksum verification failed" in results[1].bad_files[0]["problems"][0]
    cursor = redis_client.hgetall(keys.verify_cursor())
    assert cursor[b"table"] == b"events.order" and cursor[b"events.order"] == b""
    recorded = last_run(redis_client)
    assert recorded is not None
    assert (recorded["checked_ms"], recorded["files"], recorded["failures_total"]) == (
        3_000_000,
        1,
        1,
    )

    # And the metrics carry the counter and the last run's time
    text = create_metrics(redis_client).render().decode()
    assert "icefleet_verify_failures_total 1.0" in text
    assert "icefleet_verify_last_run_timestamp_seconds 3000.0" in text
    assert "icefleet_verify_last_run_files 1.0" in text

    # And status shows them beside the canary's last probe
    redis_client.set(
        keys.canary_last(), b'{"status": "ok", "latency_s": 1.25, "checked_ms": 2999000}'
    )
    data = collect(pipe.settings, redis_client, pipe.catalog, None)
    assert data["checks"]["validation"]["failures_total"] == 1
    console = Console(record=True, width=200)
    data["at_ms"] = 3_060_000
    render(data, console)
    shown = console.export_text()
    assert "canary ok 1.2s end to end, 61.0s ago" in shown
    assert (
        "validation 1 file(s) in the last run, 0 bad, 60.0s ago; 1 bad file(s) found in all"
        in shown
    )


def test_status_before_any_probe_or_run(pipe: Stack, redis_client: redis.Redis) -> None:
    console = Console(record=True, width=200)
    render(collect(pipe.settings, redis_client, pipe.catalog, None), console)
    assert "canary no probe yet   validation no run yet" in console.export_text()
    text = create_metrics(redis_client).render().decode()
    assert "icefleet_verify_failures_total 0.0" in text
    assert "icefleet_verify_last_run_timestamp_seconds" not in text


def test_a_table_that_cannot_be_loaded_does_not_stop_the_rotation(
    pipe: Stack, redis_client: redis.Redis
) -> None:
    def load(name: str):  # type: ignore[no-untyped-def]
        if name == "events.gone":
            raise LookupError("no such table")
        return pipe.table(name)

    run = sample_verify(redis_client, ["events.gone", "events.order"], load, 10)
    assert run.files == 5 and run.errors == ["events.gone: LookupError: no such table"]
