"""``icefleet dead-letters list|replay|purge``, and replayed events landing exactly once.

The command line in this process (click's runner) on the real Redis, the replay protocol with a
recording producer (assignment, a crash between enqueue and delete, duplicate dead letters,
events still invalid), then real workers: events the writers dead-lettered and dead letters left
by a failed batch are replayed, the replay repeated and interrupted, and each event lands once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from click.testing import CliRunner

from common.coord.deadletters import DeadLetterStore
from common.ingest.events import DeadLetter
from common.ingest.producer import Producer
from common.ingest.replay import REPLAYS_KEY, Replayer
from common.settings import Settings, load_settings
from tests.support.events import expected_by_table, make_events, ndjson
from tests.support.fleet import environment, fleet_config, running_fleet, wait_idle
from tests.support.readback import assert_exactly_once, read_ids
from tests.support.stack import make_stack
from workers.cli.deadletters import preview
from workers.cli.main import main

pytestmark = pytest.mark.integration


def event_line(event_id: str, type_: str = "com.example.order", **extra: Any) -> bytes:
    body = {
        "specversion": "1.0",
        "id": event_id,
        "source": "/dl",
        "type": type_,
        "time": "2024-05-01T12:00:00Z",
        "data": {"n": 1},
        **extra,
    }
    return orjson.dumps(body)


class RecordingProducer:
    def __init__(self, fail_after_enqueue: bool = False) -> None:
        self.sent: list[tuple[str, str | None, list[str]]] = []
        self.fail_after_enqueue = fail_after_enqueue

    def enqueue_derived(self, events: list[str], table: str | None, batch_id: str) -> list[str]:
        self.sent.append((batch_id, table, list(events)))
        if self.fail_after_enqueue:
            raise KeyboardInterrupt("the replay was interrupted after its enqueue")
        return [batch_id]


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    return load_settings({}, redis_url=redis_url, home=tmp_path / "home")


@pytest.fixture
def cli(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CliRunner]:
    monkeypatch.setenv("ICEFLEET_REDIS_URL", redis_url)
    monkeypatch.setenv("ICEFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ICEFLEET_CATALOG", raising=False)
    yield CliRunner()


def add(client: redis.Redis, *letters: DeadLetter, table: str | None = None) -> list[str]:
    return DeadLetterStore(client).add(letters, table=table)


# --- list and purge ----------------------------------------------------------------------------------


def test_list_shows_hostile_input_escaped_and_json_keeps_every_byte(
    cli: CliRunner, redis_client: redis.Redis
) -> None:
    # Given dead letters whose input holds NUL, a bidi override, a newline and invalid UTF-8
    hostile = b'{"id":"a\\u0000b","x":"\xe2\x80\xaeevil\x00\nline"}'
    binary = b"\xff\xfe not utf-8"
    ids = add(
        redis_client,
        DeadLetter("b1", 3, "specversion: required attribute is missing", "specversion", hostile),
        DeadLetter("b1", 4, "not valid UTF-8: byte 0 (invalid start byte)", None, binary),
        table="events.t",
    )

    # When they are listed for a human, and as JSON
    text = cli.invoke(main, ["dead-letters", "list"])
    as_json = cli.invoke(main, ["dead-letters", "list", "--json", "--count", "5"])

    # Then the terminal never gets the raw control characters, and JSON gives the input back
    assert text.exit_code == 0, text.output
    assert "\u202e" not in text.output and "\x00" not in text.output
    assert "\\u202e" in text.output and "\\x00" in text.output
    assert "2 of 2 dead letter(s)" in text.output and ids[0] in text.output
    assert as_json.exit_code == 0, as_json.output
    records = [json.loads(line) for line in as_json.output.splitlines()]
    assert [r["id"] for r in records] == ids
    assert records[0]["raw"].encode() == hostile and records[0]["raw_base64"] is False
    assert records[1]["raw_base64"] is True and records[0]["table"] == "events.t"
    assert preview(b"a" * 500).endswith("...") and len(preview(b"a" * 500)) == 83


def test_purge_asks_first_unless_told_yes(cli: CliRunner, redis_client: redis.Redis) -> None:
    add(redis_client, DeadLetter("b", 0, "r", None, b"x"), DeadLetter("b", 1, "r", None, b"y"))
    declined = cli.invoke(main, ["dead-letters", "purge"], input="n\n")
    assert declined.exit_code == 1 and DeadLetterStore(redis_client).count() == 2
    done = cli.invoke(main, ["dead-letters", "purge", "--yes"])
    assert done.exit_code == 0, done.output
    assert "2 dead letter(s) deleted" in done.output
    assert DeadLetterStore(redis_client).count() == 0
    assert cli.invoke(main, ["dead-letters", "list"]).output.strip() == "no dead letters"


def test_replay_needs_a_selection_and_reports_unknown_ids(cli: CliRunner) -> None:
    neither = cli.invoke(main, ["dead-letters", "replay"])
    assert neither.exit_code == 2 and "--id ID" in neither.output
    both = cli.invoke(main, ["dead-letters", "replay", "--all", "--id", "1-0"])
    assert both.exit_code == 2
    bad_table = cli.invoke(main, ["dead-letters", "replay", "--all", "--table", "../x"])
    assert bad_table.exit_code == 2
    unknown = cli.invoke(main, ["dead-letters", "replay", "--id", "123-0", "--id", "junk"])
    assert unknown.exit_code == 0, unknown.output
    assert "no dead letter 123-0" in unknown.output and "no dead letter junk" in unknown.output


# --- the replay protocol -----------------------------------------------------------------------------


def test_a_replay_interrupted_after_its_enqueue_resends_the_same_batch(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # Given three dead letters, one of them a whole failed batch of two events
    add(redis_client, DeadLetter("b1", 0, "write failed", None, event_line("e1")))
    whole = event_line("e2") + b"\n" + event_line("e3") + b"\n"
    add(redis_client, DeadLetter("b2", 0, "write failed after 10 attempt(s)", None, whole))
    add(redis_client, DeadLetter("b3", 0, "x", None, event_line("e4", "com.example.refund")))
    letters = DeadLetterStore(redis_client).list()

    # When a replay is interrupted right after enqueueing, then run again in full
    crashed = RecordingProducer(fail_after_enqueue=True)
    with pytest.raises(KeyboardInterrupt):
        Replayer(settings, redis_client, crashed).replay(letters)
    assert DeadLetterStore(redis_client).count() == 3  # nothing deleted before the enqueue
    again = RecordingProducer()
    report = Replayer(settings, redis_client, again).replay(DeadLetterStore(redis_client).list())

    # Then the second run sent the same batch id with the same events (deduplicated downstream)
    assert crashed.sent == again.sent[:1]
    batch_id, table, events = again.sent[0]
    assert batch_id.startswith("~replay-") and table is None  # a derived id (common/wire.py)
    assert [json.loads(e)["id"] for e in events] == ["e1", "e2", "e3", "e4"]
    assert (report.events, report.removed, report.still_invalid) == (4, 3, 0)
    assert DeadLetterStore(redis_client).count() == 0
    assert redis_client.hlen(REPLAYS_KEY) == 0


def test_letters_for_an_explicit_table_go_there_and_table_filter_routes(
    cli: CliRunner, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    import common.ingest.replay

    sent: list[tuple[str, str | None, list[str]]] = []

    def record(self: Any, events: list[str], table: str | None, batch_id: str) -> None:
        sent.append((batch_id, table, events))

    monkeypatch.setattr(common.ingest.replay.Replayer, "_enqueue", record)
    add(redis_client, DeadLetter("b1", 0, "r", None, event_line("o1")))  # routes to events.order
    add(redis_client, DeadLetter("b2", 0, "r", None, event_line("r1", "com.example.refund")))
    add(redis_client, DeadLetter("b3", 0, "r", None, event_line("x1")), table="archive.orders")

    result = cli.invoke(main, ["dead-letters", "replay", "--all", "--table", "events.order"])
    assert result.exit_code == 0, result.output
    assert [(table, [json.loads(e)["id"] for e in events]) for _, table, events in sent] == [
        (None, ["o1"])
    ]
    result = cli.invoke(main, ["dead-letters", "replay", "--all", "--table", "archive.orders"])
    assert sent[-1][1] == "archive.orders"
    assert DeadLetterStore(redis_client).count() == 1  # the refund, not selected


def test_invalid_events_go_back_with_their_reason_and_twins_are_dropped(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # Given a dead letter stored twice (its writer was redelivered), and one still invalid
    twin = DeadLetter("b1", 5, "id: required attribute is missing", "id", event_line("t1"))
    add(redis_client, twin)
    add(redis_client, twin)
    bad = b'{"specversion":"1.0","source":"/x","type":"t"}'
    [bad_id] = add(
        redis_client, DeadLetter("b2", 7, "id: required attribute is missing", "id", bad)
    )

    # When they are replayed
    producer = RecordingProducer()
    report = Replayer(settings, redis_client, producer).replay(DeadLetterStore(redis_client).list())

    # Then the event is sent once, the twin deleted, and the invalid one is back with a reason
    assert [json.loads(e)["id"] for _, _, events in producer.sent for e in events] == ["t1"]
    assert (report.duplicates, report.still_invalid, report.events) == (1, 1, 1)
    [back] = DeadLetterStore(redis_client).list()
    assert back.id != bad_id and back.raw == bad and (back.batch_id, back.position) == ("b2", 7)
    assert back.reason.startswith("id: required attribute is missing (replayed dead letter")
    # ... and it can be replayed again later (its origin was released), to the same effect
    report = Replayer(settings, redis_client, producer).replay(DeadLetterStore(redis_client).list())
    assert report.still_invalid == 1 and len(producer.sent) == 1


# --- real workers ------------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_replayed_events_land_exactly_once_through_real_workers(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given writers that accept events of at most 2 KiB
    home = tmp_path / "home"
    env, settings = fleet_config(monkeypatch, redis_url, home, ICEFLEET_MAX_EVENT_BYTES="2048")
    normal = make_events("ok", 300, types=("com.example.order", "com.example.refund"))
    oversized = [{**e, "data": {"blob": "z" * 3_000}} for e in make_events("big", 5)]
    lost = make_events("lost", 40)  # a batch that kept failing: whole, in the dead letters
    lost_line = make_events("lost1", 1)[0]
    add(
        redis_client,
        DeadLetter(
            "lost",
            0,
            "write failed after 10 attempt(s)",
            None,
            ndjson(lost).encode() + b'{"not": "an event"}\n',
        ),
    )
    add(redis_client, DeadLetter("x", 2, "write failed", None, orjson.dumps(lost_line)))

    with environment(env), running_fleet(settings, writers=2):
        # When events are sent, some too large for the writers
        with Producer(settings) as producer:
            producer.enqueue(normal, batch_id="normal")
            producer.enqueue(oversized, batch_id="oversized")
        wait_idle(redis_client, timeout_s=120)
        store = DeadLetterStore(redis_client)
        dead = store.list(100)
        assert sorted(d.batch_id for d in dead).count("oversized") == 5
        assert all(
            "over the limit of 2048 bytes" in d.reason for d in dead if d.batch_id == "oversized"
        )

        # ... and the dead letters are replayed: once interrupted after its enqueue, then twice
        with pytest.raises(KeyboardInterrupt):
            Replayer(settings, redis_client, _Interrupted(settings)).replay(store.list(100))
        first = run_cli("dead-letters", "replay", "--all", env=env)
        assert first.returncode == 0, first.stderr
        second = run_cli("dead-letters", "replay", "--all", env=env)
        assert second.returncode == 0, second.stderr
        wait_idle(redis_client, timeout_s=120)
        listed = run_cli("dead-letters", "list", "--json", "--count", "100", env=env)

    # Then every replayed event landed exactly once, next to the events sent normally
    stack = make_stack(redis_url, home)
    try:
        landed = normal + lost + [lost_line]
        for name, ids in expected_by_table(stack.settings, landed).items():
            assert_exactly_once(read_ids(stack.table(name)), ids, name)
    finally:
        stack.close()
    # ... and what still cannot land is a dead letter again, with its reason: the oversized
    # events (rejected by the writers once more) and the line that is not an event
    remaining = [json.loads(line) for line in listed.stdout.splitlines()]
    reasons = sorted(r["reason"].split(" (")[0][:40] for r in remaining)
    assert len(remaining) == 6, remaining
    assert sum("over the limit of 2048" in r["reason"] for r in remaining) == 5
    assert any(r["reason"].startswith("specversion: required attribute") for r in remaining), (
        reasons
    )
    assert "enqueued in 1 batch(es)" in first.stderr, first.stderr


class _Interrupted(RecordingProducer):
    """Enqueues for real, then dies before the replay deletes anything."""

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def enqueue_derived(self, events: list[str], table: str | None, batch_id: str) -> list[str]:
        with Producer(self.settings) as producer:
            producer.enqueue_derived(events, table, batch_id)
        raise KeyboardInterrupt("interrupted after the enqueue")
