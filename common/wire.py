"""The wire contract: queue and task names, batch ids, and the write-task message.

Everything a producer (in any language), a writer and the committer must agree on is spelt here
once, like :mod:`common.coord.keys` for Redis keys:

* **Queues**: ``ingest`` (write tasks, the canary) and ``commit`` (commits, maintenance).
* **Task names**, by which messages are routed and limits applied.
* **Batch ids**: a caller's id is 1 to :data:`MAX_BATCH_ID_CHARS` characters. icefleet derives
  ids of its own from it: the *parts* of a batch the producer cuts (``<id>:<n>``,
  :func:`part_ids`) and the *split child* a writer hands back (``<id>~<k>``,
  :func:`split_child_id`). A caller's id shaped like a split child is refused
  (:func:`check_batch_id`), as it could take a child's place.
* **The write-task message** (:class:`WriteTask`): the keyword arguments of
  ``icefleet.write_batch`` in Celery's message protocol 2 (:func:`task_message`).
  ``docs/producers.md`` describes it for producers in other languages.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import asdict, dataclass
from typing import Any

from common.errors import InvalidBatchIdError

INGEST_QUEUE = "ingest"
COMMIT_QUEUE = "commit"

WRITE_TASK = "icefleet.write_batch"
COMMIT_TASK = "icefleet.commit_table"
SWEEP_TASK = "icefleet.commit_all"
CANARY_TASK = "icefleet.canary.send"
CANARY_CHECK_TASK = "icefleet.canary.check"
VERIFY_SAMPLE_TASK = "icefleet.validation.verify_sample"  # the sampled validation (beat)

MAX_BATCH_ID_CHARS = 200
PART_SEPARATOR = ":"
SPLIT_SEPARATOR = "~"
_SPLIT_SUFFIX = re.compile(re.escape(SPLIT_SEPARATOR) + r"[0-9]+\Z")


def check_batch_id(batch_id: str) -> str:
    """Return ``batch_id`` if a caller may use it, else raise :class:`InvalidBatchIdError`.

    1 to :data:`MAX_BATCH_ID_CHARS` characters, not ending in ``~<digits>``: writers name the rest
    of a batch they split ``<id>~<offset>``, so ``orders~12`` could be the child of ``orders``
    (and be taken for a duplicate of it, or its events for that child's).
    """
    if not 0 < len(batch_id) <= MAX_BATCH_ID_CHARS:
        raise InvalidBatchIdError(batch_id, f"it must be 1 to {MAX_BATCH_ID_CHARS} characters")
    if _SPLIT_SUFFIX.search(batch_id):
        raise InvalidBatchIdError(
            batch_id,
            "it ends in '~<digits>', the form of the child batch a writer makes when it splits "
            "a batch (<id>~<offset>), so it could collide with one; use another separator",
        )
    return batch_id


def part_ids(batch_id: str, count: int) -> list[str]:
    """The ids of a batch's parts: the id itself when it is not cut, else ``<id>:<n>``."""
    return [batch_id] if count == 1 else [f"{batch_id}{PART_SEPARATOR}{n}" for n in range(count)]


def split_child_id(batch_id: str, offset: int) -> str:
    """The id of the batch holding ``batch_id``'s events from ``offset`` (relative) on."""
    return f"{batch_id}{SPLIT_SEPARATOR}{offset}"


@dataclass(frozen=True)
class WriteTask:
    """The keyword arguments of one ``icefleet.write_batch`` message.

    ``payload`` is the batch's NDJSON, packed as ``encoding`` says (:mod:`common.ingest.payloads`;
    ``None``: plain text). ``table`` (``namespace.table``) overrides routing. ``enqueued_at_ms`` is
    the batch's first enqueue time, the rows' ``_ingested_at``; ``None`` lets the writer fix it.
    """

    batch_id: str
    payload: str
    table: str | None = None
    enqueued_at_ms: int | None = None
    encoding: str | None = None

    def to_kwargs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> WriteTask:
        """The task in a stored copy of its arguments (:mod:`common.coord.resend`)."""
        return cls(
            batch_id=str(kwargs["batch_id"]),
            payload=kwargs["payload"],
            table=kwargs.get("table"),
            enqueued_at_ms=kwargs.get("enqueued_at_ms"),
            encoding=kwargs.get("encoding"),
        )


def task_message(task: str, task_id: str, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Body and headers of a Celery protocol 2 message (no chain, no callbacks, no ETA)."""
    shown = {k: v for k, v in kwargs.items() if k != "payload"}
    if "payload" in kwargs:
        shown["payload"] = f"<{len(kwargs['payload'])} chars>"
    headers: dict[str, Any] = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": repr(shown),
        "origin": f"gen{os.getpid()}@{socket.gethostname()}",
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    body = ((), kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None})
    return body, headers


__all__ = [
    "CANARY_CHECK_TASK",
    "CANARY_TASK",
    "COMMIT_QUEUE",
    "COMMIT_TASK",
    "INGEST_QUEUE",
    "MAX_BATCH_ID_CHARS",
    "SWEEP_TASK",
    "VERIFY_SAMPLE_TASK",
    "WRITE_TASK",
    "WriteTask",
    "check_batch_id",
    "part_ids",
    "split_child_id",
    "task_message",
]
