"""The local fleet's record (workers/fleet_record.py) and how commands choose their Redis and
catalog from it (workers/cli/context.py).

No server: the owner of a record is this test process (alive) or a process that has exited;
whether its Redis answers is tested with real processes in tests/integration/test_cli_local_fleet.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from common.errors import StaleFleetRecordError
from workers.cli.context import FROM_ENV, load_context
from workers.fleet_record import (
    FleetRecord,
    keep_recorded,
    process_alive,
    process_started,
    read_record,
    record_path,
    recorded,
    remove_record,
    write_record,
)

pytestmark = pytest.mark.unit

URL = "redis://:hunter2@127.0.0.1:6390/0"


def exited_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_record_is_written_atomically_private_and_read_back(tmp_path: Path) -> None:
    # Given a record of this process with a password in its Redis URL
    record = FleetRecord.for_this_process(URL, "prod", tmp_path, "up")

    # When it is written
    path = write_record(record)

    # Then it is the only file (no temporary left), readable by its owner only, and reads back equal
    assert [p.name for p in tmp_path.iterdir()] == ["fleet.json"]
    assert path == record_path(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_record(tmp_path) == record
    assert json.loads(path.read_text())["redis_url"] == URL


def test_record_never_shows_the_password(tmp_path: Path) -> None:
    record = FleetRecord.for_this_process(URL, None, tmp_path, "demo")
    assert "hunter2" not in repr(record)
    assert "***" in repr(record)
    assert "hunter2" not in record.describe()
    assert str(tmp_path.resolve() / "fleet.json") in record.describe()


def test_owner_alive_tells_this_process_from_an_exited_or_reused_pid(tmp_path: Path) -> None:
    # This process is alive, with the start time recorded
    assert process_alive(os.getpid(), process_started(os.getpid()))
    # An exited process is not
    assert not process_alive(exited_pid(), None)
    # A pid whose start time differs is another process now (the pid was reused)
    started = process_started(os.getpid())
    if started is not None:  # Linux
        assert not process_alive(os.getpid(), started + 1)


def test_a_killed_owner_waiting_to_be_reaped_is_dead() -> None:
    # Given a child killed but not yet reaped (a zombie: the pid still exists)
    proc = subprocess.Popen(["sleep", "60"])
    started = process_started(proc.pid)
    proc.kill()
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, left unreaped
        # Then it is not alive
        assert not process_alive(proc.pid, started)
    finally:
        proc.wait()


def test_recorded_removes_its_record_but_not_a_newer_one(tmp_path: Path) -> None:
    # Given a fleet's record for the duration of a block
    with recorded(URL, None, tmp_path, "up") as record:
        assert read_record(tmp_path) == record
    # Then it is gone after the block
    assert read_record(tmp_path) is None

    # And removing an old record leaves another fleet's newer record in place
    newer = FleetRecord.for_this_process(URL, None, tmp_path, "demo")
    write_record(newer)
    assert not remove_record(record)
    assert read_record(tmp_path) == newer


def test_an_unreadable_record_is_removed(tmp_path: Path) -> None:
    record_path(tmp_path).write_text("{ half a rec")
    assert read_record(tmp_path) is None
    assert not record_path(tmp_path).exists()


# --- which Redis and catalog a command uses ------------------------------------------------------


def env_for(home: Path, **extra: str) -> dict[str, str]:
    return {"ICEFLEET_HOME": str(home), **extra}


def test_the_variable_wins_over_a_record(tmp_path: Path) -> None:
    write_record(FleetRecord.for_this_process(URL, "prod", tmp_path, "up"))
    context = load_context(env=env_for(tmp_path, ICEFLEET_REDIS_URL="redis://127.0.0.1:7000/1"))
    assert context.settings.redis_url == "redis://127.0.0.1:7000/1"
    assert context.redis_from == FROM_ENV
    assert context.settings.catalog_name is None  # the record is not used at all


def test_a_live_record_gives_redis_and_catalog(tmp_path: Path) -> None:
    # Given a record whose owner (this process) is alive
    record = FleetRecord.for_this_process(URL, "prod", tmp_path, "up")
    write_record(record)

    # When a command loads its settings with nothing configured
    context = load_context(env=env_for(tmp_path))

    # Then the record's Redis and catalog are used, and status can say so without the password
    assert context.settings.redis_url == URL
    assert context.settings.catalog_name == "prod"
    assert context.record == record
    assert "hunter2" not in json.dumps(context.status())
    assert str(record.path) in context.status()["redis_from"]

    # And ICEFLEET_CATALOG still chooses the catalog when set
    chosen = load_context(env=env_for(tmp_path, ICEFLEET_CATALOG="other"))
    assert chosen.settings.catalog_name == "other"
    assert chosen.catalog_from == "from ICEFLEET_CATALOG"


def test_a_dead_owners_record_is_removed_and_redis_commands_refuse_the_default(
    tmp_path: Path,
) -> None:
    # Given a record left by a fleet whose process has exited
    dead = FleetRecord(URL, None, str(tmp_path.resolve()), exited_pid(), None, "up", 1)
    write_record(dead)

    # When a command that needs Redis loads its settings
    with pytest.raises(StaleFleetRecordError) as raised:
        load_context(env=env_for(tmp_path))

    # Then it refuses (no fallback to the default port), names the record, and removed it
    assert str(dead.path) in str(raised.value)
    assert "hunter2" not in str(raised.value)
    assert not dead.path.exists()

    # And a command that needs no Redis (query) proceeds on the defaults, removing it too
    write_record(dead)
    context = load_context(needs_redis=False, env=env_for(tmp_path))
    assert context.record is None
    assert not context.redis_configured
    assert not dead.path.exists()


def test_a_running_fleet_writes_its_record_again_when_it_was_removed(tmp_path: Path) -> None:
    # Given a fleet's record that a command removed (its Redis was restarting)
    record = FleetRecord.for_this_process(URL, None, tmp_path, "up")
    write_record(record)
    record.path.unlink()

    # When the fleet's supervision loop checks it
    keep_recorded(record)

    # Then it is back, the same
    assert read_record(tmp_path) == record
