"""Replaying dead letters through the producer, exactly once however often it runs.

Dead letters live in the Redis stream ``icefleet:dead-letters`` (:mod:`common.coord.deadletters`),
each with the input exactly as received and the reason. A replay sends them through the producer
again, exactly once however often it is run or wherever it is interrupted:

1. each selected dead letter not yet *assigned* to a replay batch is assigned to one, in one
   atomic step per batch (``icefleet:replays``: dead-letter id → batch id, plus the batch's
   members). The batch id is a digest of its members' ids, ``~replay-<24 hex>``: an id icefleet
   derives (common/wire.py), which no caller can give;
2. each batch is enqueued with exactly its members' events under its id, so sending it again
   (a replay run twice, or resumed after a crash) is deduplicated like any resent batch;
3. only after the enqueue are its dead letters deleted, and the assignment forgotten.

The same input can be dead-lettered twice (a writer killed after storing its dead letters and
before acknowledging its task stores them again on redelivery): a dead letter whose origin (batch
id, position and bytes) was already replayed, or is being replayed, within the dedup window
(``icefleet:replayed:<digest>``) is deleted as a duplicate instead of being sent again.

Before sending, every event is validated as the writer would: one still invalid goes back to the
stream with its new reason (and the old one, and the same batch id and position) instead of
being sent; the writer dead-letters with a reason whatever it still cannot land (a schema that
still does not fit). A dead letter holding a whole batch (a batch that kept failing) is replayed
event by event.

``icefleet dead-letters replay`` (workers/cli/deadletters.py) is the command that runs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis

from common.coord import keys
from common.coord.deadletters import DeadLetterStore, StoredDeadLetter, entry_fields
from common.coord.replies import as_text
from common.ingest.events import DeadLetter, parse_batch, split_events
from common.ingest.routing import Router
from common.settings import Settings
from common.wire import replay_batch_id

REPLAYS_KEY = keys.replays()  # hash: dead-letter id → batch id; batch:<id> → members
REPLAY_BATCH_LETTERS = 1_000  # dead letters per replay batch (the producer splits large ones)

# KEYS: replays hash; ARGV: batch id, members JSON, dead-letter ids... → 1 assigned, 0 taken
_ASSIGN_LUA = """
for i = 3, #ARGV do
  if redis.call('hexists', KEYS[1], ARGV[i]) == 1 then
    return 0
  end
end
for i = 3, #ARGV do
  redis.call('hset', KEYS[1], ARGV[i], ARGV[1])
end
redis.call('hset', KEYS[1], 'batch:' .. ARGV[1], ARGV[2])
return 1
"""


def _items(letter: StoredDeadLetter) -> list[bytes]:
    return split_events(letter.raw) or [letter.raw]


def routes_to(letter: StoredDeadLetter, table: str, router: Router) -> bool:
    """Whether the dead letter belongs to ``table``: recorded for it, or an event of it routes there."""
    if letter.table is not None:
        return letter.table == table
    for item in _items(letter):
        try:
            event_type = orjson.loads(item).get("type")
        except (orjson.JSONDecodeError, AttributeError):
            continue
        if (
            isinstance(event_type, str)
            and event_type
            and str(router.table_for(event_type)) == table
        ):
            return True
    return False


def origin_key(letter: StoredDeadLetter) -> str:
    """Where the replay of this input is remembered: a digest of its batch, position and bytes."""
    digest = hashlib.sha256(f"{letter.batch_id}\0{letter.position}\0".encode())
    digest.update(letter.raw)
    return keys.replayed(digest.hexdigest()[:32])


@dataclass
class ReplayReport:
    batches: list[str] = field(default_factory=list)
    events: int = 0
    still_invalid: int = 0
    removed: int = 0
    duplicates: int = 0


class Replayer:
    """Replays dead letters through a producer, exactly once (see the module docstring)."""

    def __init__(self, settings: Settings, client: redis.Redis, producer: Any = None) -> None:
        self.settings = settings
        self.client = client
        self.store = DeadLetterStore(client)
        self._assign = client.register_script(_ASSIGN_LUA)
        self._producer = producer

    def replay(self, letters: list[StoredDeadLetter]) -> ReplayReport:
        report = ReplayReport()
        for batch_id in self.assign(letters, report):
            self._send(batch_id, report)
        return report

    def assign(self, letters: list[StoredDeadLetter], report: ReplayReport) -> list[str]:
        """The replay batches of ``letters``, assigning those that have none yet."""
        ids = [letter.id for letter in letters]
        current = self.client.hmget(REPLAYS_KEY, ids) if ids else []
        batches = dict.fromkeys(as_text(b) for b in current if b is not None)
        fresh = self._originals(
            [letter for letter, b in zip(letters, current, strict=True) if b is None], report
        )
        by_table: dict[str | None, list[StoredDeadLetter]] = {}
        for letter in fresh:
            by_table.setdefault(letter.table, []).append(letter)
        for table, group in by_table.items():
            for start in range(0, len(group), REPLAY_BATCH_LETTERS):
                members = [letter.id for letter in group[start : start + REPLAY_BATCH_LETTERS]]
                digest = hashlib.sha256("\n".join(members).encode()).hexdigest()[:24]
                batch_id = replay_batch_id(digest)
                info = orjson.dumps({"members": members, "table": table}).decode()
                if not self._assign(keys=[REPLAYS_KEY], args=[batch_id, info, *members]):
                    # a concurrent replay took some of them: follow its assignments
                    for taken in self.client.hmget(REPLAYS_KEY, members):
                        if taken is not None:
                            batches[as_text(taken)] = None
                    continue
                batches[batch_id] = None
        return list(batches)

    def _originals(
        self, letters: list[StoredDeadLetter], report: ReplayReport
    ) -> list[StoredDeadLetter]:
        """Claim the origin of each letter; delete those whose origin another letter claimed."""
        ttl_s = self.settings.dedup_window_s
        pipe = self.client.pipeline(transaction=False)
        for letter in letters:
            pipe.set(origin_key(letter), letter.id, nx=True, ex=ttl_s)
            pipe.get(origin_key(letter))
        replies = pipe.execute()
        originals: list[StoredDeadLetter] = []
        twins: list[StoredDeadLetter] = []
        for n, letter in enumerate(letters):
            owner = replies[2 * n + 1]
            (originals if owner is None or as_text(owner) == letter.id else twins).append(letter)
        if twins:
            report.duplicates += self.store.delete(letter.id for letter in twins)
        return originals

    def _send(self, batch_id: str, report: ReplayReport) -> None:
        info_json = self.client.hget(REPLAYS_KEY, f"batch:{batch_id}")
        if info_json is None:
            return
        info = orjson.loads(info_json)
        members: list[str] = info["members"]
        table: str | None = info["table"]
        letters, _gone = self.store.fetch(members)
        events: list[str] = []
        invalid: list[tuple[StoredDeadLetter, DeadLetter]] = []
        for letter in letters:
            items = _items(letter)
            for position, item in enumerate(items):
                parsed = parse_batch(
                    item, batch_id=letter.batch_id, max_event_bytes=self.settings.max_event_bytes
                )
                events.extend(event.raw for event in parsed.events)
                at = letter.position if len(items) == 1 else position
                invalid.extend(
                    (letter, DeadLetter(bad.batch_id, at, bad.reason, bad.attribute, bad.raw))
                    for bad in parsed.dead_letters
                )
        if events:
            self._enqueue(events, table, batch_id)
            report.batches.append(batch_id)
            report.events += len(events)
        # The invalid ones go back, the replayed ones go: one transaction, then the assignment.
        pipe = self.client.pipeline(transaction=True)
        now_ms = int(time.time() * 1000)
        for letter, bad in invalid:
            reason = f"{bad.reason} (replayed dead letter {letter.id}: {letter.reason})"[:4000]
            pipe.xadd(
                self.store.key,
                entry_fields(dataclasses.replace(bad, reason=reason), letter.table, now_ms),
                maxlen=self.store.maxlen,
                approximate=True,
            )
        if letters:
            pipe.xdel(self.store.key, *[letter.id for letter in letters])
        for letter in {letter.id: letter for letter, _ in invalid}.values():
            pipe.delete(origin_key(letter))  # back in the stream: replayable again later
        pipe.execute()
        self.client.hdel(REPLAYS_KEY, *members, f"batch:{batch_id}")
        report.still_invalid += len(invalid)
        report.removed += len(letters)

    def _enqueue(self, events: list[str], table: str | None, batch_id: str) -> None:
        if self._producer is not None:
            self._producer.enqueue_derived(events, table, batch_id)
            return
        from common.ingest.producer import Producer

        with Producer(self.settings, client=self.client) as producer:
            producer.enqueue_derived(events, table, batch_id)


__all__ = [
    "REPLAYS_KEY",
    "ReplayReport",
    "Replayer",
    "origin_key",
    "routes_to",
]
