"""A long chaos run: N rounds of batches through a real fleet while everything around it fails.

One fleet (two writers, a committer) for the whole run, on a Redis of its own (AOF on), a
PostgreSQL catalog behind a TCP proxy (the embedded SQLite catalog when PostgreSQL is not
reachable) and an S3 warehouse on moto behind a proxy that answers ``503 SlowDown`` to a share of
the requests. Each round sends batches while killing writers' pool processes, whole writers and
the committer at random (``kill -9``), and halfway through restarts Redis or cuts the catalog off
for a few seconds (alternately). After each round every event sent so far must be in its table
exactly once (pyiceberg); after the last, iceberg-rust must read the same.

    python -m benchmarks chaos                     # 3 rounds
    python -m benchmarks.bench_chaos --rounds 20   # the long run

Prints, per round and in total: events sent, faults injected (kills and the rest), rows read
back. Exits non-zero if any event is missing or duplicated.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis

from tests.support.chaos import ChaosReport, chaos_round
from tests.support.events import expected_by_table
from tests.support.faults import SlowDownProxy, TcpProxy
from tests.support.fleet import environment, fleet_env, redeliver_unacked, running_fleet, supervised
from tests.support.readback import assert_exactly_once, read_ids, rust_ids
from tests.support.services import (
    DEFAULT_POSTGRES_URL,
    POSTGRES_URL_ENV,
    RedisProcess,
    fresh_postgres_database,
    moto_s3_server,
    s3_test_bucket,
)
from tests.support.stack import make_stack

CATALOG = "chaosbench"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30, help="batches per round")
    parser.add_argument("--events", type=int, default=200, help="events per batch")
    parser.add_argument("--send-s", type=float, default=12.0, help="seconds of sending per round")
    parser.add_argument("--s3-fault-rate", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--json", type=Path, help="also write the totals here")
    parser.add_argument("--keep", type=Path, help="work in this directory and keep it (logs)")
    return parser.parse_args(argv)


@contextmanager
def postgres_catalog_url() -> Iterator[str | None]:
    """A fresh database's URL, or None when PostgreSQL is not reachable here."""
    import os

    import sqlalchemy as sa

    url = os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        print(f"PostgreSQL not reachable ({type(exc).__name__}); SQLite catalog, no outages")
        yield None
        return
    with fresh_postgres_database(url) as fresh:
        yield fresh


def check_round(redis_url: str, home: Path, sent: list[dict[str, Any]], what: str) -> int:
    """Every event sent so far exactly once (pyiceberg), no dead letters; return the rows read."""
    from common.coord.deadletters import DeadLetterStore

    checker = make_stack(redis_url, home, catalog=CATALOG)
    try:
        dead = DeadLetterStore(checker.client).list(5)
        assert not dead, f"{what}: dead letters {[(d.batch_id, d.reason) for d in dead]}"
        rows = 0
        for name, ids in expected_by_table(checker.settings, sent).items():
            found = read_ids(checker.table(name))
            assert_exactly_once(found, ids, f"{what}: {name}")
            rows += len(found)
        return rows
    finally:
        checker.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rng = random.Random(args.seed)
    total = ChaosReport()
    sent: list[dict[str, Any]] = []
    with ExitStack() as stack:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            work = args.keep.resolve()
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="icefleet-chaos-")))
        home = work / "home"
        server = stack.enter_context(RedisProcess(work / "redis"))
        client = redis.Redis.from_url(server.url)
        endpoint = stack.enter_context(moto_s3_server())
        bucket = stack.enter_context(s3_test_bucket(endpoint))
        throttle = stack.enter_context(
            SlowDownProxy(endpoint.endpoint_url, args.s3_fault_rate, args.seed)
        )
        pg_url = stack.enter_context(postgres_catalog_url())
        s3 = endpoint.fileio_properties()
        prefix = f"PYICEBERG_CATALOG__{CATALOG.upper()}__"
        env = fleet_env(
            ICEFLEET_REDIS_URL=server.url,
            ICEFLEET_HOME=str(home),
            ICEFLEET_CATALOG=CATALOG,
            **{
                prefix + "TYPE": "sql",
                prefix + "WAREHOUSE": bucket,
                prefix + "S3__ENDPOINT": throttle.endpoint_url,
                prefix + "S3__ACCESS_KEY_ID": s3["s3.access-key-id"],
                prefix + "S3__SECRET_ACCESS_KEY": s3["s3.secret-access-key"],
                prefix + "S3__REGION": s3["s3.region"],
            },
        )
        proxy: TcpProxy | None = None
        if pg_url is None:
            env[prefix + "URI"] = f"sqlite:///{work / 'catalog.db'}"
        else:
            import sqlalchemy as sa

            upstream = sa.make_url(pg_url)
            proxy = TcpProxy(upstream.host or "127.0.0.1", upstream.port or 5432).start()
            stack.callback(proxy.stop)
            through = upstream.set(host="127.0.0.1", port=proxy.port)
            env[prefix + "URI"] = through.render_as_string(hide_password=False)

        def restart_redis(report: ChaosReport) -> None:
            stopped_at = time.time()
            server.stop()
            time.sleep(2.0)
            server.start()
            report.faults["redis-restart"] += 1
            time.sleep(3.0)  # then fast-forward the visibility timeout of what was in flight
            report.faults["redelivered"] += redeliver_unacked(client, before=stopped_at)

        def cut_catalog(report: ChaosReport) -> None:
            assert proxy is not None
            proxy.cut()
            time.sleep(5.0)
            proxy.restore()
            report.faults["catalog-outage"] += 1

        extras = [restart_redis] + ([cut_catalog] if proxy is not None else [])
        stack.enter_context(environment(env))
        from common.settings import load_settings

        fleet = stack.enter_context(running_fleet(load_settings()))
        restarted = stack.enter_context(supervised(fleet))
        started = time.monotonic()
        for n in range(args.rounds):
            events, report = chaos_round(
                fleet,
                client,
                rng,
                prefix=f"r{n:02d}",
                batches=args.batches,
                per_batch=args.events,
                send_s=args.send_s,
                min_faults=3,
                extra=extras[n % len(extras)],
            )
            sent.extend(events)
            throttle_faults = throttle.stats.faults
            report.faults["s3-503"] = throttle_faults - total.faults["s3-503"]
            # read back with the throttling off (a whole-table scan is hundreds of requests)
            rate, throttle.fault_rate = throttle.fault_rate, 0.0
            try:
                report.rows_read = check_round(server.url, home, sent, f"round {n + 1}")
            finally:
                throttle.fault_rate = rate
            rows_now, report.rows_read = report.rows_read, 0
            total.add(report)
            total.rows_read = rows_now
            print(
                f"round {n + 1:>2}/{args.rounds}: {report.describe()}; "
                f"{rows_now:,} rows in the tables, each event sent so far once",
                flush=True,
            )
        throttle.fault_rate = 0.0
        checker = make_stack(server.url, home, catalog=CATALOG)
        try:
            file_io = {**s3, "s3.path-style-access": "true"}
            for name, ids in expected_by_table(checker.settings, sent).items():
                assert_exactly_once(rust_ids(checker.table(name), file_io), ids, f"{name} (rust)")
        finally:
            checker.close()
        total.faults.update(f"{name}-restarted-by-supervisor" for name in restarted)
        total.seconds = time.monotonic() - started
        kills = sum(total.faults[k] for k in ("writer-child", "writer", "committer"))
        print(
            f"\nTOTAL: {total.events_sent:,} events sent in {total.batches_sent} batches; "
            f"{kills} kills (kill -9); faults {dict(sorted(total.faults.items()))}; "
            f"{total.rows_read:,} rows read back (pyiceberg; iceberg-rust agrees), "
            f"each event exactly once; {total.seconds:.0f}s"
        )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "rounds": args.rounds,
                        "events_sent": total.events_sent,
                        "batches_sent": total.batches_sent,
                        "kills": kills,
                        "faults": dict(total.faults),
                        "rows_read": total.rows_read,
                        "seconds": round(total.seconds),
                        "catalog": "postgresql" if proxy is not None else "sqlite",
                    },
                    indent=2,
                )
            )
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
