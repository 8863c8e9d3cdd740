"""The claims protocol (common/coord/claims.py) and the commit digest, on a real redis-server and
SQLite catalog, in-process: each step of a batch's fate, and what it leaves for the next batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from common.commit.committer import BATCHES_PROPERTY, SEQ_PROPERTY, PreparedCommit
from common.coord import keys
from common.coord.claims import BUCKETS, EventClaims, claim_batch, release_events
from common.errors import CommitVerificationError
from common.maintenance.invariants import assert_exactly_once
from tests.support.events import ids_of, make_events, ndjson
from tests.support.stack import TABLE, Stack, make_stack

pytestmark = pytest.mark.integration
WINDOW_S = 3_600


def rows(events: list[dict], table: str = TABLE, start: int = 0) -> dict[str, list]:
    return {
        table: [
            (start + n, e["source"], e["id"], orjson.dumps(e).decode())
            for n, e in enumerate(events)
        ]
    }


@pytest.fixture
def claims(redis_client: redis.Redis) -> EventClaims:
    return EventClaims(redis_client)


@pytest.fixture
def pipe(redis_client: redis.Redis, redis_url: str, icefleet_home: Path) -> Iterator[Stack]:
    pipeline = make_stack(redis_url, icefleet_home)
    yield pipeline
    pipeline.close()


def test_a_claim_is_kept_by_its_place_and_refused_to_any_other(claims: EventClaims) -> None:
    # Given batch b1 claimed three events
    events = make_events("e", 3)
    assert claim_batch(claims, "b1", rows(events), WINDOW_S).skip == set()

    # When b1 is delivered again, and its split child b1~1 claims its own events
    again = claim_batch(claims, "b1", rows(events), WINDOW_S)
    child = claim_batch(claims, "b1~1", rows(events[1:]), WINDOW_S)
    # Then both find the claims theirs (same place in the same lineage)
    assert again.skip == child.skip == set()

    # When another batch carries the same events, one with other bytes
    changed = [events[0], events[1], {**events[2], "subject": "other"}]
    other = claim_batch(claims, "b2", rows(changed), WINDOW_S)
    # Then the byte-identical ones are duplicates and the other a conflict, nothing is claimed
    assert other.skip == {0, 1, 2}
    assert sorted(other.repeats) == [(0, TABLE, "d"), (1, TABLE, "d"), (2, TABLE, "c")]
    assert other.counts(before=3) == {TABLE: (2, 1)}
    assert other.counts(before=1) == {TABLE: (1, 0)}  # past a split point: the child's business

    # And in another table the same identities are free
    assert claim_batch(claims, "b2", rows(events, "events.other"), WINDOW_S).skip == set()


def test_a_repeat_inside_a_batch_is_judged_against_its_first_occurrence(
    claims: EventClaims,
) -> None:
    # Given a batch holding an event, its exact twin and a variant under the same identity
    event = make_events("e", 1)[0]
    batch = [event, event, {**event, "subject": "variant"}]
    # When it is claimed, Then the first is written, the twin dropped, the variant a conflict
    verdicts = claim_batch(claims, "b1", rows(batch), WINDOW_S)
    assert verdicts.skip == {1, 2}
    assert sorted(verdicts.repeats) == [(1, TABLE, "d"), (2, TABLE, "c")]
    # And the split child holding the twin (b1~1) sees it as a repeat too, not as its own
    child = claim_batch(claims, "b1~1", rows(batch[1:]), WINDOW_S)
    assert sorted(child.repeats) == [(0, TABLE, "d"), (1, TABLE, "c")]


def test_release_frees_exactly_the_claims_of_that_place(claims: EventClaims) -> None:
    # Given b1 claimed two events and b2 found them taken
    events = make_events("e", 2)
    claim_batch(claims, "b1", rows(events), WINDOW_S)
    # When another batch tries to release them, nothing happens
    assert release_events(claims, "b2", rows(events), WINDOW_S) == 0
    # When b1 (dead-lettered) releases them, they are free: a replay claims them
    assert release_events(claims, "b1", rows(events), WINDOW_S) == 2
    replay = claim_batch(claims, "~replay-abc", rows(events), WINDOW_S)
    assert replay.skip == set()
    assert release_events(claims, "b1", rows(events), WINDOW_S) == 0  # the replay's now


def test_claims_live_in_time_buckets_that_expire_one_window_after_they_end(
    claims: EventClaims, redis_client: redis.Redis
) -> None:
    # Given a claim made now
    claim_batch(claims, "b1", rows(make_events("e", 1)), WINDOW_S)
    # Then it is in one bucket hash whose TTL is the window plus at most one bucket
    (key,) = redis_client.keys(keys.claims_prefix(TABLE) + "*")
    ttl = redis_client.ttl(key)
    assert WINDOW_S - 5 <= ttl <= WINDOW_S + WINDOW_S // BUCKETS + 5
    assert redis_client.hlen(key) == 1


def test_repeats_are_counted_once_per_batch_and_table_however_often_it_is_written(
    pipe: Stack,
) -> None:
    # Given a batch that landed
    events = make_events("e", 5)
    assert pipe.write("b1", events).records == 5
    # When another batch carrying three of them plus two new ones is written twice (redelivery)
    events2 = events[:3] + make_events("f", 2)
    first = pipe.write("b2", events2)
    second = pipe.write("b2", events2)
    # Then the first write dropped three, the second found the batch registered
    assert first.records == 2 and first.duplicates == {TABLE: (3, 0)}
    assert second.files == {} and second.skipped_tables == [TABLE]
    assert pipe.registry.duplicates() == {TABLE: (3, 0)}
    # When a batch whose events all landed is written, Then it registers an empty part
    third = pipe.write("b3", events[:2])
    assert third.files == {} and third.duplicates == {TABLE: (2, 0)}
    assert pipe.registry.is_known(TABLE, "b3")
    assert pipe.registry.duplicates() == {TABLE: (5, 0)}
    pipe.commit()
    assert_exactly_once(pipe.table(), ids_of(events) + ids_of(events2[3:]))


def test_a_compiled_batch_with_repeats_is_written_again_without_them_and_leaves_no_file(
    pipe: Stack,
) -> None:
    # Given a table that exists (so the compiled path reads the next batches) and holds 4 events
    events = make_events("e", 4)
    assert pipe.write("b1", events).records == 4
    data = Path(pipe.table().location().removeprefix("file://")) / "data"
    files_before = set(data.rglob("*.parquet"))
    # When a batch of new events is written in chunks, Then the compiled path keeps it (its
    # claims were made while its first chunk was written)
    fresh = make_events("f", 6)
    result = pipe.writer.write("b2", ndjson(fresh), enqueued_at_ms=0, chunk_events=2)
    assert result.path == "compiled" and result.records == 6 and result.duplicates == {}
    written = set(data.rglob("*.parquet")) - files_before
    # When a batch in chunks repeats two landed events among new ones
    mixed = [*events[:2], *make_events("g", 3)]
    result = pipe.writer.write("b3", ndjson(mixed), enqueued_at_ms=0, chunk_events=2)
    # Then the reference path wrote it without the repeats, counted them, and the files the
    # compiled path had written for its first chunk are gone: every file is registered
    assert result.path == "reference" and result.records == 3
    assert result.duplicates == {TABLE: (2, 0)}
    registered = {Path(f.file_path.removeprefix("file://")) for f in result.files[TABLE]}
    assert set(data.rglob("*.parquet")) - files_before - written == registered
    pipe.commit()
    assert_exactly_once(pipe.table(), ids_of(events) + ids_of(fresh) + ids_of(mixed[2:]))


def test_a_compiled_batch_for_several_tables_claims_each_event_in_its_table_at_its_place(
    pipe: Stack, claims: EventClaims
) -> None:
    # Given two tables that exist (a first batch creates both)
    window_s = pipe.settings.dedup_window_s
    tables = {"com.example.order": TABLE, "com.example.refund": "events.refund"}
    first = make_events("e", 4, types=tuple(tables))
    assert pipe.write("b1", first).records == 4
    # When a batch of new events interleaving the two tables is written in chunks
    fresh = make_events("f", 7, types=tuple(tables))
    result = pipe.writer.write("b2", ndjson(fresh), enqueued_at_ms=0, chunk_events=3)
    # Then the compiled path took it whole, and claimed each event in its table at its place
    # in the batch: the reference path's claims of the same events there find them its own
    assert result.path == "compiled" and result.records == 7 and result.duplicates == {}
    placed = {
        table: [(n, e["source"], e["id"], orjson.dumps(e).decode()) for n, e in enumerate(fresh)]
        for table in tables.values()
    }
    placed = {
        table: [row for row, e in zip(events, fresh, strict=True) if tables[e["type"]] == table]
        for table, events in placed.items()
    }
    assert claim_batch(claims, "b2", placed, window_s).repeats == []
    # ... at any other place they are repeats, and in the other table they are not claimed
    shifted = {table: [(n + 1, *rest) for n, *rest in rows] for table, rows in placed.items()}
    assert len(claim_batch(claims, "b2", shifted, window_s).repeats) == 7
    swapped = {TABLE: placed["events.refund"]}
    assert claim_batch(claims, "b2", swapped, window_s).repeats == []
    release_events(claims, "b2", swapped, window_s)  # (that claim was this test's own)
    # When a later batch repeats an event of each table among new ones
    later = [fresh[0], *make_events("g", 4, types=tuple(tables)), fresh[1]]
    result = pipe.write("b3", later)
    # Then the reference path wrote the new ones only and counted the repeats per table
    assert result.path == "reference" and result.records == 4
    assert result.duplicates == {TABLE: (1, 0), "events.refund": (1, 0)}
    pipe.commit_all()
    for table in tables.values():
        want = [e["id"] for e in [*first, *fresh, *later[1:-1]] if tables[e["type"]] == table]
        assert_exactly_once(pipe.table(table), want)


def test_a_table_with_dedupe_off_lands_every_copy(
    redis_client: redis.Redis, redis_url: str, icefleet_home: Path
) -> None:
    # Given dedupe off for the table
    pipe = make_stack(redis_url, icefleet_home, dedupe_tables=((TABLE, False),))
    try:
        events = make_events("e", 3)
        # When the same events come in two batches
        pipe.write("b1", events)
        pipe.write("b2", events)
        pipe.commit()
        # Then both copies land
        assert sorted(pipe.ids()) == sorted(ids_of(events) * 2)
    finally:
        pipe.close()


def test_recovery_stops_a_table_whose_landed_commit_names_other_batches(pipe: Stack) -> None:
    # Given a commit of batch b1 that landed with seq 1
    pipe.write("b1", make_events("b1", 2))
    (result,) = pipe.commit()
    table = pipe.table()
    summary = table.current_snapshot().summary.additional_properties
    assert summary[BATCHES_PROPERTY] == PreparedCommit(1, ("b1",), 0).digest
    assert table.metadata.properties[BATCHES_PROPERTY] == summary[BATCHES_PROPERTY]
    assert len(summary[BATCHES_PROPERTY]) == 16 and summary[SEQ_PROPERTY] == "1"

    # When a prepared record claims seq 1 for another batch still pending (another fleet's
    # Redis, a restored copy)
    pipe.write("b2", make_events("b2", 2))
    pipe.registry.prepare(TABLE, PreparedCommit(1, ("b2",), 0).to_json())

    # Then the committer refuses to finish it, with a clear error, and leaves pending as it is
    with pytest.raises(CommitVerificationError, match=r"seq 1 landed with other batches"):
        pipe.commit()
    assert set(pipe.registry.pending_entries(TABLE)) == {"b2"}
    assert pipe.registry.prepared(TABLE) is not None

    # And a prepared record matching what landed is finished as before
    pipe.registry.prepare(TABLE, PreparedCommit(1, ("b1",), 0).to_json())
    pipe.commit()
    assert_exactly_once(pipe.table(), ids_of(make_events("b1", 2)) + ids_of(make_events("b2", 2)))
    assert result.seq == 1


def test_a_writer_payload_under_a_bound_id_with_other_content_is_dead_lettered_whole(
    rt, redis_client: redis.Redis
) -> None:
    # Given a batch id bound to its events (a first write)
    from common.coord.deadletters import DeadLetterStore
    from workers.tasks.write import write_batch

    first = ndjson(make_events("x", 2))
    assert write_batch.apply(kwargs={"batch_id": "bx", "payload": first}).get()["records"] == 2
    # When a message (a producer in another language) brings other events under that id
    other = ndjson(make_events("y", 3))
    result = write_batch.apply(kwargs={"batch_id": "bx", "payload": other}).get()
    # Then it is dead-lettered whole with the reason, not skipped
    assert "is taken" in result["dead_lettered"]
    (letter,) = DeadLetterStore(redis_client).list()
    assert letter.batch_id == "bx" and letter.raw == other.encode()
    assert "first enqueued with other events" in letter.reason
