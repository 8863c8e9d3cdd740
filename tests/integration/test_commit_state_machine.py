"""The commit protocol as a state machine: random interleavings of writes, redeliveries, commits,
committers crashing before and after the catalog commit, outside appends and schema changes, and
duplicate events in flight: batches repeating (or contradicting) events of other batches, writers
killed mid-batch holding claims on event identities, killed batches redelivered or dead-lettered
and replayed (common/coord/claims.py).

Real redis-server, and a SQLite or a PostgreSQL catalog (a fresh database per example), in-process: a crash is a fault hook raising
:class:`CommitterCrash` at ``before_catalog_commit`` or ``after_catalog_commit``, which leaves
Redis and the catalog exactly as a committer dying there would (the lock is released on the way
out, as its TTL would). A model tracks which batches are pending, prepared, landed but not
finished, or committed; after every step the table must hold exactly the committed batches and
the outside rows, once each, with a valid lineage, and Redis must agree with the model.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from common.coord.claims import release_events
from common.maintenance.invariants import validate_lineage
from tests.support.catalogs import postgres_backend
from tests.support.events import ids_of, make_events
from tests.support.faults import CommitterCrash, raise_at
from tests.support.fleet import environment
from tests.support.readback import assert_exactly_once
from tests.support.services import fresh_postgres_database
from tests.support.stack import TABLE, make_stack, outside_append

pytestmark = pytest.mark.integration

# More for a bug hunt: ICEFLEET_TEST_STATEFUL_EXAMPLES=500 (200 take about a minute).
EXAMPLES = int(os.environ.get("ICEFLEET_TEST_STATEFUL_EXAMPLES", "15"))


class WriterKilled(Exception):
    """A writer dying between its claims and its registration (in-process)."""


class CommitProtocol(RuleBasedStateMachine):
    """One table, one writer, committers that may crash, an outside writer."""

    redis_url = ""  # set by the test
    workdir = Path()
    postgres_url: str | None = None  # set by the test for the PostgreSQL catalog

    batches = Bundle("batches")

    def __init__(self) -> None:
        super().__init__()
        client = redis.Redis.from_url(self.redis_url)
        client.flushall()
        client.close()
        self.home = Path(tempfile.mkdtemp(dir=self.workdir))
        self.resources = ExitStack()
        catalog = None
        if self.postgres_url is not None:
            url = self.resources.enter_context(fresh_postgres_database(self.postgres_url))
            backend = postgres_backend(url, self.home / "warehouse", name="machinepg")
            self.resources.enter_context(environment(backend.env))
            catalog = backend.catalog_name
        self.pipe = make_stack(self.redis_url, self.home, catalog=catalog)
        self.events: dict[str, list[dict[str, Any]]] = {}  # every batch written
        # The model: each written batch is in exactly one of these.
        self.pending: set[str] = set()  # not in the table
        self.prepared: set[str] = set()  # subset of pending: in the prepared record
        self.landed: set[str] = set()  # in the table, prepared record not finished yet
        self.committed: set[str] = set()  # in the table, finished (or landed)
        self.outside: list[str] = []
        self.counter = itertools.count()
        self.extra_fields: list[str] = []
        # batches whose writer was killed after claiming its events, before registering them
        self.killed: dict[str, list[dict[str, Any]]] = {}
        self.duplicates = 0  # repeats counted so far, by the model

    # --- helpers ---------------------------------------------------------------------------

    def table_exists(self) -> bool:
        return bool(self.events)

    def new_batch(self, count: int, extra: dict[str, Any] | None = None) -> str:
        batch = f"b{next(self.counter):03d}"
        events = make_events(batch, count, extra=extra)
        result = self.pipe.write(batch, events)
        assert result.records == count and result.skipped_tables == []
        self.events[batch] = events
        self.pending.add(batch)
        return batch

    def expected_ids(self, batches: set[str]) -> list[str]:
        return [i for b in sorted(batches) for i in ids_of(self.events[b])] + self.outside

    def land(self, batches: set[str]) -> None:
        self.pending -= batches
        self.prepared -= batches
        self.committed |= batches
        self.landed = set(batches)

    # --- rules ------------------------------------------------------------------------------

    @rule(target=batches, count=st.integers(1, 4))
    def write_batch(self, count: int) -> str:
        # Given / When a new batch is written, Then it is pending (checked by the invariant)
        return self.new_batch(count)

    @rule(target=batches)
    def write_batch_with_new_field(self) -> str:
        # Given a batch whose events carry a data field the table has never seen
        name = f"extra_{len(self.extra_fields)}"
        # When it is written
        batch = self.new_batch(2, extra={name: len(self.extra_fields)})
        self.extra_fields.append(name)
        # Then the writer added the column to the table (top level or inside a struct)
        columns = self.pipe.table().schema().column_names
        assert any(c == name or c.endswith(f".{name}") for c in columns), columns
        return batch

    @rule(batch=batches)
    def redeliver(self, batch: str) -> None:
        # Given a batch that was already written (pending, prepared, landed or committed)
        # When it is delivered again
        result = self.pipe.write(batch, self.events[batch])
        # Then the writer skips it: no new file, nothing registered
        assert result.skipped_tables == [TABLE] and result.files == {}

    @rule()
    def commit(self) -> None:
        # Given whatever is pending, prepared or landed
        # When a healthy committer runs
        results = self.pipe.commit()
        # Then everything lands and is finished, in increasing commit-seqs
        assert [r.seq for r in results] == sorted({r.seq for r in results})
        self.committed |= self.pending
        self.pending, self.prepared, self.landed = set(), set(), set()

    @rule(recover_now=st.booleans())
    def crash_before_catalog_commit(self, recover_now: bool) -> None:
        # Given whatever is pending, prepared or landed
        committer = self.pipe.committer_with(raise_at("before_catalog_commit"))
        # When a committer dies right before its catalog commit
        try:
            committer.commit_table(TABLE)
            crashed = False
        except CommitterCrash:
            crashed = True
        # Then it died iff something was to be committed; a landed commit was finished first,
        # and what it was about to commit is now prepared (and did not land)
        assert crashed == bool(self.pending)
        self.landed = set()
        if crashed and not self.prepared:
            self.prepared = set(self.pending)
        if recover_now:
            self.commit()

    @rule()
    def crash_after_catalog_commit(self) -> None:
        # Given whatever is pending, prepared or landed
        committer = self.pipe.committer_with(raise_at("after_catalog_commit"))
        # When a committer dies right after its catalog commit, before finishing it
        try:
            committer.commit_table(TABLE)
            crashed = False
        except CommitterCrash:
            crashed = True
        # Then a prepared commit landed if there was one, else everything pending did
        assert crashed == bool(self.pending)
        if crashed:
            self.land(set(self.prepared) if self.prepared else set(self.pending))
        else:
            self.landed = set()

    @precondition(lambda self: self.table_exists())
    @rule(rows=st.integers(1, 3))
    def outside_append(self, rows: int) -> None:
        # Given the table, When another tool appends rows with plain pyiceberg
        ids = [f"outside-{len(self.outside) + n}" for n in range(rows)]
        outside_append(self.pipe.catalog, TABLE, ids)
        # Then they are in the table (checked by the invariant)
        self.outside += ids

    @precondition(lambda self: self.table_exists() or self.killed)
    @rule(data=st.data(), conflicting=st.booleans())
    def write_batch_with_repeats(self, data: st.DataObject, conflicting: bool) -> None:
        # Given a batch repeating events of a written (or killed, still in flight) batch, plus
        # one new event, and maybe a variant of a known event with other bytes
        sources = {**self.events, **self.killed}
        source = data.draw(st.sampled_from(sorted(sources)))
        copies = sources[source][: data.draw(st.integers(1, len(sources[source])))]
        batch = f"r{next(self.counter):03d}"
        fresh = make_events(batch, 1)
        variant = [{**sources[source][0], "subject": "other bytes"}] if conflicting else []
        # When it is written
        result = self.pipe.write(batch, copies + fresh + variant)
        # Then only the new event is written; the copies are counted, the variant dead-lettered
        assert result.records == 1
        assert result.duplicates == {TABLE: (len(copies), len(variant))}
        assert [d.attribute for d in result.dead_letters] == ["id"] * len(variant)
        self.duplicates += len(copies)
        self.events[batch] = fresh
        self.pending.add(batch)

    @rule(count=st.integers(1, 3))
    def kill_writer_mid_batch(self, count: int) -> None:
        # Given a new batch, When its writer dies after claiming its events, before registering
        batch = f"k{next(self.counter):03d}"
        events = make_events(batch, count)
        registry = self.pipe.registry

        def killed(*_: Any, **__: Any) -> bool:
            raise WriterKilled(batch)

        registry.register = killed  # type: ignore[method-assign]
        try:
            with pytest.raises(WriterKilled):
                self.pipe.write(batch, events)
        finally:
            del registry.register
        # Then nothing is registered (checked by the invariant), its claims are held
        self.killed[batch] = events

    @precondition(lambda self: self.killed)
    @rule(data=st.data())
    def redeliver_killed(self, data: st.DataObject) -> None:
        # Given a batch whose writer was killed, When it is delivered again
        batch = data.draw(st.sampled_from(sorted(self.killed)))
        events = self.killed.pop(batch)
        result = self.pipe.write(batch, events)
        # Then its claims were its own: every event is written
        assert result.records == len(events) and result.duplicates == {}
        self.events[batch] = events
        self.pending.add(batch)

    @precondition(lambda self: self.killed)
    @rule(data=st.data())
    def dead_letter_killed_and_replay(self, data: st.DataObject) -> None:
        # Given a batch whose writer was killed, When it is dead-lettered (its claims given back,
        # as workers/tasks/write.py does) and its dead letter replayed under a derived id
        batch = data.draw(st.sampled_from(sorted(self.killed)))
        events = self.killed.pop(batch)
        rows = {
            TABLE: [
                (n, e["source"], e["id"], orjson.dumps(e).decode()) for n, e in enumerate(events)
            ]
        }
        window_s = self.pipe.settings.dedup_window_s
        assert release_events(self.pipe.registry.claims, batch, rows, window_s) == len(events)
        replay = f"~replay-{batch}"
        result = self.pipe.write(replay, events)
        # Then the replay lands every event
        assert result.records == len(events) and result.duplicates == {}
        self.events[replay] = events
        self.pending.add(replay)

    # --- invariants ---------------------------------------------------------------------------

    @invariant()
    def table_holds_exactly_the_committed_batches(self) -> None:
        if not self.table_exists():
            return
        table = self.pipe.table()
        assert validate_lineage(table) == []
        assert_exactly_once(table, self.expected_ids(self.committed))

    @invariant()
    def redis_agrees_with_the_model(self) -> None:
        registry = self.pipe.registry
        assert set(registry.pending_entries(TABLE)) == self.pending | self.landed
        has_record = registry.prepared(TABLE) is not None
        assert has_record == bool(self.prepared or self.landed)
        for batch in self.committed - self.landed:
            assert registry.is_known(TABLE, batch)

    def teardown(self) -> None:
        try:
            for batch, events in sorted(self.killed.items()):  # every killed writer comes back
                assert self.pipe.write(batch, events).records == len(events)
                self.events[batch] = events
                self.pending.add(batch)
            self.killed = {}
            if self.table_exists():
                # After a final commit, everything ever written is there exactly once
                self.commit()
                table = self.pipe.table()
                assert validate_lineage(table) == []
                assert_exactly_once(table, self.expected_ids(set(self.events)))
                assert self.pipe.registry.pending_entries(TABLE) == {}
                assert self.pipe.registry.prepared(TABLE) is None
                dropped = self.pipe.registry.duplicates().get(TABLE, (0, 0))[0]
                assert dropped == self.duplicates
        finally:
            self.pipe.close()
            self.resources.close()
            shutil.rmtree(self.home, ignore_errors=True)


@pytest.mark.parametrize("catalog", ["sqlite", "postgres"])
def test_the_commit_protocol_keeps_exactly_once_under_any_interleaving(
    redis_url: str, tmp_path: Path, catalog: str, request: pytest.FixtureRequest
) -> None:
    # Given a real redis-server and, for each example, a scratch directory and a catalog of its
    # own (SQLite under it, or a fresh PostgreSQL database)
    postgres_url = request.getfixturevalue("postgres_url") if catalog == "postgres" else None
    bound = {"redis_url": redis_url, "workdir": tmp_path, "postgres_url": postgres_url}
    machine = type("BoundCommitProtocol", (CommitProtocol,), bound)
    # When hypothesis runs random sequences of writes, redeliveries, commits, crashes, outside
    # appends and schema changes
    # Then every invariant holds after every step, and after the final commit
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
