"""The committer under a steady stream: fair to other tables, flat as a table ages."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from common.commit.committer import MANIFEST_MERGE
from common.maintenance.invariants import validate_lineage
from tests.support.events import ids_of, make_events
from tests.support.readback import assert_exactly_once
from tests.support.stack import TABLE, make_stack

pytestmark = pytest.mark.integration


def test_batches_registered_during_a_commit_wait_for_the_next_one(
    redis_url: str, redis_client: redis.Redis, icefleet_home: Path
) -> None:
    # Given two pending batches, and a writer that registers a third while the commit runs
    pipe = make_stack(redis_url, icefleet_home)
    first = make_events("b1", 5) + make_events("b2", 5)
    pipe.write("b1", first[:5])
    pipe.write("b2", first[5:])
    late = make_events("b3", 5)

    def write_during_commit(point: str) -> None:
        if point == "after_prepare" and not pipe.registry.is_known(TABLE, "b3"):
            pipe.write("b3", late)

    committer = pipe.committer_with(write_during_commit)
    # When the table is committed
    results = committer.commit_table(TABLE)
    # Then that commit took only what was pending when it started (a stream cannot keep the
    # committer on one table forever), and the late batch lands with the next one, once
    assert [r.batches for r in results] == [2]
    assert pipe.registry.stats(TABLE).count == 1
    assert_exactly_once(pipe.table(), ids_of(first))
    pipe.commit()
    assert_exactly_once(pipe.table(), ids_of(first + late))
    assert validate_lineage(pipe.table()) == []


def test_manifests_are_merged_as_a_table_ages(
    redis_url: str, redis_client: redis.Redis, icefleet_home: Path
) -> None:
    # Given a table that receives many small commits
    pipe = make_stack(redis_url, icefleet_home)
    expected: list[str] = []
    for n in range(130):
        events = make_events(f"m{n}", 1)
        expected += ids_of(events)
        pipe.write(f"m{n}", events)
        pipe.commit()
    # Then the manifests do not grow with the commits (merge append), and nothing is lost
    table = pipe.table()
    snapshot = table.current_snapshot()
    assert snapshot is not None
    manifests = snapshot.manifests(table.io)
    assert len(manifests) < 100, len(manifests)
    assert table.metadata.properties.get(MANIFEST_MERGE, "true") != "false"
    assert_exactly_once(table, expected)
    assert validate_lineage(table) == []
