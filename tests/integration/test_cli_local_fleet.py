"""The CLI next to a running ``icefleet up``, as a newcomer uses it from a second terminal.

One real ``icefleet up`` (its own redis-server on a free port, a writer, a committer) runs in a
directory with nothing configured; the other commands run in the same directory with no
``ICEFLEET_*`` variable at all and must find it through its record (``.icefleet/fleet.json``).
``send`` lands the valid events of a mixed file and dead-letters the rest with the writer's
records; everything is read back with pyiceberg and with iceberg-rust (``icefleet query``).
Stale records (owner dead, Redis gone) are removed and refused; a password in a record never
shows.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from common.coord.deadletters import DeadLetterStore
from common.ingest.events import parse_batch
from common.lake.catalog import open_catalog
from common.settings import load_settings
from tests.integration.test_fleet import processes_with
from tests.support.readback import read_ids
from tests.support.services import RedisProcess, free_port, wait_until
from workers.fleet_record import FleetRecord, process_started, read_record, write_record

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "workers.cli.main"]
MARKER = "ICEFLEET_TEST_FLEET_MARKER"


def bare_env(**extra: str) -> dict[str, str]:
    """The environment of a new terminal: no ICEFLEET_* or PYICEBERG_* variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEFLEET_", "PYICEBERG_"))}
    return {**env, **extra}


def icefleet(cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd,
        env=bare_env(**extra),
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


def event(event_type: str, event_id: str) -> bytes:
    body = {"specversion": "1.0", "id": event_id, "source": "/cli", "type": event_type}
    return json.dumps({**body, "data": {"n": len(event_id)}}).encode()


@dataclass
class Up:
    cwd: Path
    home: Path
    proc: subprocess.Popen[bytes]
    stderr: Path

    def client(self) -> redis.Redis:
        record = read_record(self.home)
        assert record is not None
        return redis.Redis.from_url(record.redis_url)

    def ids(self, table: str) -> list[str]:
        catalog = open_catalog(load_settings({}, home=self.home))
        return sorted(read_ids(catalog.load_table(tuple(table.split(".")))))


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    # `icefleet up` in a directory of its own, nothing configured (a fast commit interval aside)
    cwd = tmp_path_factory.mktemp("newcomer")
    marker = uuid.uuid4().hex
    stderr = cwd / "up.stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            [*CLI, "up", "--writers", "1", "--pool", "solo"],
            cwd=cwd,
            env=bare_env(ICEFLEET_COMMIT_INTERVAL_MS="200", **{MARKER: marker}),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    fleet = Up(cwd, cwd / ".icefleet", proc, stderr)
    try:
        wait_until(
            lambda: "Ctrl-C stops everything" in stderr.read_text() or proc.poll() is not None,
            120,
            "icefleet up",
            poll_s=0.2,
        )
        assert proc.poll() is None, stderr.read_text()
        yield fleet
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
    # Ctrl-C stopped everything and removed the record
    assert code == 0, stderr.read_text()
    assert read_record(fleet.home) is None
    assert processes_with(marker) == []


def test_send_from_a_second_terminal_finds_the_running_up(up: Up) -> None:
    # Given a running `icefleet up` that recorded its Redis (a random port) privately
    record = read_record(up.home)
    assert record is not None
    assert stat.S_IMODE(record.path.stat().st_mode) == 0o600
    assert ":6379/" not in record.redis_url
    ids = [f"found-{n}" for n in range(25)]
    (up.cwd / "found.ndjson").write_bytes(
        b"\n".join(event("com.example.cli_found", i) for i in ids) + b"\n"
    )

    # When send and wait run from the same directory with no variable set
    sent = icefleet(up.cwd, "send", "found.ndjson")
    waited = icefleet(up.cwd, "wait", "--timeout", "120")

    # Then the events land in the fleet's tables, as pyiceberg and iceberg-rust read them
    assert sent.returncode == 0, sent.stderr
    assert "25 event(s) sent in 1 batch(es)" in sent.stderr
    assert waited.returncode == 0, waited.stderr
    assert up.ids("events.cli_found") == sorted(ids)
    rust = icefleet(up.cwd, "query", "--json", "SELECT id FROM events.cli_found ORDER BY id")
    assert rust.returncode == 0, rust.stderr
    assert [row["id"] for row in json.loads(rust.stdout)] == sorted(ids)

    # And status says where its Redis came from
    status = icefleet(up.cwd, "status", "--json", "--no-workers")
    assert status.returncode == 0, status.stderr
    assert str(record.path) in json.loads(status.stdout)["redis_from"]


def test_a_mixed_file_lands_its_valid_events_and_dead_letters_the_rest(up: Up) -> None:
    # Given NDJSON with valid events, a line that is not UTF-8, broken JSON, a blank line and
    # an event without a source
    lines = [
        event("com.example.cli_mixed", "m-1"),
        b'{"specversion":"1.0","id":"\xff\xfe","source":"/cli"}',
        event("com.example.cli_mixed", "m-2"),
        b'{"specversion":"1.0","id":"m-x",',
        b"",
        event("com.example.cli_mixed", "m-3"),
        b'{"specversion":"1.0","id":"m-4","type":"com.example.cli_mixed"}',
    ]
    payload = b"\n".join(lines) + b"\n"
    (up.cwd / "mixed.ndjson").write_bytes(payload)
    client = up.client()
    before = DeadLetterStore(client).count()

    # When it is sent
    sent = icefleet(up.cwd, "send", "mixed.ndjson", "--batch-id", "mixed-1")
    waited = icefleet(up.cwd, "wait", "--timeout", "120", "--batch-id", "mixed-1")

    # Then send exits 1, naming each refused line and the count
    assert sent.returncode == 1, sent.stderr
    assert sent.stdout.split() == ["mixed-1"]
    assert "refused line 2: not valid UTF-8" in sent.stderr
    assert "refused line 4: not valid JSON" in sent.stderr
    assert "refused line 7: source" in sent.stderr
    assert sent.stderr.strip().splitlines()[-1].startswith("error: 3 event(s) sent")
    # And the valid events are committed
    assert waited.returncode == 0, waited.stderr
    assert up.ids("events.cli_mixed") == ["m-1", "m-2", "m-3"]
    # And the rest are dead letters: the records the writer's parser makes, bytes as read
    letters = DeadLetterStore(client).list(100)[before:]
    expected = parse_batch(payload, batch_id="mixed-1").dead_letters
    assert [(d.batch_id, d.position, d.reason, d.attribute, d.raw) for d in letters] == [
        (d.batch_id, d.position, d.reason, d.attribute, d.raw) for d in expected
    ]
    assert [d.position for d in letters] == [1, 3, 6]
    assert letters[0].raw == lines[1]
    client.close()


def test_a_json_array_names_the_index_of_what_it_refused(up: Up) -> None:
    # Given a JSON array: valid, a number, valid, an event with a bad time
    items = [
        json.loads(event("com.example.cli_array", "a-0")),
        42,
        json.loads(event("com.example.cli_array", "a-2")),
        {**json.loads(event("com.example.cli_array", "a-3")), "time": "yesterday"},
    ]
    (up.cwd / "array.json").write_text(json.dumps(items, indent=2))

    # When it is sent
    sent = icefleet(up.cwd, "send", "array.json", "--batch-id", "array-1")
    waited = icefleet(up.cwd, "wait", "--timeout", "120", "--batch-id", "array-1")

    # Then the refused elements are named by their index, and the valid ones land
    assert sent.returncode == 1
    assert "refused element [1]: not a JSON object" in sent.stderr
    assert "refused element [3]: time" in sent.stderr
    assert waited.returncode == 0, waited.stderr
    assert up.ids("events.cli_array") == ["a-0", "a-2"]


def test_status_watch_refreshes_and_a_second_fleet_is_refused(up: Up) -> None:
    # When status --watch refreshes twice
    watched = icefleet(up.cwd, "status", "--watch", "--count", "2", "--interval", "0.2")
    # Then it ends normally, having shown the queues and where its Redis came from
    assert watched.returncode == 0, watched.stderr
    assert "queues" in watched.stdout
    assert "fleet.json" in watched.stdout

    # When a demo starts in the same directory
    demo = icefleet(up.cwd, "demo", "--events", "10")
    # Then it refuses with one line instead of starting a second fleet on the same files
    assert demo.returncode == 1
    assert demo.stderr.strip().splitlines() == [
        f"error: the local fleet of `icefleet up` (pid {up.proc.pid}) recorded in "
        f"{up.home.resolve() / 'fleet.json'} is running: stop it first (Ctrl-C in its "
        "terminal), or use another ICEFLEET_HOME"
    ]


# --- stale records -------------------------------------------------------------------------------


def test_a_record_whose_owner_died_is_removed_and_refused(tmp_path: Path) -> None:
    # Given a record left by a fleet whose process is gone (a crash, kill -9)
    gone = subprocess.Popen(["true"])
    gone.wait()
    home = tmp_path / ".icefleet"
    record = FleetRecord(
        f"redis://127.0.0.1:{free_port()}/0", None, str(home), gone.pid, None, "up", 1
    )
    write_record(record)

    # When send runs there with nothing configured
    (tmp_path / "e.ndjson").write_bytes(event("com.example.x", "1") + b"\n")
    sent = icefleet(tmp_path, "send", "e.ndjson")

    # Then it refuses with one line rather than use the default port, and removed the record
    assert sent.returncode == 1
    assert sent.stderr.strip().splitlines() == [
        f"error: the local fleet recorded in {record.path} is gone (its process {gone.pid} has "
        "exited); the stale record was removed. Start it again with `icefleet up`, or set "
        "ICEFLEET_REDIS_URL"
    ]
    assert not record.path.exists()


def test_a_record_whose_redis_is_gone_is_removed_and_refused(tmp_path: Path) -> None:
    # Given a record whose owner lives but whose Redis port is closed
    owner = subprocess.Popen(["sleep", "120"])
    try:
        home = tmp_path / ".icefleet"
        url = f"redis://127.0.0.1:{free_port()}/0"
        record = FleetRecord(url, None, str(home), owner.pid, process_started(owner.pid), "up", 1)
        write_record(record)

        # When wait runs there
        waited = icefleet(tmp_path, "wait", "--timeout", "1")
    finally:
        owner.kill()
        owner.wait()

    # Then one line says so, and the record is gone
    assert waited.returncode == 1
    lines = waited.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"its Redis at {url} is not answering" in lines[0]
    assert not record.path.exists()


def test_a_password_in_the_record_is_used_and_never_shown(tmp_path: Path) -> None:
    # Given a live record whose Redis has a password (requirepass)
    with RedisProcess(tmp_path / "redis", password="pw-in-record-99") as server:
        home = tmp_path / ".icefleet"
        record = FleetRecord.for_this_process(server.url, None, home, "up")
        write_record(record)

        # When status and send run there with nothing configured
        status = icefleet(tmp_path, "status", "--no-workers")
        (tmp_path / "e.ndjson").write_bytes(event("com.example.x", "1") + b"\n")
        sent = icefleet(tmp_path, "send", "e.ndjson")

        # Then both use it, show the URL redacted, and never the password
        assert status.returncode == 0, status.stderr
        assert sent.returncode == 0, sent.stderr
        assert f"redis://:***@127.0.0.1:{server.port}/0" in status.stdout.replace("\n", "")
        for output in (status.stdout, status.stderr, sent.stdout, sent.stderr):
            assert "pw-in-record-99" not in output
        assert redis.Redis.from_url(server.url).llen("ingest") == 1
