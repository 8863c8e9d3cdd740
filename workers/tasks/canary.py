"""The canary: a probe event every few minutes, timed until a table scan shows it.

Beat runs :func:`canary_send` every ``ICEFLEET_CANARY_INTERVAL_S`` seconds (300 by default, 0
turns it off). It enqueues one probe event, like any producer, to the table ``icefleet.canary``
and schedules :func:`canary_check`, which loads the table and scans it for the probe's id; until
the probe is visible it schedules itself again every :data:`CHECK_EVERY_S`. The end-to-end time
(enqueue → written → committed → visible to a reader) then goes to the
``icefleet_canary_seconds`` histogram of the worker that saw it and, as JSON, to the Redis key
``icefleet:canary:last``, which the gateway's ``/metrics`` turns into ``icefleet_canary_ok``,
``icefleet_canary_last_seconds`` and ``icefleet_canary_last_timestamp_seconds``. A probe still
not visible after :func:`timeout_s` is recorded with ``"status": "timeout"``.

The measure is as fine as the polling: up to :data:`CHECK_EVERY_S` more than the true time. Both
tasks run on the ``ingest`` queue: a check is a read, and must not wait behind the committer's
work on ``commit``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from celery import Task, shared_task
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError

from common.coord import keys
from common.ingest.producer import Producer
from common.ingest.routing import TableName
from common.settings import Settings
from common.wire import CANARY_CHECK_TASK as CHECK_TASK
from common.wire import CANARY_TASK as SEND_TASK
from common.wire import INGEST_QUEUE
from workers.limits import CANARY_CHECK_COUNTDOWN_S as CHECK_EVERY_S
from workers.runtime import runtime

logger = logging.getLogger(__name__)

CANARY_TABLE = "icefleet.canary"
PROBE_TYPE = "io.icefleet.canary.probe"
PROBE_SOURCE = "/icefleet/canary"
MIN_TIMEOUT_S = 60.0
_PROBE_ID = re.compile(r"canary-[0-9a-f-]{36}")


@dataclass(frozen=True)
class Probe:
    """One probe on its way: its event id, when it was sent, when to give up."""

    probe_id: str
    sent_ms: int
    deadline_ms: int


def timeout_s(settings: Settings) -> float:
    """How long a probe may take before it counts as failed: the canary interval, at least a
    minute."""
    return max(MIN_TIMEOUT_S, settings.canary_interval_s)


def probe_event(probe_id: str, sent_ms: int) -> dict[str, Any]:
    sent = datetime.fromtimestamp(sent_ms / 1000, UTC)
    return {
        "specversion": "1.0",
        "id": probe_id,
        "source": PROBE_SOURCE,
        "type": PROBE_TYPE,
        "time": sent.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": {"sent_ms": sent_ms},
    }


def send_probe(settings: Settings, producer: Producer, now_ms: int | None = None) -> Probe:
    """Enqueue one probe event to :data:`CANARY_TABLE` (its id is its batch id too)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    probe_id = f"canary-{uuid.uuid4()}"
    producer.enqueue([probe_event(probe_id, now_ms)], table=CANARY_TABLE, batch_id=probe_id)
    probe = Probe(probe_id, now_ms, now_ms + int(timeout_s(settings) * 1000))
    logger.info("canary: probe %s sent", probe_id, extra={"batch_id": probe_id})
    return probe


def probe_visible(catalog: Catalog, probe: Probe) -> bool:
    """Whether a scan of the canary table, loaded afresh, returns the probe's row."""
    try:
        table = catalog.load_table(TableName.parse(CANARY_TABLE).parts)
    except NoSuchTableError:
        return False
    if table.current_snapshot() is None:
        return False
    if not _PROBE_ID.fullmatch(probe.probe_id):  # it goes into a filter expression
        raise ValueError(f"not a canary probe id: {probe.probe_id!r}")
    sent = datetime.fromtimestamp(probe.sent_ms / 1000, UTC).isoformat()
    # the time bound prunes every day partition but the probe's own
    condition = f"id = '{probe.probe_id}' AND time >= '{sent}'"
    rows = table.scan(row_filter=condition, selected_fields=("id",)).to_arrow()
    return rows.num_rows > 0


def record_result(client: redis.Redis, probe: Probe, status: str, now_ms: int) -> dict[str, Any]:
    """Store the outcome of a probe as ``icefleet:canary:last`` and return it."""
    result: dict[str, Any] = {
        **asdict(probe),
        "table": CANARY_TABLE,
        "status": status,
        "checked_ms": now_ms,
        "latency_s": (now_ms - probe.sent_ms) / 1000 if status == "ok" else None,
    }
    client.set(keys.canary_last(), orjson.dumps(result))
    return result


def check_probe(
    client: redis.Redis, catalog: Catalog, probe: Probe, now_ms: int | None = None
) -> dict[str, Any] | None:
    """The recorded result when the probe is visible or past its deadline; None to check again."""
    visible = probe_visible(catalog, probe)
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    if visible:
        return record_result(client, probe, "ok", now_ms)
    if now_ms >= probe.deadline_ms:
        logger.warning(
            "canary: probe %s not visible after %.0fs",
            probe.probe_id,
            (now_ms - probe.sent_ms) / 1000,
            extra={"batch_id": probe.probe_id, "table": CANARY_TABLE},
        )
        return record_result(client, probe, "timeout", now_ms)
    return None


def last_result(client: redis.Redis) -> dict[str, Any] | None:
    """What ``icefleet:canary:last`` holds, or None before the first result."""
    raw = client.get(keys.canary_last())
    return None if raw is None else dict(orjson.loads(raw))


# --- tasks ---------------------------------------------------------------------------------------


def _schedule_check(probe: Probe) -> None:
    canary_check.apply_async(kwargs=asdict(probe), queue=INGEST_QUEUE, countdown=CHECK_EVERY_S)


@shared_task(bind=True, name=SEND_TASK, ignore_result=True)
def canary_send(self: Task) -> dict[str, Any]:
    """Send a probe and schedule its first check."""
    rt = runtime(self.app)
    with Producer(rt.settings, client=rt.client) as producer:
        probe = send_probe(rt.settings, producer)
    _schedule_check(probe)
    return asdict(probe)


@shared_task(bind=True, name=CHECK_TASK, ignore_result=True)
def canary_check(
    self: Task, probe_id: str, sent_ms: int, deadline_ms: int
) -> dict[str, Any] | None:
    """Look for the probe; record its end-to-end time once visible, else check again soon."""
    from workers.observability import process_metrics

    rt = runtime(self.app)
    probe = Probe(probe_id, sent_ms, deadline_ms)
    result = check_probe(rt.client, rt.catalog, probe)
    if result is None:
        _schedule_check(probe)
    elif result["status"] == "ok":
        process_metrics().canary_seconds.observe(result["latency_s"])
        logger.info(
            "canary: probe %s visible after %.2fs",
            probe_id,
            result["latency_s"],
            extra={"batch_id": probe_id, "table": CANARY_TABLE},
        )
    return result
