"""Chaos with real processes: every event lands exactly once whatever is killed or cut off.

Each test runs a real fleet (two writer processes and a committer, ``icefleet worker``
subprocesses), feeds it batches from a thread that resends a batch until its enqueue succeeds, and
meanwhile:

- kills writers' pool processes in the middle of a batch (``kill -9``; the message goes back to
  the queue at once through ``task_reject_on_worker_lost``), whole writers (their message comes back
  once its visibility timeout passes, which the test fast-forwards) and the committer (whole, at
  random points, preferably while a commit is prepared or under way), restarting what it killed;
- sends the same events in two batches at once (each batch repeats 100 events of the one before)
  while writers are killed mid-batch: each (source, id) lands once (common/coord/claims.py);
- restarts Redis in the middle of the run (clean stop, AOF on, same port): workers reconnect;
- puts S3 behind a proxy that answers ``503 SlowDown`` to one request in five;
- cuts the PostgreSQL catalog off for a few seconds (a TCP proxy that resets and refuses).

Then everything must be committed, and every event read back once, with pyiceberg (and with
iceberg-rust in the first test), with no dead letters and one snapshot per commit seq. Each test
takes 20 to 45 seconds here; the suite stays well under three minutes.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis

from tests.support.catalogs import postgres_backend, s3_backend
from tests.support.chaos import ChaosReport, chaos_round, verify_tables
from tests.support.faults import SlowDownProxy, TcpProxy
from tests.support.fleet import (
    environment,
    fleet_env,
    redeliver_unacked,
    running_fleet,
    settings_for,
    supervised,
)
from tests.support.services import RedisProcess, S3Endpoint
from tests.support.stack import make_stack

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ICEFLEET_CATALOG", raising=False)


def report(name: str, outcome: ChaosReport) -> None:
    print(f"\n{name}: {outcome.describe()}")


def test_writers_and_committer_killed_at_random(
    clean_env: None, redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # Given a fleet on the embedded SQLite catalog and a local warehouse
    env = fleet_env(ICEFLEET_REDIS_URL=redis_url, ICEFLEET_HOME=str(tmp_path / "home"))
    rng = random.Random(20261126)
    with environment(env), running_fleet(settings_for(env)) as fleet:
        # When 6,000 events arrive while writers and the committer are killed at random
        events, outcome = chaos_round(
            fleet, redis_client, rng, prefix="kill", send_s=10, min_faults=8
        )
    # Then each event is in its table once, as pyiceberg and iceberg-rust read it
    stack = make_stack(redis_url, tmp_path / "home")
    try:
        verify_tables(stack, events, outcome, rust_file_io={})
    finally:
        stack.close()
    assert all(outcome.faults[kind] for kind in ("writer-child", "writer", "committer")), outcome
    assert sum(outcome.faults.values()) >= 8, outcome.describe()
    report("kill -9", outcome)


def test_duplicate_events_in_flight_while_writers_are_killed(
    clean_env: None, redis_client: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    # Given a fleet, and batches each carrying 100 events of the batch before it (same bytes,
    # another batch id: the same event in two batches enqueued concurrently)
    env = fleet_env(ICEFLEET_REDIS_URL=redis_url, ICEFLEET_HOME=str(tmp_path / "home"))
    rng = random.Random(1313)
    with environment(env), running_fleet(settings_for(env)) as fleet:
        # When they are written while writers are killed mid-batch
        events, outcome = chaos_round(
            fleet,
            redis_client,
            rng,
            prefix="dup",
            batches=20,
            send_s=8,
            faults=("writer-child", "writer"),
            min_faults=4,
            repeats=100,
        )
    # Then each (source, id) is in its table once (pyiceberg and iceberg-rust), no dead letters
    stack = make_stack(redis_url, tmp_path / "home")
    try:
        verify_tables(stack, events, outcome, rust_file_io={})
        # And exactly one copy of each repeated event was counted as a duplicate
        dropped = sum(d for d, _ in stack.registry.duplicates().values())
        conflicting = sum(c for _, c in stack.registry.duplicates().values())
    finally:
        stack.close()
    assert (dropped, conflicting) == (19 * 100, 0)
    assert len({e["id"] for e in events}) == len(events) - 19 * 100
    assert outcome.faults["writer-child"] + outcome.faults["writer"] >= 4, outcome.describe()
    report("duplicates in flight", outcome)


def test_redis_restarted_mid_run(
    clean_env: None, redis_process: RedisProcess, tmp_path: Path
) -> None:
    # Given a fleet on a Redis of its own (AOF on) that the test may restart on the same port
    env = fleet_env(ICEFLEET_REDIS_URL=redis_process.url, ICEFLEET_HOME=str(tmp_path / "home"))
    client = redis.Redis.from_url(redis_process.url)
    rng = random.Random(7)

    def restart_redis(outcome: ChaosReport) -> None:
        stopped_at = time.time()
        redis_process.stop()  # SIGTERM: Redis flushes its AOF and exits
        time.sleep(2.0)
        redis_process.start()
        outcome.faults["redis-restart"] += 1
        # Messages that were running when Redis went away come back after the visibility
        # timeout (at least 62 s); fast-forward that for the ones delivered before the stop.
        time.sleep(3.0)
        outcome.faults["redelivered"] += redeliver_unacked(client, before=stopped_at)

    with (
        environment(env),
        running_fleet(settings_for(env)) as fleet,
        supervised(fleet) as restarted,
    ):
        # When Redis is restarted while batches are being sent, written and committed
        events, outcome = chaos_round(
            fleet, client, rng, prefix="redis", send_s=12, faults=(), extra=restart_redis
        )
        outcome.faults.update(f"{name}-restarted" for name in restarted)
    # Then the writers reconnected by themselves (a committer holding scheduled commit tasks may
    # exit in Celery's reconnect and be restarted by the supervisor), and every event landed once
    stack = make_stack(redis_process.url, tmp_path / "home")
    try:
        verify_tables(stack, events, outcome)
    finally:
        stack.close()
        client.close()
    assert not any(name.startswith("writer") for name in restarted), restarted
    assert outcome.faults["redis-restart"] == 1
    report("redis restart", outcome)


@pytest.fixture
def throttled_s3(s3_endpoint: S3Endpoint) -> Iterator[SlowDownProxy]:
    with SlowDownProxy(s3_endpoint.endpoint_url, fault_rate=0.2, seed=11) as proxy:
        yield proxy


def test_s3_answers_slow_down_to_one_request_in_five(
    clean_env: None,
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    s3_endpoint: S3Endpoint,
    s3_bucket: str,
    throttled_s3: SlowDownProxy,
) -> None:
    # Given a warehouse on S3 reached through a proxy that throttles 20% of the requests
    proxied = replace(s3_endpoint, endpoint_url=throttled_s3.endpoint_url)
    s3 = s3_backend(proxied, s3_bucket, tmp_path / "catalog.db", name="chaoss3")
    env = fleet_env(ICEFLEET_REDIS_URL=redis_url, ICEFLEET_HOME=str(tmp_path / "home"), **s3.env)
    rng = random.Random(3)
    with environment(env), running_fleet(settings_for(env)) as fleet:
        # When batches are written and committed, with a writer killed now and then too
        events, outcome = chaos_round(
            fleet,
            redis_client,
            rng,
            prefix="s3",
            batches=20,
            send_s=10,
            faults=("writer-child",),
        )
        outcome.faults["s3-503"] = throttled_s3.stats.faults
        requests = throttled_s3.stats.requests
        # Then every event is there once (read with the throttling off, as a check)
        throttled_s3.fault_rate = 0.0
        stack = make_stack(redis_url, tmp_path / "home", catalog=s3.catalog_name)
        try:
            verify_tables(stack, events, outcome)
        finally:
            stack.close()
    assert outcome.faults["s3-503"] >= 0.1 * requests > 10, (outcome.faults, requests)
    report("S3 503 SlowDown", outcome)


def test_catalog_database_unreachable_for_a_while(
    clean_env: None,
    redis_client: redis.Redis,
    redis_url: str,
    tmp_path: Path,
    postgres_catalog_url: str,
) -> None:
    import sqlalchemy as sa

    # Given a PostgreSQL catalog reached through a TCP proxy the test can cut
    upstream = sa.make_url(postgres_catalog_url)
    proxy = TcpProxy(upstream.host or "127.0.0.1", upstream.port or 5432).start()
    through_proxy = upstream.set(host="127.0.0.1", port=proxy.port)
    pg = postgres_backend(
        through_proxy.render_as_string(hide_password=False), tmp_path / "warehouse", name="chaospg"
    )
    env = fleet_env(ICEFLEET_REDIS_URL=redis_url, ICEFLEET_HOME=str(tmp_path / "home"), **pg.env)
    rng = random.Random(5)

    def outage(outcome: ChaosReport) -> None:
        proxy.cut()  # every catalog connection reset, new ones refused...
        time.sleep(6.0)
        proxy.restore()  # ...for six seconds
        outcome.faults["catalog-outage"] += 1

    try:
        with environment(env), running_fleet(settings_for(env)) as fleet:
            # When the catalog is unreachable for six seconds in the middle of the run
            events, outcome = chaos_round(
                fleet,
                redis_client,
                rng,
                prefix="pg",
                batches=24,
                send_s=12,
                faults=("committer",),
                extra=outage,
            )
            # Then once it is back, every event is committed exactly once
            stack = make_stack(redis_url, tmp_path / "home", catalog=pg.catalog_name)
            try:
                verify_tables(stack, events, outcome)
            finally:
                stack.close()
    finally:
        proxy.stop()
    assert outcome.faults["catalog-outage"] == 1
    report("catalog outage", outcome)
