"""The wire contract: queue and task names, batch ids, content digests, and the write-task message.

Everything a producer (in any language), a writer and the committer must agree on is spelt here
once, like :mod:`common.coord.keys` for Redis keys:

* **Queues**: ``ingest`` (write tasks, the canary) and ``commit`` (commits, maintenance).
* **Task names**, by which messages are routed and limits applied.
* **Batch ids**: a caller's id is 1 to :data:`MAX_BATCH_ID_CHARS` characters without a ``~``
  (:func:`check_batch_id`). ``~`` marks the ids icefleet *derives*, so no caller's id can take
  the place of one: the *parts* of a batch the producer cuts (``<id>~p<n>``, :func:`part_ids`),
  the *split child* a writer hands back (``<id>~<k>``, :func:`split_child_id`) and the batches
  of a dead-letter replay (``~replay-<hex>``, :func:`replay_batch_id`). A child's events keep
  their place in the batch it was cut from: :func:`lineage` reads it back from the id.
* **Content digests** (:func:`content_digest`): a batch id is bound to the digest of its payload
  and table at its first enqueue (:mod:`common.coord.bindings`); the same id with other content
  is refused. **Event identities** (:func:`event_identity`, :func:`raw_digest`): CloudEvents 1.0
  identifies an event by ``source`` and ``id``; :mod:`common.coord.claims` remembers, per table,
  which identities landed and the digest of their bytes. The digests are xxh3 (fast, not
  cryptographic): they tell accidents apart, they are no security boundary.
* **The write-task message** (:class:`WriteTask`): the keyword arguments of
  ``icefleet.write_batch`` in Celery's message protocol 2 (:func:`task_message`).
  ``docs/producers.md`` describes it for producers in other languages.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import xxhash

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
#: Marks a derived id; never in a caller's id.
DERIVED_MARK = "~"
PART_SEPARATOR = DERIVED_MARK + "p"
SPLIT_SEPARATOR = DERIVED_MARK
REPLAY_PREFIX = DERIVED_MARK + "replay-"  # never all digits after the mark: not a split
_SPLIT_SUFFIX = re.compile(re.escape(SPLIT_SEPARATOR) + r"([0-9]+)\Z")
#: Longest derived id: a caller's id, its part and up to ~20 nested split children.
MAX_DERIVED_ID_CHARS = 1_000


def check_batch_id(batch_id: str) -> str:
    """Return ``batch_id`` if a caller may use it, else raise :class:`InvalidBatchIdError`.

    1 to :data:`MAX_BATCH_ID_CHARS` characters, without ``~``: icefleet names the batches it
    derives from a caller's (parts, split children, replays) with a ``~``, so ``orders~p0`` could
    take the place of a part of ``orders`` (and be taken for a duplicate of it).
    """
    if not 0 < len(batch_id) <= MAX_BATCH_ID_CHARS:
        raise InvalidBatchIdError(batch_id, f"it must be 1 to {MAX_BATCH_ID_CHARS} characters")
    if DERIVED_MARK in batch_id:
        raise InvalidBatchIdError(
            batch_id,
            f"'{DERIVED_MARK}' is reserved for the ids icefleet derives (the parts of a batch "
            f"<id>{PART_SEPARATOR}<n>, a writer's split <id>{SPLIT_SEPARATOR}<offset>, replays "
            f"{REPLAY_PREFIX}<hex>), so it could collide with one; use another character",
        )
    return batch_id


def check_derived_id(batch_id: str) -> str:
    """Return ``batch_id`` if it is an id icefleet derives (it holds a ``~``), else raise."""
    if DERIVED_MARK not in batch_id or len(batch_id) > MAX_DERIVED_ID_CHARS:
        raise InvalidBatchIdError(batch_id, "not an id icefleet derives")
    return batch_id


def part_ids(batch_id: str, count: int) -> list[str]:
    """The ids of a batch's parts: the id itself when it is not cut, else ``<id>~p<n>``."""
    return [batch_id] if count == 1 else [f"{batch_id}{PART_SEPARATOR}{n}" for n in range(count)]


def split_child_id(batch_id: str, offset: int) -> str:
    """The id of the batch holding ``batch_id``'s events from ``offset`` (relative) on."""
    return f"{batch_id}{SPLIT_SEPARATOR}{offset}"


def replay_batch_id(hex_digest: str) -> str:
    """The id of a dead-letter replay batch, named by a digest of its members."""
    return f"{REPLAY_PREFIX}{hex_digest}"


def lineage(batch_id: str) -> tuple[str, int]:
    """The batch a writer's split child was cut from, and where its events start in it.

    ``orders~p0~500~200`` → ``("orders~p0", 700)``: its first valid event is the 700th of
    ``orders~p0``. A batch that is no split child is its own root, at 0.
    """
    offset = 0
    while match := _SPLIT_SUFFIX.search(batch_id):
        offset += int(match.group(1))
        batch_id = batch_id[: match.start()]
    return batch_id, offset


# --- digests --------------------------------------------------------------------------------------


def content_digest(payload: str | bytes, table: str | None) -> str:
    """The digest a batch id is bound to: its payload (as sent, before packing) and its table."""
    data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
    hasher = xxhash.xxh3_128((table or "").encode() + b"\n")
    hasher.update(data)
    return hasher.hexdigest()


IDENTITY_BYTES = 16
CLAIM_VALUE_BYTES = 20  # owner 8, position 4, bytes digest 8
_POSITION = struct.Struct(">I").pack


def event_identity(source: str, event_id: str) -> bytes:
    """16 bytes naming an event by its CloudEvents identity (``source``, ``id``)."""
    return xxhash.xxh3_128_digest(f"{len(source)}:{source}{event_id}".encode())


def raw_digest(raw: str) -> bytes:
    """8 bytes of an event's bytes as received (``raw_event``): equal means byte-identical."""
    return xxhash.xxh3_64_digest(raw.encode())


def claim_keys(
    owner: bytes, offset: int, events: Iterable[tuple[int, str, str, str]]
) -> tuple[list[bytes], list[bytes]]:
    """The identities and claim values of events given as (index, source, id, raw), in order.

    A value names the event's place (``owner``, the lineage root's :func:`owner_digest`, and
    ``offset + index``) and its bytes (:func:`raw_digest`). One loop with the rules of
    :func:`event_identity` and :func:`raw_digest` spelt inline: it runs once per event written.
    """
    h128, h64, position = xxhash.xxh3_128_digest, xxhash.xxh3_64_digest, _POSITION
    identities: list[bytes] = []
    values: list[bytes] = []
    add_identity, add_value = identities.append, values.append
    for index, source, event_id, raw in events:
        add_identity(h128(f"{len(source)}:{source}{event_id}".encode()))
        add_value(owner + position(offset + index) + h64(raw.encode()))
    return identities, values


def owner_digest(batch_id: str) -> bytes:
    """8 bytes naming the batch (the lineage root) that claims an event."""
    return xxhash.xxh3_64_digest(batch_id.encode("utf-8", "surrogatepass"))


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
    "DERIVED_MARK",
    "INGEST_QUEUE",
    "MAX_BATCH_ID_CHARS",
    "SWEEP_TASK",
    "VERIFY_SAMPLE_TASK",
    "WRITE_TASK",
    "WriteTask",
    "check_batch_id",
    "check_derived_id",
    "claim_keys",
    "content_digest",
    "event_identity",
    "lineage",
    "owner_digest",
    "part_ids",
    "raw_digest",
    "replay_batch_id",
    "split_child_id",
    "task_message",
]
