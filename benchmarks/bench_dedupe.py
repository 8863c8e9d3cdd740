"""Redis memory per remembered event identity, and the claim script's speed (issue 13).

A real ``redis-server`` (no persistence). ``--ids`` distinct event identities are claimed for one
table through :class:`common.coord.claims.EventClaims`, in batches of ``--batch`` as a writer does
(one Lua call per batch); ``used_memory`` is read before and after. Baseline, same run, same
server: the same identities as members of a plain Redis set (``SADD`` of the 16-byte digests),
the least a set of ids can cost in Redis; the ratio is printed. Then every batch is claimed again
by another batch (all duplicates: the lookups a repeat costs) and the claim rate of both passes is
printed beside the rate of plain ``HSET`` of the same fields and values.

Run: ``python -m benchmarks dedupe`` or ``python -m benchmarks.bench_dedupe --ids 1000000``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from benchmarks._shared import environment, now_iso, row, write_results
from common.coord.claims import BUCKETS, EventClaims, claim_batch
from common.wire import claim_keys, owner_digest
from tests.support.services import redis_server

NAME = "dedupe"
TABLE = "events.bench"
WINDOW_S = 7 * 24 * 3600


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_dedupe", description=__doc__)
    parser.add_argument("--ids", type=int, default=1_000_000, help="identities remembered")
    parser.add_argument("--batch", type=int, default=10_000, help="identities per claim call")
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


def rows(start: int, count: int) -> list[tuple[int, str, str, str]]:
    raw = '{"specversion":"1.0","id":"%d","source":"/bench","type":"bench"}'
    return [(n, "/bench", f"id-{start + n}", raw % (start + n)) for n in range(count)]


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def run(ids: int, batch: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="icefleet-bench-dedupe-") as tmp,
        redis_server(Path(tmp) / "redis", appendonly=False) as url,
    ):
        client = redis.Redis.from_url(url)
        claims = EventClaims(client)
        starts = range(0, ids, batch)
        before = used(client)
        started = time.perf_counter()
        for start in starts:
            claim_batch(
                claims, f"b{start}", {TABLE: rows(start, min(batch, ids - start))}, WINDOW_S
            )
        first_s = time.perf_counter() - started
        claimed = used(client) - before
        keys = client.keys("icefleet:claims:*")
        entries = sum(int(client.hlen(k)) for k in keys)

        started = time.perf_counter()
        repeats = 0
        for start in starts:
            verdicts = claim_batch(
                claims, f"again{start}", {TABLE: rows(start, min(batch, ids - start))}, WINDOW_S
            )
            repeats += len(verdicts.skip)
        repeat_s = time.perf_counter() - started

        owner = owner_digest("plain")
        before = used(client)
        started = time.perf_counter()
        for start in starts:
            identities, values = claim_keys(owner, 0, rows(start, batch))
            pipe = client.pipeline(transaction=False)
            pipe.sadd("plain:set", *identities)
            pipe.hset("plain:hash", mapping=dict(zip(identities, values, strict=True)))
            pipe.execute()
        hset_s = time.perf_counter() - started
        both = used(client) - before
        client.delete("plain:hash")
        plain_set = used(client) - before
        client.close()
    return {
        "benchmark": NAME,
        "at": now_iso(),
        "ids": ids,
        "batch": batch,
        "buckets_per_window": BUCKETS,
        "claim_entries": entries,
        "claims_bytes": claimed,
        "claims_bytes_per_id": claimed / ids,
        "plain_set_bytes_per_id": plain_set / ids,
        "plain_set_and_hash_bytes_per_id": both / ids,
        "ratio_claims_vs_plain_set": claimed / plain_set,
        "claims_per_s_first": ids / first_s,
        "claims_per_s_repeats": ids / repeat_s,
        "repeats_found": repeats,
        "plain_sadd_hset_per_s": ids / hset_s,
        "environment": environment(catalog="none (Redis only)"),
    }


def report(result: dict[str, Any]) -> str:
    ids = result["ids"]
    per_million = result["claims_bytes_per_id"] * 1e6 / 2**20
    return "\n".join(
        [
            f"dedupe claims in Redis: {ids:,} identities of one table, claimed "
            f"{result['batch']:,} per call",
            row(
                "  Redis memory per remembered id",
                f"{result['claims_bytes_per_id']:9.1f} B  ({per_million:.0f} MiB per million ids; "
                f"held 1 to {1 + 1 / result['buckets_per_window']:.2f} windows)",
            ),
            row(
                "  plain Redis set of the 16-byte ids (baseline)",
                f"{result['plain_set_bytes_per_id']:9.1f} B",
            ),
            row("  claims / plain set", f"{result['ratio_claims_vs_plain_set']:9.2f}x"),
            row("  claim rate, new ids", f"{result['claims_per_s_first']:>10,.0f} ids/s"),
            row(
                "  claim rate, all repeats",
                f"{result['claims_per_s_repeats']:>10,.0f} ids/s"
                f"  ({result['repeats_found']:,} found)",
            ),
            row(
                "  plain SADD + HSET, pipelined (baseline)",
                f"{result['plain_sadd_hset_per_s']:>10,.0f} ids/s",
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    result = run(args.ids, args.batch)
    print(report(result))
    print(f"  results: {write_results(NAME, result, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
