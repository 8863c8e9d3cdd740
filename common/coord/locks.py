"""The per-table Redis lock that makes one committer the only writer of a table's metadata.

A lease, not a mutex: the key ``icefleet:lock:<table>`` holds a random token with a TTL, so a
committer that dies (``kill -9``, lost host) frees the table after at most ``ttl_ms``. While the
lock is held a daemon thread renews the TTL every ``ttl_ms / 3``; renewal and release are atomic
compare-and-act Lua scripts that touch the key only while it still holds *our* token, so a slow
owner can never extend or delete a lock another owner has taken since.

A lease cannot stop a paused owner from acting after it expired. Call :meth:`TableLock.check`
right before each critical step (the committer does before every catalog commit); the catalog's
own compare-and-swap on the base snapshot is the last line of defence.
"""

from __future__ import annotations

import functools
import logging
import random
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis
from redis.commands.core import Script

from common.coord import keys
from common.errors import LockLostError, LockNotAcquiredError

if TYPE_CHECKING:
    from common.settings import Settings

log = logging.getLogger(__name__)

# Extend the TTL only while the key still holds our token.
_EXTEND_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

# Delete the key only while it still holds our token.
_RELEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""

_POLL_MIN_S = 0.01
_POLL_MAX_S = 0.05


@dataclass(frozen=True)
class _LockScripts:
    extend: Script
    release: Script


# Scripts are registered once per client and forgotten with it; nothing connects at import.
_scripts_by_client: weakref.WeakKeyDictionary[Any, _LockScripts] = weakref.WeakKeyDictionary()


def _scripts_for(client: redis.Redis) -> _LockScripts:
    scripts = _scripts_by_client.get(client)
    if scripts is None:
        scripts = _LockScripts(
            extend=client.register_script(_EXTEND_LUA),
            release=client.register_script(_RELEASE_LUA),
        )
        _scripts_by_client[client] = scripts
    return scripts


def _as_str(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@dataclass
class _Lease:
    """One acquisition: its token, and the renewer's view of whether it still holds."""

    token: str
    # Monotonic time by which the server's TTL has surely run out unless renewed: measured from
    # *before* the command that set it was sent, so it is never later than the real expiry.
    deadline: float
    stop: threading.Event = field(default_factory=threading.Event)
    lost: threading.Event = field(default_factory=threading.Event)
    renewer: threading.Thread | None = None


class TableLock:
    """A renewable Redis lease on one table: ``with TableLock(client, "events.push") as lock:``.

    ``ttl_ms`` bounds how long a dead owner blocks the table; ``wait_s`` how long
    :meth:`acquire` polls before raising :class:`LockNotAcquiredError`; ``renew`` starts a daemon
    thread that keeps the lease alive while held. Not reentrant; reusable after release.
    """

    def __init__(
        self,
        client: redis.Redis,
        table: str,
        ttl_ms: int = 30_000,
        wait_s: float = 60.0,
        renew: bool = True,
    ) -> None:
        if ttl_ms <= 0:
            raise ValueError(f"ttl_ms must be positive, got {ttl_ms}")
        if wait_s < 0:
            raise ValueError(f"wait_s cannot be negative, got {wait_s}")
        self.table = table
        self.name = keys.lock(table)
        self.ttl_ms = int(ttl_ms)
        self.wait_s = wait_s
        self.renew = renew
        self._client = client
        self._scripts = _scripts_for(client)
        self._lease: _Lease | None = None

    def __repr__(self) -> str:
        return f"TableLock({self.name!r}, ttl_ms={self.ttl_ms}, held={self.held})"

    # --- state ------------------------------------------------------------------------------------

    @property
    def token(self) -> str | None:
        """The random token of the current acquisition, or ``None`` when not acquired."""
        return self._lease.token if self._lease is not None else None

    @property
    def held(self) -> bool:
        """Whether this process believes it holds the lock (no round trip; see :meth:`check`)."""
        lease = self._lease
        return lease is not None and not lease.lost.is_set() and time.monotonic() < lease.deadline

    # --- acquire / check / release ----------------------------------------------------------------

    def acquire(self) -> TableLock:
        """Take the lock, polling with jittered sleeps for up to ``wait_s``; return ``self``.

        Raises :class:`LockNotAcquiredError` when another owner still holds it after ``wait_s``.
        """
        if self._lease is not None:
            raise RuntimeError(
                f"{self.name} is already held by this TableLock; it is not reentrant"
            )
        token = secrets.token_hex(16)
        started = time.monotonic()
        while True:
            sent = time.monotonic()
            if self._client.set(self.name, token, nx=True, px=self.ttl_ms):
                break
            # A SET that was applied but whose reply was lost is retried by redis-py and then
            # fails NX against our own token: extending "if ours" recognises that case.
            if self._extend(token):
                break
            now = time.monotonic()
            if now - started >= self.wait_s:
                raise LockNotAcquiredError(self.name, now - started)
            pause = random.uniform(_POLL_MIN_S, _POLL_MAX_S)
            time.sleep(min(pause, self.wait_s - (now - started)))
        lease = _Lease(token=token, deadline=sent + self.ttl_ms / 1000)
        if self.renew:
            lease.renewer = threading.Thread(
                target=self._renew_until_stopped,
                args=(lease,),
                name=f"renew {self.name}",
                daemon=True,
            )
            lease.renewer.start()
        self._lease = lease
        return self

    def check(self) -> None:
        """Assert, with one round trip, that the lock is still ours; raise LockLostError if not.

        Call it right before a step that must not run without the lock. Redis errors propagate:
        when ownership cannot be confirmed the caller must not proceed either.
        """
        lease = self._lease
        if lease is None:
            raise RuntimeError(f"{self.name} is not held: acquire it before checking it")
        if lease.lost.is_set() or time.monotonic() >= lease.deadline:
            lease.lost.set()
            raise LockLostError(self.name)
        if _as_str(self._client.get(self.name)) != lease.token:
            lease.lost.set()
            raise LockLostError(self.name)

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still ours; no-op when not held.

        Raises :class:`LockLostError` when the lock had expired or been taken over meanwhile;
        another owner's lock is never deleted.
        """
        lease = self._lease
        if lease is None:
            return
        self._lease = None
        lease.stop.set()
        if lease.renewer is not None:
            lease.renewer.join(timeout=self.ttl_ms / 1000)
        deleted = self._scripts.release(keys=[self.name], args=[lease.token])
        if not deleted or lease.lost.is_set():
            raise LockLostError(self.name)

    def __enter__(self) -> TableLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.release()
        except LockLostError as lost:
            if exc is None:
                raise
            # Don't hide the body's own error (it may be the one that matters, e.g. an unknown
            # commit outcome); say on it that the lock was lost too.
            exc.add_note(str(lost))

    # --- renewal ----------------------------------------------------------------------------------

    def _extend(self, token: str) -> bool:
        return bool(self._scripts.extend(keys=[self.name], args=[token, self.ttl_ms]))

    def _renew_until_stopped(self, lease: _Lease) -> None:
        interval_s = self.ttl_ms / 3000
        wait_s = interval_s
        while not lease.stop.wait(wait_s):
            sent = time.monotonic()
            try:
                extended = self._extend(lease.token)
            except redis.RedisError as error:
                if time.monotonic() >= lease.deadline:
                    log.error(
                        "lock %s lost: could not renew it before it expired: %s", self.name, error
                    )
                    lease.lost.set()
                    return
                log.warning("renewing lock %s failed, retrying: %s", self.name, error)
                wait_s = interval_s / 4
                continue
            if not extended:
                log.error("lock %s lost: it expired or was taken over while held", self.name)
                lease.lost.set()
                return
            lease.deadline = sent + self.ttl_ms / 1000
            wait_s = interval_s


def table_lock(client: redis.Redis, table: str, settings: Settings) -> TableLock:
    """The lock of ``table`` with the fleet's lease and wait (``ICEFLEET_LOCK_TTL_MS``,
    ``ICEFLEET_LOCK_WAIT_S``): the one way icefleet's own code builds a table lock."""
    return TableLock(client, table, ttl_ms=settings.lock_ttl_ms, wait_s=settings.lock_wait_s)


def lock_factory(client: redis.Redis, settings: Settings) -> Callable[[str], TableLock]:
    """``table -> lock``, for code that takes locks of tables it learns about later."""
    return functools.partial(table_lock, client, settings=settings)
