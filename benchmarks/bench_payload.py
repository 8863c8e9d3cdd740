"""Write-task messages: packed (zstd, common/ingest/payloads.py) against plain NDJSON, in the same run.

For batches of the writer benchmark's events (1,000 and 10,000 ``order_placed`` events), each
variant publishes the task through :class:`~common.ingest.producer.KombuPublisher` into a real
``redis-server`` (Celery's JSON serialiser, kombu's Redis transport), then takes the message out
of the queue and decodes it the way a worker does: the transport's JSON envelope, its base64
body, Celery's JSON arguments, then ``unpack``. Reported per batch: the message's size in Redis,
the producer's publish time and the worker's decode time (medians), and the ratios.

Run: ``python -m benchmarks payload`` or ``python -m benchmarks.bench_payload --rounds 30``.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kombu.serialization import loads as kombu_loads

from benchmarks._shared import environment, median, now_iso, row, write_results
from benchmarks.bench_writer import order_events
from common.ingest.payloads import pack, unpack
from common.ingest.producer import KombuPublisher
from common.wire import WRITE_TASK
from tests.support.events import ndjson
from tests.support.services import redis_server

NAME = "payload"
QUEUE = "bench-payload"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_payload", description=__doc__)
    parser.add_argument("--sizes", default="1000,10000", help="events per batch, comma-separated")
    parser.add_argument("--rounds", type=int, default=15, help="messages per size and variant")
    parser.add_argument("--output", type=Path, default=None, help="JSON results file")
    return parser.parse_args(argv)


def kwargs_for(payload: str, packed: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"batch_id": "b", "table": None, "enqueued_at_ms": 1}
    if packed:
        kwargs["payload"], kwargs["encoding"] = pack(payload)
    else:
        kwargs["payload"] = payload
    return kwargs


def worker_decode(raw: bytes) -> str | bytes:
    """What a worker does with a message from the queue, up to the NDJSON text."""
    envelope = json.loads(raw)
    body = base64.b64decode(envelope["body"])
    props = envelope["properties"]
    _, kwargs, _ = kombu_loads(body, envelope["content-type"], props.get("body_encoding", "utf-8"))
    return unpack(kwargs["payload"], kwargs.get("encoding"))


def measure(url: str, payload: str, packed: bool, rounds: int) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    publisher = KombuPublisher(url)
    publish_ms, decode_ms, sizes = [], [], []
    try:
        for _ in range(rounds + 1):  # the first warms the connection, not counted
            started = time.perf_counter()
            publisher(WRITE_TASK, kwargs_for(payload, packed), QUEUE)
            published = time.perf_counter() - started
            raw = client.rpop(QUEUE)
            assert isinstance(raw, bytes)
            started = time.perf_counter()
            text = worker_decode(raw)
            decoded = time.perf_counter() - started
            got = text.decode() if isinstance(text, bytes) else text
            assert got == payload, "the worker must get the producer's payload"
            publish_ms.append(published * 1000)
            decode_ms.append(decoded * 1000)
            sizes.append(len(raw))
    finally:
        publisher.close()
        client.close()
    return {
        "message_bytes": median(sizes[1:]),
        "publish_ms_median": median(publish_ms[1:]),
        "decode_ms_median": median(decode_ms[1:]),
    }


def run(sizes: list[int], rounds: int) -> dict[str, Any]:
    by_size = []
    with (
        tempfile.TemporaryDirectory(prefix="icefleet-bench-payload-") as tmp,
        redis_server(Path(tmp) / "redis", appendonly=False) as url,
    ):
        for size in sizes:
            payload = ndjson(order_events(size, run_id=f"p{size}"))
            plain = measure(url, payload, packed=False, rounds=rounds)
            packed = measure(url, payload, packed=True, rounds=rounds)
            by_size.append(
                {
                    "events_per_batch": size,
                    "ndjson_bytes": len(payload.encode()),
                    "plain": plain,
                    "packed": packed,
                    "ratios": {
                        key: packed[key] / plain[key]
                        for key in ("message_bytes", "publish_ms_median", "decode_ms_median")
                    },
                }
            )
    return {"benchmark": NAME, "at": now_iso(), "sizes": by_size, "environment": environment()}


def report(result: dict[str, Any]) -> str:
    lines = ["write-task messages: packed (zstd) vs plain NDJSON, medians per batch"]
    for size in result["sizes"]:
        plain, packed, ratios = size["plain"], size["packed"], size["ratios"]
        lines += [
            f"  {size['events_per_batch']:,} events ({size['ndjson_bytes'] / 1e6:.2f} MB NDJSON):",
            row(
                "  message in Redis: plain -> packed",
                f"{plain['message_bytes'] / 1e3:8,.0f} kB -> {packed['message_bytes'] / 1e3:,.0f} kB"
                f"  ({ratios['message_bytes']:.2f}x)",
            ),
            row(
                "  producer publish: plain -> packed",
                f"{plain['publish_ms_median']:8.2f} ms -> {packed['publish_ms_median']:.2f} ms"
                f"  ({ratios['publish_ms_median']:.2f}x)",
            ),
            row(
                "  worker decode: plain -> packed",
                f"{plain['decode_ms_median']:8.2f} ms -> {packed['decode_ms_median']:.2f} ms"
                f"  ({ratios['decode_ms_median']:.2f}x)",
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    result = run([int(s) for s in args.sizes.split(",") if s], args.rounds)
    print(report(result))
    print(f"  results: {write_results(NAME, result, args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
