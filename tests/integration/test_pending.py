"""PendingRegistry and the key layout: registration, dedup, group-commit bookkeeping, stats.

Like test_locks.py these use the session's real redis-server: every multi-key operation is a Lua
script, which fakeredis cannot run without its ``lupa`` extra.
"""

from __future__ import annotations

import json

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from common.coord import keys
from common.coord.pending import PendingRegistry, PendingStats
from common.errors import InvalidIdentifierError

pytestmark = pytest.mark.integration

TABLE = "events.push"


def entry(batch_id: str, records: int = 10, size: int = 1_000, registered_ms: int = 1) -> str:
    return json.dumps(
        {
            "batch_id": batch_id,
            "files": [{"file_path": f"s3://w/{batch_id}.parquet"}],
            "records": records,
            "bytes": size,
            "registered_ms": registered_ms,
        }
    )


@pytest.fixture
def registry(redis_client: redis.Redis) -> PendingRegistry:
    return PendingRegistry(redis_client)


# --- keys ----------------------------------------------------------------------------------------


def test_keys_share_one_prefix_and_differ_by_kind() -> None:
    # Given every per-table key of one table
    per_table = [keys.lock, keys.pending, keys.committed, keys.prepared]

    # When they are built
    built = [make(TABLE) for make in per_table] + [keys.pending_tables(), keys.dead_letters()]

    # Then all are distinct, under the one prefix, and spelled as documented
    assert len(set(built)) == len(built)
    assert all(key.startswith(keys.PREFIX) for key in built)
    assert keys.lock(TABLE) == "icefleet:lock:events.push"
    assert keys.pending(TABLE) == "icefleet:pending:events.push"


def test_an_empty_table_name_is_refused() -> None:
    # Given / When / Then: an empty identifier cannot name a key
    with pytest.raises(InvalidIdentifierError):
        keys.pending("")


# --- register ------------------------------------------------------------------------------------


def test_registering_twice_keeps_the_first_entry(
    registry: PendingRegistry, redis_client: redis.Redis
) -> None:
    # Given a registered batch
    assert registry.register(TABLE, "b1", entry("b1", records=10))

    # When the same batch is registered again (a redelivery)
    again = registry.register(TABLE, "b1", entry("b1", records=99))

    # Then the second call reports a duplicate and changes nothing
    assert again is False
    assert registry.pending_entries(TABLE) == {"b1": entry("b1", records=10)}
    assert registry.pending_tables() == {TABLE}
    assert registry.is_known(TABLE, "b1")
    assert not registry.is_known(TABLE, "b2")


def test_a_committed_batch_is_not_registered_again(registry: PendingRegistry) -> None:
    # Given a batch registered and committed
    registry.register(TABLE, "b1", entry("b1"))
    registry.finish_commit(TABLE, ["b1"], committed_ms=1_000)

    # When it is redelivered and registered again
    again = registry.register(TABLE, "b1", entry("b1"))

    # Then it is a duplicate: nothing becomes pending
    assert again is False
    assert registry.pending_entries(TABLE) == {}
    assert registry.pending_tables() == set()
    assert registry.is_known(TABLE, "b1")


def test_finish_commit_moves_batches_and_is_idempotent(
    registry: PendingRegistry, redis_client: redis.Redis
) -> None:
    # Given three pending batches and a prepared commit of two of them
    for batch_id in ("b1", "b2", "b3"):
        registry.register(TABLE, batch_id, entry(batch_id))
    registry.prepare(TABLE, json.dumps({"seq": 7, "batch_ids": ["b1", "b2"]}))

    # When the commit is finished twice, the second time later
    registry.finish_commit(TABLE, ["b1", "b2"], committed_ms=1_000)
    registry.finish_commit(TABLE, ["b1", "b2"], committed_ms=2_000)

    # Then the two are committed (with the first commit time), the third still pending,
    # the prepared record gone, and the table still listed as pending
    assert set(registry.pending_entries(TABLE)) == {"b3"}
    assert redis_client.zrange(keys.committed(TABLE), 0, -1, withscores=True) == [
        (b"b1", 1_000.0),
        (b"b2", 1_000.0),
    ]
    assert registry.prepared(TABLE) is None
    assert registry.pending_tables() == {TABLE}


def test_pending_tables_follow_the_hashes(registry: PendingRegistry) -> None:
    # Given batches pending in two tables
    registry.register("events.a", "b1", entry("b1"))
    registry.register("events.b", "b2", entry("b2"))
    registry.register("events.b", "b3", entry("b3"))
    assert registry.pending_tables() == {"events.a", "events.b"}

    # When all of events.a and part of events.b are committed, then events.b's rest removed
    registry.finish_commit("events.a", ["b1"], committed_ms=1)
    registry.finish_commit("events.b", ["b2"], committed_ms=1)
    after_commits = registry.pending_tables()
    removed = registry.remove("events.b", ["b3", "never-registered"])

    # Then a table is listed exactly while it has pending batches
    assert after_commits == {"events.b"}
    assert removed == 1
    assert registry.pending_tables() == set()
    # ... and a removed (dead-lettered) batch is not remembered as committed
    assert not registry.is_known("events.b", "b3")


def test_stats_add_up(registry: PendingRegistry, redis_client: redis.Redis) -> None:
    # Given three batches of known sizes, and one malformed entry
    registry.register(TABLE, "b1", entry("b1", records=10, size=100, registered_ms=300))
    registry.register(TABLE, "b2", entry("b2", records=20, size=200, registered_ms=100))
    registry.register(TABLE, "b3", entry("b3", records=30, size=300, registered_ms=200))
    registry.register(TABLE, "junk", "not json")

    # When the stats are read
    stats = registry.stats(TABLE)

    # Then every batch is counted and the sizes summed
    assert stats == PendingStats(count=4, records=60, bytes=600, oldest_registered_ms=100)
    assert registry.stats("events.empty") == PendingStats(0, 0, 0, None)


def test_prepare_and_abandon(registry: PendingRegistry) -> None:
    # Given a prepared commit
    record = json.dumps({"seq": 3, "batch_ids": ["b1"]})
    registry.prepare(TABLE, record)
    assert registry.prepared(TABLE) == record

    # When it is abandoned
    registry.abandon_prepared(TABLE)

    # Then no prepared record remains
    assert registry.prepared(TABLE) is None


def test_trim_committed_forgets_only_old_batches(registry: PendingRegistry) -> None:
    # Given batches committed at 1,000 and 5,000 ms
    registry.finish_commit(TABLE, ["old"], committed_ms=1_000)
    registry.finish_commit(TABLE, ["new"], committed_ms=5_000)

    # When the dedup memory older than 5,000 ms is trimmed
    removed = registry.trim_committed(TABLE, older_than_ms=5_000)

    # Then the old batch could be registered again, the new one not
    assert removed == 1
    assert registry.register(TABLE, "old", entry("old"))
    assert not registry.register(TABLE, "new", entry("new"))


def test_odd_table_names_do_not_break_keys(registry: PendingRegistry) -> None:
    # Given a table name with braces, spaces, colons and non-ASCII characters
    odd = "odd }{ table:*ü"

    # When a batch is registered and committed in it
    assert registry.register(odd, "b1", entry("b1"))
    listed = registry.pending_tables()
    registry.finish_commit(odd, ["b1"], committed_ms=1)

    # Then it behaves like any table
    assert listed == {odd}
    assert registry.pending_tables() == set()
    assert not registry.register(odd, "b1", entry("b1"))


# --- model-based ---------------------------------------------------------------------------------

TABLES = ["events.a", "events.b", "odd }{ table"]
BATCHES = [f"b{i}" for i in range(6)]


class PendingModel(RuleBasedStateMachine):
    """Random register / prepare / finish / remove / trim sequences against a plain-dict model."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__()
        client.flushdb()
        self.registry = PendingRegistry(client)
        self.pending: dict[str, dict[str, str]] = {table: {} for table in TABLES}
        self.committed: dict[str, dict[str, int]] = {table: {} for table in TABLES}
        self.prepared: dict[str, str | None] = dict.fromkeys(TABLES)
        self.clock_ms = 0

    def tick(self) -> int:
        self.clock_ms += 1
        return self.clock_ms

    @rule(
        table=st.sampled_from(TABLES),
        batch_id=st.sampled_from(BATCHES),
        records=st.integers(0, 1_000),
    )
    def register(self, table: str, batch_id: str, records: int) -> None:
        text = entry(batch_id, records=records, size=records * 7, registered_ms=self.tick())
        expected = batch_id not in self.pending[table] and batch_id not in self.committed[table]
        assert self.registry.register(table, batch_id, text) is expected
        if expected:
            self.pending[table][batch_id] = text

    @rule(table=st.sampled_from(TABLES), seq=st.integers(0, 100))
    def prepare(self, table: str, seq: int) -> None:
        record = json.dumps({"seq": seq, "batch_ids": sorted(self.pending[table])})
        self.registry.prepare(table, record)
        self.prepared[table] = record

    @rule(table=st.sampled_from(TABLES))
    def abandon_prepared(self, table: str) -> None:
        self.registry.abandon_prepared(table)
        self.prepared[table] = None

    @rule(table=st.sampled_from(TABLES), batch_ids=st.lists(st.sampled_from(BATCHES), max_size=4))
    def finish_commit(self, table: str, batch_ids: list[str]) -> None:
        now = self.tick()
        self.registry.finish_commit(table, batch_ids, committed_ms=now)
        for batch_id in batch_ids:
            self.pending[table].pop(batch_id, None)
            self.committed[table].setdefault(batch_id, now)
        self.prepared[table] = None

    @rule(table=st.sampled_from(TABLES), batch_ids=st.lists(st.sampled_from(BATCHES), max_size=3))
    def remove(self, table: str, batch_ids: list[str]) -> None:
        expected = len(set(batch_ids) & set(self.pending[table]))
        assert self.registry.remove(table, batch_ids) == expected
        for batch_id in batch_ids:
            self.pending[table].pop(batch_id, None)

    @rule(table=st.sampled_from(TABLES), age_ms=st.integers(0, 20))
    def trim_committed(self, table: str, age_ms: int) -> None:
        cutoff = self.clock_ms - age_ms
        old = {b for b, at_ms in self.committed[table].items() if at_ms < cutoff}
        assert self.registry.trim_committed(table, older_than_ms=cutoff) == len(old)
        for batch_id in old:
            del self.committed[table][batch_id]

    @rule(table=st.sampled_from(TABLES), batch_id=st.sampled_from(BATCHES))
    def is_known(self, table: str, batch_id: str) -> None:
        known = batch_id in self.pending[table] or batch_id in self.committed[table]
        assert self.registry.is_known(table, batch_id) is known

    @invariant()
    def redis_matches_the_model(self) -> None:
        assert self.registry.pending_tables() == {t for t in TABLES if self.pending[t]}
        for table in TABLES:
            pending = self.pending[table]
            assert self.registry.pending_entries(table) == pending
            assert self.registry.prepared(table) == self.prepared[table]
            records = [json.loads(text)["records"] for text in pending.values()]
            assert self.registry.stats(table) == PendingStats(
                count=len(pending),
                records=sum(records),
                bytes=7 * sum(records),
                oldest_registered_ms=min(
                    (json.loads(text)["registered_ms"] for text in pending.values()), default=None
                ),
            )


def test_registry_behaves_like_the_model(redis_client: redis.Redis) -> None:
    # Given / When: random sequences of operations on three tables, six batch ids
    # Then: after every step Redis holds exactly what a dict model says (see the invariant)
    run_state_machine_as_test(
        lambda: PendingModel(redis_client),
        settings=settings(max_examples=40, stateful_step_count=25, deadline=None),
    )
