"""Coordination through a real redis-server between real processes (spawn context).

The lock must exclude owners in different processes and free itself when an owner dies without
releasing; registration must pick exactly one winner per batch however many writers race; the
committer must never lose sight of a table whose writers keep registering. Child processes get
only the Redis URL and build their own clients.
"""

from __future__ import annotations

import multiprocessing
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier, Event
from typing import cast

import pytest
import redis

from common.coord import keys
from common.coord.deadletters import DeadLetterStore
from common.coord.locks import TableLock
from common.coord.pending import PendingRegistry
from common.errors import LockNotAcquiredError

pytestmark = pytest.mark.integration

SPAWN = multiprocessing.get_context("spawn")
TABLE = "events.push"
COUNTER = "test:counter"
INSIDE = "test:inside"
OVERLAPS = "test:overlaps"
WINNERS = "test:winners"
JOIN_TIMEOUT_S = 20


# --- child processes (module level so that spawn can import them) --------------------------------


def increment_under_lock(url: str, rounds: int, start: Barrier) -> None:
    client = redis.Redis.from_url(url)
    start.wait()
    for _ in range(rounds):
        with TableLock(client, TABLE, ttl_ms=5_000, wait_s=JOIN_TIMEOUT_S):
            if client.incr(INSIDE) > 1:
                client.incr(OVERLAPS)
            value = int(client.get(COUNTER) or 0)  # a deliberately non-atomic read-modify-write
            time.sleep(0.002)
            client.set(COUNTER, value + 1)
            client.decr(INSIDE)


def hold_lock_until_killed(url: str, ttl_ms: int, acquired: Event) -> None:
    client = redis.Redis.from_url(url)
    TableLock(client, TABLE, ttl_ms=ttl_ms).acquire()
    acquired.set()
    time.sleep(60)


def register_all(url: str, batch_ids: list[str], seed: int, start: Barrier) -> None:
    client = redis.Redis.from_url(url)
    registry = PendingRegistry(client)
    order = list(batch_ids)
    random.Random(seed).shuffle(order)
    start.wait()
    for batch_id in order:
        if registry.register(TABLE, batch_id, f'{{"batch_id": "{batch_id}"}}'):
            client.rpush(WINNERS, batch_id)


def run_processes(processes: Sequence[multiprocessing.process.BaseProcess]) -> None:
    for process in processes:
        process.start()
    for process in processes:
        process.join(JOIN_TIMEOUT_S)
    assert [process.exitcode for process in processes] == [0] * len(processes)


# --- lock ----------------------------------------------------------------------------------------


def test_lock_excludes_four_processes_no_lost_update(
    redis_client: redis.Redis, redis_url: str
) -> None:
    # Given four processes that each increment a shared counter 15 times with GET, sleep, SET
    rounds, workers = 15, 4
    start = SPAWN.Barrier(workers)
    processes = [
        SPAWN.Process(target=increment_under_lock, args=(redis_url, rounds, start))
        for _ in range(workers)
    ]

    # When they all run at once, each increment under the table lock
    run_processes(processes)

    # Then no update was lost and no two processes were ever inside together
    assert int(redis_client.get(COUNTER) or 0) == rounds * workers
    assert int(redis_client.get(OVERLAPS) or 0) == 0
    assert redis_client.exists(keys.lock(TABLE)) == 0


def test_lock_of_a_killed_owner_frees_itself_after_its_ttl(
    redis_client: redis.Redis, redis_url: str
) -> None:
    # Given a process holding the lock (renewed, 600 ms TTL)
    ttl_ms = 600
    acquired = SPAWN.Event()
    owner = SPAWN.Process(target=hold_lock_until_killed, args=(redis_url, ttl_ms, acquired))
    owner.start()
    try:
        assert acquired.wait(JOIN_TIMEOUT_S)
        time.sleep(ttl_ms / 1000)  # renewal keeps it held past one TTL
        with pytest.raises(LockNotAcquiredError):
            TableLock(redis_client, TABLE, wait_s=0).acquire()

        # When the owner is killed with SIGKILL, without releasing
        owner.kill()
        owner.join(JOIN_TIMEOUT_S)
        killed_at = time.monotonic()

        # Then another owner gets the lock once the TTL runs out, not before
        with TableLock(redis_client, TABLE, wait_s=5.0) as successor:
            waited_s = time.monotonic() - killed_at
            successor.check()
    finally:
        if owner.is_alive():
            owner.kill()
            owner.join()
    assert 0.1 < waited_s < ttl_ms / 1000 + 0.5


# --- pending -------------------------------------------------------------------------------------


def test_racing_writers_register_each_batch_exactly_once(
    redis_client: redis.Redis, redis_url: str
) -> None:
    # Given four writers that all deliver the same 100 batches, each in its own order
    batch_ids = [f"batch-{i:03d}" for i in range(100)]
    start = SPAWN.Barrier(4)
    processes = [
        SPAWN.Process(target=register_all, args=(redis_url, batch_ids, seed, start))
        for seed in range(4)
    ]

    # When they register concurrently
    run_processes(processes)

    # Then each batch had exactly one winner and is pending exactly once
    winners = [w.decode() for w in cast(list[bytes], redis_client.lrange(WINNERS, 0, -1))]
    assert sorted(winners) == batch_ids
    assert sorted(PendingRegistry(redis_client).pending_entries(TABLE)) == batch_ids


def test_committer_never_loses_a_table_while_writers_register(
    redis_client: redis.Redis, redis_url: str
) -> None:
    # Given two writer processes registering 300 distinct batches each
    writer_ids = [[f"w{w}-{i:03d}" for i in range(300)] for w in range(2)]
    start = SPAWN.Barrier(3)
    writers = [
        SPAWN.Process(target=register_all, args=(redis_url, ids, w, start))
        for w, ids in enumerate(writer_ids)
    ]
    for writer in writers:
        writer.start()
    registry = PendingRegistry(redis_client)

    # When this process commits whatever is pending, but only for tables listed as pending,
    # until the writers are done and the table is no longer listed; and between commits takes
    # atomic snapshots of "listed" vs "has pending batches"
    start.wait()
    commits = 0
    mismatches = 0
    while any(writer.is_alive() for writer in writers) or TABLE in registry.pending_tables():
        snapshot = redis_client.pipeline(transaction=True)
        snapshot.sismember(keys.pending_tables(), TABLE)
        snapshot.hlen(keys.pending(TABLE))
        listed, size = snapshot.execute()
        mismatches += bool(listed) != (size > 0)
        if listed:
            registry.finish_commit(TABLE, registry.pending_entries(TABLE), committed_ms=commits)
            commits += 1
        else:
            time.sleep(0.001)
    for writer in writers:
        writer.join(JOIN_TIMEOUT_S)

    # Then nothing was left behind: every batch is committed, nothing pending or listed
    assert [writer.exitcode for writer in writers] == [0, 0]
    assert registry.pending_entries(TABLE) == {}
    assert redis_client.zcard(keys.committed(TABLE)) == 600
    assert registry.pending_tables() == set()
    assert mismatches == 0
    assert commits > 1


# --- dead letters --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    batch_id: str
    position: int
    reason: str
    attribute: str | None
    raw: bytes


def test_dead_letters_round_trip_raw_bytes(redis_client: redis.Redis, redis_url: str) -> None:
    # Given dead letters whose raw bytes are not UTF-8
    store = DeadLetterStore(redis_client)
    letters = [
        DeadLetter("b1", 0, "invalid JSON", None, b"\xff\xfe{not json"),
        DeadLetter("b1", 3, "time is not RFC 3339", "time", b'{"time": "yesterday"}'),
        DeadLetter("b2", 1, "too large", None, b"\x00" * 10),
    ]

    # When they are added and read back, also through a client that decodes responses
    ids = store.add(letters[:2], table=TABLE)
    ids += store.add(letters[2:])
    stored = store.list()
    decoding = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        stored_via_decoding_client = DeadLetterStore(decoding).list()
    finally:
        decoding.close()

    # Then every field, raw bytes included, comes back as it went in
    assert [s.id for s in stored] == ids
    assert [(s.batch_id, s.position, s.reason, s.attribute, s.raw) for s in stored] == [
        (d.batch_id, d.position, d.reason, d.attribute, d.raw) for d in letters
    ]
    assert [s.table for s in stored] == [TABLE, TABLE, None]
    assert all(s.at_ms > 0 for s in stored)
    assert stored_via_decoding_client == stored
    assert store.count() == 3


def test_dead_letters_page_delete_and_purge(redis_client: redis.Redis) -> None:
    # Given five dead letters
    store = DeadLetterStore(redis_client)
    ids = store.add(DeadLetter("b", i, "bad", None, bytes([i, 0xFF])) for i in range(5))

    # When they are paged two at a time, one is deleted, then all are purged
    first_page = store.list(count=2)
    second_page = store.list(count=2, start="(" + first_page[-1].id)
    deleted = store.delete([ids[0], "0-1"])
    after_delete = store.count()
    purged = store.purge()

    # Then paging continues where it stopped, and the counts add up
    assert [s.position for s in first_page + second_page] == [0, 1, 2, 3]
    assert deleted == 1 and after_delete == 4
    assert purged == 4 and store.count() == 0 and store.list() == []
    assert store.add([]) == []


def test_dead_letter_stream_is_capped(redis_client: redis.Redis) -> None:
    # Given a store capped at about 10 entries
    store = DeadLetterStore(redis_client, maxlen=10)

    # When 500 dead letters are added
    store.add(DeadLetter("b", i, "bad", None, b"x") for i in range(500))

    # Then old entries were trimmed (approximately: Redis trims whole stream nodes)
    assert store.count() < 500
    assert store.list(count=1)[0].position > 0
