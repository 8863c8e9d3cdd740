"""The dead-letter store: events icefleet could not land, kept with the reason, in a Redis stream.

Each entry keeps the event exactly as received (``raw``, bytes that need not be UTF-8), so
nothing is lost and an operator can fix and resend it. The stream is capped at about ``maxlen``
entries (approximate trimming, cheap for Redis): past that, the oldest dead letters are dropped.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, cast

import redis
from redis.client import NEVER_DECODE
from redis.typing import EncodableT, FieldT

from common.coord import keys


class DeadLetterLike(Protocol):
    """What the store needs from a dead letter (``common.ingest.events.DeadLetter`` has exactly this)."""

    @property
    def batch_id(self) -> str: ...

    @property
    def position(self) -> int: ...

    @property
    def reason(self) -> str: ...

    @property
    def attribute(self) -> str | None: ...

    @property
    def raw(self) -> bytes: ...


@dataclass(frozen=True)
class StoredDeadLetter:
    """A dead letter as read back from the stream; ``id`` is its stream entry id."""

    id: str
    batch_id: str
    position: int
    reason: str
    attribute: str | None
    raw: bytes
    table: str | None
    at_ms: int


def entry_fields(record: DeadLetterLike, table: str | None, at_ms: int) -> dict[FieldT, EncodableT]:
    """The stream entry of a dead letter (for callers that add it in a transaction of theirs)."""
    fields: dict[FieldT, EncodableT] = {
        "batch_id": record.batch_id,
        "position": record.position,
        "reason": record.reason,
        "raw": record.raw,
        "at_ms": at_ms,
    }
    # Redis has no null: an absent field means None.
    if record.attribute is not None:
        fields["attribute"] = record.attribute
    if table is not None:
        fields["table"] = table
    return fields


def _decode(value: bytes | str | None) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _stored(entry_id: bytes, fields: Mapping[bytes, bytes]) -> StoredDeadLetter:
    return StoredDeadLetter(
        id=entry_id.decode(),
        batch_id=_decode(fields.get(b"batch_id")) or "",
        position=int(fields.get(b"position") or 0),
        reason=_decode(fields.get(b"reason")) or "",
        attribute=_decode(fields.get(b"attribute")),
        raw=fields.get(b"raw", b""),
        table=_decode(fields.get(b"table")),
        at_ms=int(fields.get(b"at_ms") or 0),
    )


def stream_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<seq>``) as a sort key."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class DeadLetterStore:
    """Add, page through, count and delete dead letters in ``icefleet:dead-letters``.

    Works with clients created with or without ``decode_responses``: entries are always read
    undecoded, so ``raw`` comes back byte for byte.
    """

    def __init__(self, client: redis.Redis, maxlen: int = 1_000_000) -> None:
        if maxlen <= 0:
            raise ValueError(f"maxlen must be positive, got {maxlen}")
        self._client = client
        self.maxlen = maxlen
        self.key = keys.dead_letters()

    def add(
        self, records: Iterable[DeadLetterLike], table: str | None = None
    ) -> builtins.list[str]:
        """Append the dead letters in one round trip; return their stream ids, in order."""
        at_ms = time.time_ns() // 1_000_000
        pipe = self._client.pipeline(transaction=False)
        queued = 0
        for record in records:
            pipe.xadd(
                self.key, entry_fields(record, table, at_ms), maxlen=self.maxlen, approximate=True
            )
            queued += 1
        if not queued:
            return []
        return [_decode(entry_id) or "" for entry_id in pipe.execute()]

    def list(self, count: int = 100, start: str = "-") -> builtins.list[StoredDeadLetter]:
        """Up to ``count`` dead letters, oldest first, from stream id ``start`` (inclusive).

        To page on, pass ``"(" + last.id`` (exclusive start).
        """
        raw = self._client.execute_command(
            "XRANGE", self.key, start, "+", "COUNT", count, **{NEVER_DECODE: True}
        )
        entries = cast(Iterable[tuple[bytes, Mapping[bytes, bytes]]], raw or [])
        return [_stored(entry_id, fields) for entry_id, fields in entries]

    def scan(self, page: int = 1_000) -> Iterator[StoredDeadLetter]:
        """Every dead letter, oldest first, read ``page`` at a time."""
        start = "-"
        while letters := self.list(page, start):
            yield from letters
            start = "(" + letters[-1].id

    def fetch(
        self, ids: Iterable[str]
    ) -> tuple[builtins.list[StoredDeadLetter], builtins.list[str]]:
        """The dead letters with these stream ids, in stream order; and the ids not found."""
        ids = builtins.list(ids)
        found: dict[str, StoredDeadLetter] = {}
        for entry_id in dict.fromkeys(ids):
            try:
                page = self.list(1, entry_id)
            except redis.ResponseError:  # not a stream id at all
                continue
            if page and page[0].id == entry_id:
                found[entry_id] = page[0]
        letters = sorted(found.values(), key=lambda letter: stream_order(letter.id))
        return letters, [i for i in ids if i not in found]

    def count(self) -> int:
        """How many dead letters are stored."""
        return int(self._client.xlen(self.key))

    def delete(self, ids: Iterable[str]) -> int:
        """Delete dead letters by stream id; return how many existed."""
        ids = builtins.list(ids)
        if not ids:
            return 0
        return int(self._client.xdel(self.key, *ids))

    def purge(self) -> int:
        """Delete every dead letter; return how many there were."""
        pipe = self._client.pipeline(transaction=True)
        pipe.xlen(self.key)
        pipe.delete(self.key)
        stored, _deleted = pipe.execute()
        return int(stored)
