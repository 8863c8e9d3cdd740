"""TableLock in one process: acquire, wait, renew, expire, lose, release.

These run against the session's real redis-server (``redis_client``), not fakeredis: renewal and
release are Lua scripts, and fakeredis runs Lua only with its ``lupa`` extra, which the project
does not install. The multi-process races are in tests/integration/test_redis_coordination.py.
"""

from __future__ import annotations

import threading
import time

import fakeredis
import pytest
import redis

from common.coord import keys
from common.coord.locks import TableLock
from common.errors import LockLostError, LockNotAcquiredError
from tests.support.services import wait_until

pytestmark = pytest.mark.integration

TABLE = "events.push"


def test_acquire_stores_token_with_ttl_and_release_deletes_it(redis_client: redis.Redis) -> None:
    # Given a lock on a table
    lock = TableLock(redis_client, TABLE, ttl_ms=5_000)

    # When it is held
    with lock:
        token = lock.token
        stored = redis_client.get(keys.lock(TABLE))
        ttl_ms = redis_client.pttl(keys.lock(TABLE))
        lock.check()
        held_inside = lock.held

    # Then Redis held our random token with a TTL, and release removed it
    assert token is not None and stored == token.encode()
    assert 0 < ttl_ms <= 5_000
    assert held_inside
    assert not lock.held and lock.token is None
    assert redis_client.exists(keys.lock(TABLE)) == 0


def test_each_acquisition_gets_a_new_token(redis_client: redis.Redis) -> None:
    # Given a lock acquired and released once
    lock = TableLock(redis_client, TABLE)
    with lock:
        first = lock.token

    # When it is acquired again
    with lock:
        second = lock.token

    # Then the token differs
    assert first and second and first != second


def test_not_acquired_after_wait_names_the_lock(redis_client: redis.Redis) -> None:
    # Given another owner holding the lock
    with TableLock(redis_client, TABLE):
        contender = TableLock(redis_client, TABLE, wait_s=0.2)

        # When a second owner waits 0.2 s for it
        started = time.monotonic()
        with pytest.raises(LockNotAcquiredError) as raised:
            contender.acquire()
        elapsed = time.monotonic() - started

    # Then it gives up after about wait_s, naming the lock
    assert keys.lock(TABLE) in str(raised.value)
    assert raised.value.name == keys.lock(TABLE)
    assert 0.2 <= raised.value.waited_s <= elapsed < 1.0
    assert not contender.held


def test_waiter_gets_the_lock_once_the_holder_releases(redis_client: redis.Redis) -> None:
    # Given a holder that releases after 0.2 s
    holder = TableLock(redis_client, TABLE).acquire()
    timer = threading.Timer(0.2, holder.release)
    timer.start()

    # When another owner waits up to 5 s
    with TableLock(redis_client, TABLE, wait_s=5.0) as waiter:
        # Then it gets the lock as soon as it is free
        assert waiter.held
        assert redis_client.get(keys.lock(TABLE)) == (waiter.token or "").encode()
    timer.join()


def test_renewal_keeps_the_lock_past_its_ttl(redis_client: redis.Redis) -> None:
    # Given a renewed lock with a 1.5 s TTL (renewed every 0.5 s: a loaded machine may starve the
    # renewer for a second without losing it)
    with TableLock(redis_client, TABLE, ttl_ms=1_500) as lock:
        # When it is held for two TTLs
        time.sleep(3.0)

        # Then it is still ours and nobody else can take it
        lock.check()
        assert redis_client.get(keys.lock(TABLE)) == (lock.token or "").encode()
        with pytest.raises(LockNotAcquiredError):
            TableLock(redis_client, TABLE, wait_s=0).acquire()


def test_check_raises_after_expiry_without_renewal(redis_client: redis.Redis) -> None:
    # Given a lock that is not renewed, with a 100 ms TTL
    lock = TableLock(redis_client, TABLE, ttl_ms=100, renew=False).acquire()

    # When its TTL passes
    time.sleep(0.2)

    # Then it is no longer held, check() raises, and release() says it was lost
    assert not lock.held
    with pytest.raises(LockLostError):
        lock.check()
    with pytest.raises(LockLostError):
        lock.release()


def test_check_asks_redis_not_only_the_local_clock(redis_client: redis.Redis) -> None:
    # Given a lock with a long TTL and no renewal
    lock = TableLock(redis_client, TABLE, ttl_ms=60_000, renew=False).acquire()

    # When its key disappears behind its back (operator, failover)
    redis_client.delete(keys.lock(TABLE))

    # Then check() notices at once
    with pytest.raises(LockLostError):
        lock.check()
    with pytest.raises(LockLostError):
        lock.release()


def test_release_by_a_non_owner_raises_and_keeps_the_new_owners_lock(
    redis_client: redis.Redis,
) -> None:
    # Given a first owner whose lock expired, and a second owner who took it since
    first = TableLock(redis_client, TABLE, ttl_ms=100, renew=False).acquire()
    time.sleep(0.2)
    second = TableLock(redis_client, TABLE, wait_s=0).acquire()

    # When the first owner releases
    with pytest.raises(LockLostError) as raised:
        first.release()

    # Then it is told it had lost the lock, and the second owner's lock is intact
    assert raised.value.name == keys.lock(TABLE)
    assert redis_client.get(keys.lock(TABLE)) == (second.token or "").encode()
    second.check()
    second.release()


def test_renewer_notices_a_takeover_and_exit_raises(redis_client: redis.Redis) -> None:
    # Given a renewed lock with a 1.5 s TTL
    lock = TableLock(redis_client, TABLE, ttl_ms=1_500)
    with pytest.raises(LockLostError) as raised_on_exit, lock:
        # When another owner overwrites the key while it is held
        redis_client.set(keys.lock(TABLE), "intruder", px=5_000)

        # Then the renewer records the loss (within one renewal period; waited for generously)
        wait_until(lambda: not lock.held, 30.0, "the renewer to notice the takeover")
        with pytest.raises(LockLostError):
            lock.check()

    # ... leaving the block raises LockLostError
    assert raised_on_exit.value.name == keys.lock(TABLE)

    # ... without deleting the intruder's lock
    assert redis_client.get(keys.lock(TABLE)) == b"intruder"


def test_exit_keeps_the_bodys_error_and_notes_the_loss(redis_client: redis.Redis) -> None:
    # Given a block that loses its lock and then fails on its own
    lock = TableLock(redis_client, TABLE, renew=False)
    with pytest.raises(ValueError, match="commit failed") as raised, lock:
        redis_client.delete(keys.lock(TABLE))
        raise ValueError("commit failed")

    # Then the body's error propagates, with the loss noted on it
    assert any("was lost" in note for note in raised.value.__notes__)


def test_lock_is_not_reentrant_and_release_when_not_held_is_a_no_op(
    redis_client: redis.Redis,
) -> None:
    # Given a held lock
    lock = TableLock(redis_client, TABLE).acquire()

    # When it is acquired again by the same object
    with pytest.raises(RuntimeError, match="not reentrant"):
        lock.acquire()

    # Then releasing twice is harmless, and check() on a released lock is a usage error
    lock.release()
    lock.release()
    with pytest.raises(RuntimeError, match="not held"):
        lock.check()


def test_odd_table_names_make_distinct_working_locks(redis_client: redis.Redis) -> None:
    # Given table names with braces, spaces and colons (callers validate; keys must not break)
    odd = "odd }{ table:*"

    # When both an odd and a plain table are locked
    with TableLock(redis_client, odd, wait_s=0) as odd_lock, TableLock(redis_client, "odd"):
        # Then each has its own key
        assert redis_client.get(keys.lock(odd)) == (odd_lock.token or "").encode()
        assert redis_client.exists(keys.lock("odd")) == 1


@pytest.mark.parametrize(("ttl_ms", "wait_s"), [(0, 1.0), (-5, 1.0), (1_000, -1.0)])
def test_invalid_arguments_are_refused(ttl_ms: int, wait_s: float) -> None:
    # Given a client (no server needed: nothing is sent)
    client = fakeredis.FakeRedis()

    # When / Then a lock cannot be built with a non-positive TTL or a negative wait
    with pytest.raises(ValueError):
        TableLock(client, TABLE, ttl_ms=ttl_ms, wait_s=wait_s)
