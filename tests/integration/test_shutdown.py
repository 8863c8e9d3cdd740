"""Graceful shutdown: SIGTERM a writer in the middle of a batch and the committer in the middle of
a commit; after a restart everything lands exactly once.

A writer asked to stop (Celery's warm shutdown) finishes the chunk it is writing, registers what
it wrote and hands the rest of the batch back as a child batch, so it exits in about a chunk's
time however large the batch. The committer finishes its commit (or leaves a prepared record that
its successor resolves).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from common.coord import keys
from common.ingest.producer import Producer
from common.settings import load_settings
from common.write.datafile_writer import file_stem
from common.write.partial import SplitRecords
from tests.support.events import expected_by_table, make_events
from tests.support.fleet import environment, fleet_config, restart, running_fleet, wait_idle
from tests.support.readback import assert_exactly_once, commit_seqs, read_ids
from tests.support.services import wait_until
from tests.support.stack import make_stack

pytestmark = pytest.mark.integration

BIG = 60_000  # written in chunks of 50: 1,200 chunks, several seconds of work


def test_sigterm_mid_batch_and_mid_commit_loses_and_duplicates_nothing(
    redis_client: redis.Redis, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given one writer (chunks of 50 events) and a committer
    home = tmp_path / "home"
    env, settings = fleet_config(monkeypatch, redis_url, home, ICEFLEET_BATCH_MAX_EVENTS="100")
    producer_settings = load_settings(
        {},
        redis_url=redis_url,
        home=home,
        batch_max_events=BIG,
        batch_max_bytes=2**28,  # one batch, not split by the producer
        commit_max_bytes=2**28,
    )
    big = make_events("big", BIG, types=("com.example.order", "com.example.refund"), days=2)
    small = [make_events(f"small{n}", 100) for n in range(30)]

    with environment(env), running_fleet(settings, writers=1) as fleet:
        writer, committer = fleet.process("writer1"), fleet.process("committer")
        with Producer(producer_settings) as producer:
            # When a big batch is being written, then more batches wait behind it
            producer.enqueue(big, batch_id="big")
            wait_until(lambda: redis_client.hexists(keys.deliveries(), "big"), 60, "big to start")
            for n, batch in enumerate(small):
                producer.enqueue(batch, batch_id=f"small{n}")
            # ... until its first chunks are on disk (the signal must find it mid-batch)
            stem = file_stem("big")
            wait_until(
                lambda: len(list(home.rglob(f"{stem}-*.parquet"))) >= 2, 60, "big's first chunks"
            )
            sent_at = time.monotonic()

            # ... and the writer gets SIGTERM
            stopped_at = time.monotonic()
            writer.signal(signal.SIGTERM)
            assert writer.wait(30), "the writer did not stop within 30s"
            stop_s = time.monotonic() - stopped_at

            # Then it exits cleanly at once, having handed the rest of its batch back
            assert writer.returncode == 0, writer.tail()
            # a split at a point, not the record of a batch written whole (common/write/partial.py)
            assert SplitRecords(redis_client, 1).get("big") is not None, writer.tail()
            assert "Warm shutdown" in writer.tail(200) or "warm shutdown" in writer.tail(200)

            # When the writer runs again (more batches keep coming) and the committer gets
            # SIGTERM in the middle of a commit
            writer.restarts += 1
            writer.start()
            prepared = keys.prepared("*")
            deadline = time.monotonic() + 120
            while not redis_client.keys(prepared):
                assert time.monotonic() < deadline, "no commit seen in 120s"
                if len(small) < 200 and time.monotonic() > sent_at + 0.3:
                    more = make_events(f"small{len(small)}", 100)
                    producer.enqueue(more, batch_id=f"small{len(small)}")
                    small.append(more)
                    sent_at = time.monotonic()
                time.sleep(0.002)
            committer.signal(signal.SIGTERM)
            assert committer.wait(30), "the committer did not stop within 30s"

            # Then it exits cleanly too; and once it is back, everything lands exactly once
            assert committer.returncode == 0, committer.tail()
            restart(fleet, committer)
            wait_idle(redis_client, timeout_s=180)
        print(f"writer stopped {stop_s:.1f}s after SIGTERM")
    everything = big + [e for batch in small for e in batch]

    stack = make_stack(redis_url, home)
    try:
        for name, ids in expected_by_table(stack.settings, everything).items():
            table = stack.table(name)
            assert_exactly_once(read_ids(table), ids, name)
            seqs = commit_seqs(table)
            assert seqs == sorted(set(seqs)), seqs  # one snapshot per commit seq, in order
        batches = set(read_ids(stack.table("events.order"), "_batch_id"))
        assert any(b.startswith("big~") for b in batches), batches
    finally:
        stack.close()
