"""Write-task messages as a writer receives them (common/ingest/payloads.py): packed by the producer,
plain NDJSON from producers that do not pack, and payloads that do not decode. The writer and
committer tasks run in this process on a real Redis and the SQLite catalog."""

from __future__ import annotations

import base64

import pyarrow.compute as pc
import pytest
import redis

from common.coord import keys
from common.coord.deadletters import DeadLetterStore
from common.ingest.events import encode_ndjson
from common.ingest.payloads import ZSTD, pack
from workers.runtime import Runtime
from workers.tasks.commit import commit_table
from workers.tasks.write import write_batch

pytestmark = pytest.mark.integration
TABLE = "events.order"


def events(prefix: str, count: int) -> str:
    return encode_ndjson(
        {
            "specversion": "1.0",
            "id": f"{prefix}-{i}",
            "source": "/test",
            "type": "com.example.order",
            "time": "2024-05-01T12:00:00Z",
            "data": {"n": i, "note": "é" * (i % 3)},
        }
        for i in range(count)
    )


def ids_in_table(rt: Runtime) -> list[str]:
    table = rt.catalog.load_table(TABLE)
    return sorted(table.scan(selected_fields=("id",)).to_arrow().column("id").to_pylist())


def test_packed_and_plain_payloads_land_exactly_once(rt: Runtime) -> None:
    # Given one batch packed as the producer sends it, and one plain as another producer may
    packed, encoding = pack(events("z", 300))
    plain = events("p", 200)
    # When a writer takes both (the packed one twice: a redelivery) and the committer commits
    for kwargs in (
        {"batch_id": "packed", "payload": packed, "encoding": encoding},
        {"batch_id": "packed", "payload": packed, "encoding": encoding},
        {"batch_id": "plain", "payload": plain},
    ):
        write_batch.apply(kwargs={**kwargs, "table": TABLE, "enqueued_at_ms": 1}).get()
    commit_table.apply(args=[TABLE]).get()
    # Then every event is in the table once, read back from the table
    assert ids_in_table(rt) == sorted(
        [f"z-{i}" for i in range(300)] + [f"p-{i}" for i in range(200)]
    )
    table = rt.catalog.load_table(TABLE).scan().to_arrow()
    assert pc.max(table.column("n")).as_py() == 299


def test_a_payload_that_does_not_decode_is_dead_lettered_as_it_came(
    rt: Runtime, redis_client: redis.Redis
) -> None:
    # Given a message whose payload claims zstd but was cut short on the way
    packed, _ = pack(events("t", 100))
    broken = base64.b64encode(base64.b64decode(packed)[:-10]).decode()
    redis_client.zadd(keys.outstanding(), {"broken": 1})
    # When a writer takes it
    result = write_batch.apply(
        kwargs={"batch_id": "broken", "payload": broken, "encoding": ZSTD, "table": TABLE}
    ).get()
    # Then the whole message is in the dead-letter store with the reason, byte for byte, and the
    # batch no longer counts as outstanding (nothing waits for it forever)
    assert "truncated" in result["dead_lettered"]
    [letter] = DeadLetterStore(redis_client).list()
    assert letter.batch_id == "broken" and "zstd payload is truncated" in letter.reason
    assert letter.raw == broken.encode()
    assert redis_client.zscore(keys.outstanding(), "broken") is None
