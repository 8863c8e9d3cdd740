"""Exactly once, end to end: real redis-server, SQLite and PostgreSQL catalogs, real processes.

Every batch written is committed once and only once, whatever happens around the committer:
another committer racing it, a crash at any step of the commit protocol, redelivery, an outside
writer appending to the same table, stale metadata, a data file vanishing before its commit.
Each test reads every event id back with pyiceberg and checks the table's lineage. The tests
whose subject is a catalog commit run on both catalogs (``catalog_backend``): the two databases
resolve concurrent commits differently (SQLite locks the file, PostgreSQL the row).
"""

from __future__ import annotations

import json
import multiprocessing
import queue
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.table import Table

from common.commit.committer import CommitResult, PreparedCommit, committed_seq
from common.coord import keys
from common.coord.deadletters import DeadLetterStore
from common.coord.locks import TableLock
from common.coord.pending import PendingEntry
from common.errors import (
    CommitStateUnknownError,
    ConcurrentModificationError,
    LockLostError,
    RetriesExhaustedError,
)
from common.maintenance.deletes import live_data_files, remove_data_files
from common.maintenance.invariants import validate_lineage
from tests.support.catalogs import CatalogBackend
from tests.support.events import ids_of, make_events
from tests.support.faults import CommitterCrash, raise_at
from tests.support.readback import assert_exactly_once, commit_seqs, local_path
from tests.support.services import wait_until
from tests.support.stack import (
    COMMITTERS_KEY,
    TABLE,
    Stack,
    make_stack,
    outside_append,
    run_committer_loop,
    run_committer_until_crash,
    run_outside_appender,
    run_remove_files,
)

pytestmark = pytest.mark.integration

SPAWN = multiprocessing.get_context("spawn")
JOIN_TIMEOUT_S = 60
FAULT_POINTS = ("after_prepare", "before_catalog_commit", "after_catalog_commit", "after_cleanup")


@pytest.fixture
def pipe(
    catalog_backend: CatalogBackend, redis_client: redis.Redis, redis_url: str, icefleet_home: Path
) -> Iterator[Stack]:
    """The stack on each catalog in turn (SQLite, PostgreSQL)."""
    with make_stack(redis_url, icefleet_home, catalog=catalog_backend.catalog_name) as stack:
        yield stack


@pytest.fixture
def redis_pipe(redis_client: redis.Redis, redis_url: str, icefleet_home: Path) -> Iterator[Stack]:
    """The stack on the embedded catalog, for tests of the Redis side alone."""
    with make_stack(redis_url, icefleet_home) as stack:
        yield stack


def write_batches(pipe: Stack, prefix: str, count: int, events: int = 3) -> list[str]:
    """Write ``count`` batches; return the ids of every event written."""
    ids: list[str] = []
    for n in range(count):
        batch = make_events(f"{prefix}{n:03d}", events)
        result = pipe.write(f"{prefix}{n:03d}", batch)
        assert result.records == events, result
        ids.extend(ids_of(batch))
    return ids


def assert_settled(pipe: Stack, table: Table, expected_ids: list[str]) -> None:
    """Every id exactly once, lineage valid, nothing left pending or prepared."""
    assert_exactly_once(table, expected_ids)
    assert validate_lineage(table) == []
    assert pipe.registry.pending_entries(TABLE) == {}
    assert pipe.registry.prepared(TABLE) is None
    assert TABLE not in pipe.registry.pending_tables()


def commit_until_done(pipe: Stack, runs: int = 20) -> list[CommitResult]:
    """Commit like the committer task does: a run that exhausts its attempts is run again."""
    for _ in range(runs - 1):
        try:
            return pipe.commit()
        except RetriesExhaustedError:
            continue  # the prepared record is still there: the next run resumes the same seq
    return pipe.commit()


def join_all(processes: list[Any]) -> None:
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
        if process.is_alive():
            process.kill()
            pytest.fail(f"{process.name} did not finish within {JOIN_TIMEOUT_S}s")


# --- racing committers --------------------------------------------------------------------------


def test_two_committer_processes_racing_commit_every_batch_exactly_once(
    pipe: Stack, redis_url: str, icefleet_home: Path
) -> None:
    # Given a table, and two committer processes looping on it
    expected = write_batches(pipe, "first", 1)
    pace = random.Random(7)
    ready, stop, results = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    committers = [
        SPAWN.Process(
            target=run_committer_loop,
            args=(redis_url, str(icefleet_home), TABLE, ready, stop, results, f"committer-{n}"),
            kwargs={"catalog": pipe.settings.catalog_name},
            name=f"committer-{n}",
        )
        for n in (1, 2)
    ]
    for process in committers:
        process.start()
    assert sorted(ready.get(timeout=JOIN_TIMEOUT_S) for _ in committers) == [
        "committer-1",
        "committer-2",
    ]

    # When batches are written in bursts of three while they race (at least 14 bursts, and until
    # both have committed some), every other burst written while the last is being committed;
    # then the committers are stopped
    written = bursts = 0
    while bursts < 14 or (pipe.client.scard(COMMITTERS_KEY) < 2 and bursts < 100):
        for _ in range(3):
            expected += write_batches(pipe, f"race{written:03d}-", 1)
            written += 1
        bursts += 1
        if bursts % 2 == 0:
            wait_until(lambda: not pipe.registry.pending_tables(), 30, "the burst to be committed")
        time.sleep(pace.uniform(0.0, 0.05))
    stop.set()
    join_all(committers)
    reports = dict(results.get(timeout=5) for _ in committers)
    leftover = pipe.commit()

    # Then both took part, and every batch was committed exactly once, by one snapshot of one
    assert [p.exitcode for p in committers] == [0, 0]
    assert all(reports[name] for name in ("committer-1", "committer-2")), reports
    table = pipe.table()
    assert_settled(pipe, table, expected)
    commits = [c for report in reports.values() for c in report]
    commits += [(r.seq, r.batches, r.attempts) for r in leftover]
    assert sum(batches for _, batches, _ in commits) == written + 1
    seqs = sorted(seq for seq, _, _ in commits)
    assert seqs == list(range(1, len(seqs) + 1)), "each commit-seq used by exactly one commit"
    assert commit_seqs(table) == seqs
    assert committed_seq(table) == len(seqs)


# --- crashes at every step of the protocol ------------------------------------------------------


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_committer_killed_at_any_step_is_recovered_exactly_once(
    pipe: Stack, redis_url: str, icefleet_home: Path, point: str
) -> None:
    # Given three pending batches
    expected = write_batches(pipe, "b", 3)

    # When a committer process dies (os._exit, no cleanup, lock still held) at the fault point
    child = SPAWN.Process(
        target=run_committer_until_crash,
        args=(redis_url, str(icefleet_home), TABLE, point, pipe.settings.catalog_name),
    )
    child.start()
    join_all([child])

    # Then it died there, leaving the state that step leaves
    assert child.exitcode == 17
    landed = point in ("after_catalog_commit", "after_cleanup")
    assert sorted(pipe.ids()) == (sorted(expected) if landed else [])
    assert (pipe.registry.prepared(TABLE) is None) == (point == "after_cleanup")
    assert len(pipe.registry.pending_entries(TABLE)) == (0 if point == "after_cleanup" else 3)

    # When one more batch arrives and a fresh committer runs (once the dead one's lock expires)
    expected += write_batches(pipe, "late", 1)
    results = pipe.commit()

    # Then every batch is there exactly once, nothing is left over, and a commit that had landed
    # was finished, not repeated: seq 1 for the first three batches, seq 2 for the late one
    table = pipe.table()
    assert_settled(pipe, table, expected)
    assert commit_seqs(table) == [1, 2]
    assert [r.seq for r in results] == ([1, 2] if point != "after_cleanup" else [2])
    if point != "after_cleanup":
        assert results[0].recovered and results[0].batches == 3
        assert results[0].files == (0 if landed else 3)  # nothing committed again
    for batch in ("b000", "b001", "b002", "late000"):
        assert pipe.registry.is_known(TABLE, batch)


# --- redelivery ----------------------------------------------------------------------------------


def test_a_batch_redelivered_after_its_commit_is_not_committed_twice(pipe: Stack) -> None:
    # Given a batch written and committed
    events = make_events("b1", 4)
    pipe.write("b1", events)
    pipe.commit()
    snapshots = len(pipe.table().snapshots())

    # When it is delivered again (same id, same payload), then the committer runs
    again = pipe.write("b1", events)
    refused = pipe.registry.register(TABLE, "b1", PendingEntry.of("b1", []).to_json())
    results = pipe.commit()

    # Then the writer skipped it, the registry refused it, and no snapshot was made
    assert again.skipped_tables == [TABLE] and again.files == {}
    assert refused is False
    assert results == []
    table = pipe.table()
    assert len(table.snapshots()) == snapshots
    assert_settled(pipe, table, ids_of(events))


def test_a_batch_redelivered_while_pending_is_committed_once(pipe: Stack) -> None:
    # Given a batch written but not committed yet
    events = make_events("b1", 4)
    pipe.write("b1", events)

    # When it is delivered again before the committer runs
    again = pipe.write("b1", events)
    results = pipe.commit()

    # Then the second delivery was skipped and one commit holds the batch once
    assert again.skipped_tables == [TABLE]
    assert [(r.batches, r.records) for r in results] == [(1, 4)]
    assert_settled(pipe, pipe.table(), ids_of(events))


# --- other writers of the same table --------------------------------------------------------------


def test_an_outside_writer_appending_concurrently_loses_nothing(
    pipe: Stack, redis_url: str, icefleet_home: Path
) -> None:
    # Given a table, and a process that appends rows with plain pyiceberg, knowing nothing of us
    expected = write_batches(pipe, "first", 1)
    pipe.commit()
    ready, start, done = SPAWN.Queue(), SPAWN.Event(), SPAWN.Queue()
    outside = SPAWN.Process(
        target=run_outside_appender,
        args=(str(icefleet_home), TABLE, 15, ready, start, done, pipe.settings.catalog_name),
    )
    outside.start()
    assert ready.get(timeout=JOIN_TIMEOUT_S) == "outside"

    # When it appends 15 times while we write and commit 15 batches (a commit that loses every
    # attempt to the appender gives up, and the next run resumes it, as the committer task would)
    start.set()
    for n in range(15):
        expected += write_batches(pipe, f"ours{n:02d}-", 1)
        commit_until_done(pipe)
    join_all([outside])
    appended = done.get(timeout=5)

    # Then both sides' rows are all there, each exactly once, and each commit-seq is used once
    assert outside.exitcode == 0 and appended == 15
    table = pipe.table()
    assert_settled(pipe, table, expected + [f"outside-{n}" for n in range(15)])
    assert commit_seqs(table) == list(range(1, 17))


def test_a_commit_based_on_stale_metadata_is_retried_and_lands_once(pipe: Stack) -> None:
    # Given pending batches, and an outside append that lands right before our catalog commit
    expected = write_batches(pipe, "b", 3)
    sneaked: list[str] = []

    def append_first(point: str) -> None:
        if point == "before_catalog_commit" and not sneaked:
            sneaked.append("sneaky-1")
            outside_append(pipe.catalog, TABLE, sneaked)

    committer = pipe.committer_with(append_first)

    # When the committer commits
    results = committer.commit_table(TABLE)

    # Then the first attempt conflicted, a later one landed, and only once
    assert len(results) == 1 and results[0].attempts >= 2
    table = pipe.table()
    assert_settled(pipe, table, expected + sneaked)
    assert commit_seqs(table) == [1]


def test_a_commit_whose_reply_was_lost_is_not_applied_twice(pipe: Stack) -> None:
    # Given pending batches, and a catalog whose first successful commit reply "gets lost"
    expected = write_batches(pipe, "b", 3)
    lost: list[str] = []

    def lose_reply(point: str) -> None:
        if point == "after_catalog_commit" and not lost:
            lost.append(point)
            raise CommitStateUnknownError(TABLE, "simulated timeout after the commit landed")

    committer = pipe.committer_with(lose_reply)

    # When the committer commits
    results = committer.commit_table(TABLE)

    # Then the retry saw the watermark and did not commit again
    assert lost and results[0].attempts == 2
    table = pipe.table()
    assert_settled(pipe, table, expected)
    assert commit_seqs(table) == [1]


# --- broken files -----------------------------------------------------------------------------


def test_a_pending_file_deleted_before_commit_is_quarantined(pipe: Stack) -> None:
    # Given three pending batches, and the data file of the middle one deleted from disk
    batches = {b: make_events(b, 3) for b in ("b1", "b2", "b3")}
    written = {b: pipe.write(b, events) for b, events in batches.items()}
    for data_file in written["b2"].files[TABLE]:
        local_path(data_file.file_path).unlink()

    # When the committer commits
    results = pipe.commit()

    # Then b2 is dead-lettered and not committed, and the rest is committed once
    assert [r.quarantined for r in results] == [["b2"]]
    assert results[0].batches == 2
    letters = DeadLetterStore(pipe.client).list()
    assert [(d.batch_id, d.table) for d in letters] == [("b2", TABLE)]
    assert "missing" in letters[0].reason
    assert not pipe.registry.is_known(TABLE, "b2")
    assert_settled(pipe, pipe.table(), ids_of(batches["b1"]) + ids_of(batches["b3"]))

    # When b2 is delivered again (its file is rewritten) and committed
    pipe.write("b2", batches["b2"])
    pipe.commit()

    # Then everything is there exactly once
    assert_settled(pipe, pipe.table(), [i for events in batches.values() for i in ids_of(events)])


# --- racing deletes ----------------------------------------------------------------------------


def two_files(pipe: Stack) -> tuple[list[str], list[str], str]:
    """Commit two batches; return the ids of each and the data file path of the first."""
    first, second = make_events("del1", 3), make_events("del2", 2)
    path = pipe.write("del1", first).files[TABLE][0].file_path
    pipe.write("del2", second)
    pipe.commit()
    return ids_of(first), ids_of(second), path


def test_plain_pyiceberg_deletes_of_one_file_racing_one_wins(pipe: Stack) -> None:
    # Given two overwrites built on the same snapshot, both deleting the same data file
    _, kept, path = two_files(pipe)
    one, two = pipe.table(), pipe.table()
    victim = live_data_files(one)[path]
    transactions = []
    for table in (one, two):
        tx = table.transaction()
        with tx.update_snapshot().overwrite() as overwrite:
            overwrite.delete_data_file(victim)
        transactions.append(tx)

    # When both commit, one after the other
    transactions[0].commit_transaction()
    # Then the second fails instead of deleting the file a second time
    with pytest.raises((ValidationException, CommitFailedException)):
        transactions[1].commit_transaction()
    table = pipe.table()
    assert path not in live_data_files(table)
    assert_exactly_once(table, kept)
    assert validate_lineage(table) == []


def test_removals_of_one_file_racing_in_two_processes_one_wins(
    pipe: Stack, redis_url: str, icefleet_home: Path
) -> None:
    # Given two processes that loaded the table, about to remove the same file under the lock
    _, kept, path = two_files(pipe)
    start, results = SPAWN.Event(), SPAWN.Queue()
    removers = [
        SPAWN.Process(
            target=run_remove_files,
            args=(redis_url, str(icefleet_home), TABLE, [path], start, results),
            kwargs={"catalog": pipe.settings.catalog_name},
        )
        for _ in range(2)
    ]
    for process in removers:
        process.start()

    # When they are released together
    start.set()
    join_all(removers)
    outcomes = sorted(results.get(timeout=5) for _ in removers)

    # Then exactly one removed it and the other was told it no longer exists
    assert outcomes == [f"ConcurrentModificationError: {[path]}", "ok"]
    table = pipe.table()
    assert_exactly_once(table, kept)
    assert validate_lineage(table) == []


def test_removals_racing_without_a_lock_are_kept_apart_by_the_catalog(pipe: Stack) -> None:
    # Given two threads holding the same table snapshot, about to remove the same file, unlocked
    _, kept, path = two_files(pipe)
    barrier = threading.Barrier(2)
    outcomes: queue.Queue[str] = queue.Queue()

    def remove() -> None:
        settings = pipe.settings
        table = make_stack(settings.redis_url, settings.home, catalog=settings.catalog_name).table()
        barrier.wait()
        try:
            remove_data_files(table, [path])
            outcomes.put("ok")
        except ConcurrentModificationError:
            outcomes.put("conflict")

    # When both run at once
    threads = [threading.Thread(target=remove) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)

    # Then one wins and one conflicts, and the file's rows are gone exactly once
    assert sorted(outcomes.get_nowait() for _ in threads) == ["conflict", "ok"]
    table = pipe.table()
    assert_exactly_once(table, kept)
    assert validate_lineage(table) == []


def test_a_removal_survives_a_concurrent_append_and_refuses_unknown_files(pipe: Stack) -> None:
    # Given two committed batches, and a table object loaded before an outside append
    removed, kept, path = two_files(pipe)
    stale = pipe.table()
    outside_append(pipe.catalog, TABLE, ["outside-1"])

    # When a file that never was in the table is removed along with a live one
    # Then nothing is removed
    with pytest.raises(ConcurrentModificationError) as raised:
        remove_data_files(stale, [path, path + ".nope"])
    assert raised.value.paths == [path + ".nope"]
    assert path in live_data_files(pipe.table())

    # When the live file alone is removed through the stale table object
    remove_data_files(stale, [path])

    # Then it is gone, and the outside append that landed meanwhile is kept
    table = pipe.table()
    assert_exactly_once(table, [*kept, "outside-1"])
    assert validate_lineage(table) == []
    assert not set(removed) & set(pipe.ids())


# --- the prepared record belongs to the committer that wrote it ------------------------------


def test_a_stale_finish_does_not_delete_a_newer_prepared_record(redis_pipe: Stack) -> None:
    pipe = redis_pipe
    # Given a prepared record written by a newer committer (seq 2)
    older = PreparedCommit(1, ("b1",), 1_000)
    newer = PreparedCommit(2, ("b2",), 2_000)
    pipe.registry.prepare(TABLE, newer.to_json())

    # When a stale committer finishes its seq 1
    pipe.registry.finish_commit(TABLE, ["b1"], 3_000, prepared_json=older.to_json())

    # Then its batch is marked committed but the newer record stays
    assert pipe.registry.is_known(TABLE, "b1")
    assert pipe.registry.prepared(TABLE) == newer.to_json()

    # When the newer committer finishes, its record is dropped; an unconditional finish still
    # drops whatever is there
    pipe.registry.finish_commit(TABLE, ["b2"], 4_000, prepared_json=newer.to_json())
    assert pipe.registry.prepared(TABLE) is None
    pipe.registry.prepare(TABLE, older.to_json())
    pipe.registry.finish_commit(TABLE, ["b1"], 5_000)
    assert pipe.registry.prepared(TABLE) is None


def test_only_the_lock_owner_can_write_the_prepared_record(redis_pipe: Stack) -> None:
    pipe = redis_pipe
    # Given the table lock held by one committer, whose record is prepared
    mine = PreparedCommit(2, ("b2",), 2_000)
    with TableLock(pipe.client, TABLE, ttl_ms=5_000) as lock:
        pipe.registry.prepare(TABLE, mine.to_json(), lock_token=lock.token)

        # When a committer with another (lost) token tries to prepare
        # Then it is refused and the owner's record stays
        with pytest.raises(LockLostError):
            pipe.registry.prepare(TABLE, PreparedCommit(3, ("b3",), 3).to_json(), "stale")
        assert pipe.registry.prepared(TABLE) == mine.to_json()

    # When nobody holds the lock, a fenced prepare is refused too
    with pytest.raises(LockLostError):
        pipe.registry.prepare(TABLE, "{}", lock_token=lock.token or "gone")


def test_a_prepared_record_in_another_layout_is_recovered_and_dropped(pipe: Stack) -> None:
    # Given a pending batch, and a prepared record for it written in another JSON layout (an
    # older or newer committer: other spacing, an extra field)
    events = make_events("b1", 2)
    pipe.write("b1", events)
    record = {"seq": 1, "batch_ids": ["b1"], "prepared_ms": 1, "host": "elsewhere"}
    pipe.registry.prepare(TABLE, json.dumps(record, indent=1))

    # When a committer runs
    results = pipe.commit()

    # Then it recovered that commit, and the record is gone (not resolved again and again)
    assert [(r.seq, r.recovered) for r in results] == [(1, True)]
    assert_settled(pipe, pipe.table(), ids_of(events))
    assert pipe.commit() == []


def test_a_committer_that_lost_its_lock_cannot_undo_the_new_owner(pipe: Stack) -> None:
    # Given two pending batches, and committer A, which will stall right after its catalog commit
    # (b1, seq 1) until its lease is gone and committer B has taken the table, committed b2 as
    # seq 2 and died before finishing it (its prepared record is all that says b2 landed)
    first, second = make_events("b1", 2), make_events("b2", 3)
    pipe.write("b1", first)
    b_died: list[str] = []

    def stall_until_taken_over(point: str) -> None:
        if point != "after_catalog_commit" or b_died:
            return
        pipe.client.delete(keys.lock(TABLE))  # A's lease expires while A is paused
        pipe.write("b2", second)
        committer_b = pipe.committer_with(raise_at("after_catalog_commit"))
        with pytest.raises(CommitterCrash):
            committer_b.commit_table(TABLE)
        b_died.append("b2")

    committer_a = pipe.committer_with(stall_until_taken_over)

    # When A wakes up and carries on
    with pytest.raises(LockLostError):
        committer_a.commit_table(TABLE)

    # Then B's prepared record survived A, and a fresh committer finishes B's commit instead of
    # committing b2 a second time
    assert b_died and pipe.registry.prepared(TABLE) is not None
    results = pipe.commit()
    assert [(r.seq, r.recovered, r.files) for r in results] == [(2, True, 0)]
    table = pipe.table()
    assert_settled(pipe, table, ids_of(first) + ids_of(second))
    assert commit_seqs(table) == [1, 2]
