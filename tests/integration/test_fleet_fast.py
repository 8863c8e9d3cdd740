"""The fast local fleet: readiness is a ping every worker answered, a solo worker's warm shutdown
keeps the task in hand, and the demo still reads back what it wrote.

Real redis-server and real worker processes. Nothing here measures time: a worker that cannot
answer is made so (SIGSTOP), a batch is caught in the middle by waiting for its first files.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from common.ingest.producer import Producer
from common.settings import load_settings
from common.write.datafile_writer import file_stem
from common.write.partial import SplitRecords
from tests.support.events import expected_by_table, make_events
from tests.support.fleet import environment, fleet_config, restart, wait_idle
from tests.support.readback import assert_exactly_once, read_ids
from tests.support.services import wait_until
from tests.support.stack import make_stack
from workers.fleet import Fleet

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "workers.cli.main"]
BIG = 30_000  # written in chunks of 50: hundreds of chunks, a batch the signal finds mid-way


def test_wait_ready_waits_until_every_worker_answers_a_ping(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a fleet (one writer, a committer) whose writer is frozen, so it cannot answer
    env, settings = fleet_config(monkeypatch, redis_url, tmp_path / "home")
    with environment(env):
        fleet = Fleet(settings, writers=1, spawn_redis=False, pool="solo")
        frozen: int | None = None
        try:
            fleet.start()
            frozen = fleet.process("writer1").pid
            assert frozen is not None
            os.kill(frozen, signal.SIGSTOP)

            # When the fleet waits for its workers, Then it does not return: the writer is
            # missing from its answers however long the wait
            with pytest.raises(TimeoutError, match="writer1"):
                fleet.wait_ready(timeout_s=3)
            assert "writer1" not in fleet.ready_after_s

            # When the writer runs again, Then the wait returns once it answered, and records
            # when each worker first did
            os.kill(frozen, signal.SIGCONT)
            fleet.wait_ready(timeout_s=90)
            assert set(fleet.ready_after_s) == {"writer1", "committer"}
        finally:
            if frozen is not None:
                os.kill(frozen, signal.SIGCONT)
            fleet.stop()
    assert all(proc.returncode is not None for proc in fleet.processes)


def test_warm_shutdown_of_a_solo_writer_keeps_the_batch_in_hand(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a solo-pool writer (as `icefleet demo` runs it) in the middle of a big batch
    home = tmp_path / "home"
    env, settings = fleet_config(monkeypatch, redis_url, home, ICEFLEET_BATCH_MAX_EVENTS="100")
    producer_settings = load_settings(
        {}, redis_url=redis_url, home=home, batch_max_events=BIG, batch_max_bytes=2**28
    )
    big = make_events("big", BIG, types=("com.example.order", "com.example.refund"), days=2)
    with environment(env):
        fleet = Fleet(settings, writers=1, spawn_redis=False, pool="solo")
        try:
            fleet.start()
            fleet.wait_ready(timeout_s=90)
            writer = fleet.process("writer1")
            with Producer(producer_settings) as producer:
                producer.enqueue(big, batch_id="big")
                stem = file_stem("big")
                wait_until(
                    lambda: len(list(home.rglob(f"{stem}-*.parquet"))) >= 2, 60, "big's chunks"
                )

                # When the writer gets SIGTERM (Celery's warm shutdown)
                writer.terminate()
                assert writer.wait(60), "the writer did not stop within 60s"

                # Then it exits cleanly, having finished its task by handing the rest back
                assert writer.returncode == 0, writer.tail()
                # a split at a point, not the record of a batch written whole (common/write/partial.py)
                assert SplitRecords(redis_client, 1).get("big") is not None, writer.tail()

                # ... and once a writer runs again, every event lands exactly once
                restart(fleet, writer)
                wait_idle(redis_client, timeout_s=180)
        finally:
            fleet.stop()
    stack = make_stack(redis_url, home)
    try:
        for name, ids in expected_by_table(stack.settings, big).items():
            assert_exactly_once(read_ids(stack.table(name)), ids, name)
    finally:
        stack.close()


def test_demo_reads_back_every_event_and_times_its_phases(tmp_path: Path) -> None:
    # Given nothing configured but a home of its own
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEFLEET_", "PYICEBERG_"))}
    env["ICEFLEET_HOME"] = str(home)

    # When the demo runs with --timings (its workers forked from the CLI process)
    result = subprocess.run(
        [*CLI, "demo", "--events", "500", "--batch-size", "200", "--timings"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )

    # Then it read every event back exactly once, and names each phase with its duration
    assert result.returncode == 0, result.stdout + result.stderr
    assert "500 events committed" in result.stdout
    assert "read back 500 rows: every event exactly once" in result.stdout
    timings = next(line for line in result.stderr.splitlines() if line.startswith("timings:"))
    for phase in ("start", "ready", "send", "write + commit", "verify", "stop", "total"):
        assert f"{phase} " in timings, timings
    # ... every worker got ready and stopped with Celery's warm shutdown
    for name in ("writer1", "writer2", "committer"):
        log = (home / "logs" / f"{name}.log").read_text()
        assert f"{name}@" in log and "ready." in log, log
        assert "Warm shutdown" in log, log
