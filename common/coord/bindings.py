"""Batch ids bound to their content: the same id with other events is refused, never skipped.

A batch id is the idempotency key of a batch: a batch sent again under its id lands once, because
registration refuses an id that is pending or committed (:mod:`common.coord.pending`). The same id
with *other* events would be skipped the same way, silently. So at its first enqueue a batch id
is bound to :func:`common.wire.content_digest` of its payload and table, in
``icefleet:content:<id>`` for the dedup window (``ICEFLEET_DEDUP_WINDOW_S``):

* the producer binds a caller's id before it sends anything, and raises
  :class:`~common.errors.BatchConflictError` when the id is bound to other content (the gateway
  answers 409, ``icefleet send`` exits 1 naming the id). When the producer cuts the events into
  parts (``<id>~p<n>``) it stores the parts' sizes with the binding and cuts a resend the same
  way, whatever its batch limits are now, so each part id keeps its content too;
* every writer checks the id it is given against the payload it holds, binding it if nobody
  did (parts, split children, replays, a producer in another language). A message whose id is
  bound to other content is dead-lettered whole with the reason: nothing accepted is ever
  skipped without a dead letter.

The binding is ``SET NX`` and ``GET`` in one MULTI/EXEC, which answers what is bound: first
writer wins, and a crash between binding and sending leaves a binding that the retry (same
content) matches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis

from common.coord import keys
from common.coord.replies import as_text
from common.errors import BatchConflictError


@dataclass(frozen=True)
class Binding:
    """What a batch id is bound to: a content digest, and the sizes (events) of its parts."""

    digest: str
    parts: tuple[int, ...] = ()

    def to_text(self) -> str:
        return self.digest + (" " + ",".join(map(str, self.parts)) if self.parts else "")

    @classmethod
    def from_text(cls, text: str) -> Binding:
        digest, _, parts = text.partition(" ")
        return cls(digest, tuple(int(n) for n in parts.split(",")) if parts else ())


class BatchBindings:
    """Bind batch ids to content digests for ``ttl_s`` seconds (the dedup window)."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._client = client
        self.ttl_s = max(1, int(ttl_s))

    def bind(self, batch_id: str, digest: str, parts: Sequence[int] = ()) -> Binding:
        """Bind ``batch_id`` to ``digest`` (and part sizes) unless it is bound; return the
        binding in effect. Raises :class:`BatchConflictError` if it names other content."""
        wanted = Binding(digest, tuple(parts))
        pipe = self._client.pipeline(transaction=True)
        pipe.set(keys.content(batch_id), wanted.to_text(), nx=True, ex=self.ttl_s)
        pipe.get(keys.content(batch_id))
        _, value = pipe.execute()
        stored = Binding.from_text(as_text(value))
        if stored.digest != digest:
            raise BatchConflictError(
                batch_id,
                f"it was first enqueued with other events (content {stored.digest[:12]}, these "
                f"{digest[:12]}), and a batch id is the idempotency key of its events: the same "
                "id with the same events lands once; send other events under another id",
            )
        return stored

    def bound(self, batch_id: str) -> Binding | None:
        """What ``batch_id`` is bound to, or None."""
        value = self._client.get(keys.content(batch_id))
        return None if value is None else Binding.from_text(as_text(value))


__all__ = ["BatchBindings", "Binding"]
