"""The record a running local fleet leaves under ``ICEFLEET_HOME``, so other commands find it.

``icefleet up`` and ``icefleet demo`` start Redis on a free port. Without a record, a command in a
second terminal would talk to the default ``redis://127.0.0.1:6379/0``: an error when nothing
listens there, and events silently sent to the wrong place when another project's Redis does.
So the fleet writes ``<home>/fleet.json`` (its Redis URL, its catalog, the process that owns it)
once its Redis answers and removes it when it stops; commands read it when
``ICEFLEET_REDIS_URL`` is unset (:mod:`workers.cli.context`).

The file is written atomically (a temporary file renamed over it), so a reader never sees half a
record, and with mode 0600: the URL may hold a password (a Redis with ``requirepass``). The
password never leaves the file: :meth:`FleetRecord.__repr__` and :meth:`FleetRecord.describe`
redact it.

A record outlives its fleet when the fleet is killed (``kill -9``, a crash, a reboot): it is stale
when its owner process is gone (its pid is free, a zombie, or now another process, told apart by
its start time) or its Redis refuses connections. Whoever finds it stale removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.redaction import redact_url

RECORD_NAME = "fleet.json"
VERSION = 1


def record_path(home: Path) -> Path:
    return home.resolve() / RECORD_NAME


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, Linux); None when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19]) if len(fields) > 19 else None


def process_alive(pid: int, started: int | None) -> bool:
    """Whether ``pid`` is still the process that wrote the record (not a zombie, not reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process now: the start time tells
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the signal is all we know
    if stat[stat.rfind(")") + 2 :][:1] in ("Z", "X"):
        return False  # killed, waiting for its parent to reap it
    return started is None or process_started(pid) == started


@dataclass(frozen=True)
class FleetRecord:
    """What ``fleet.json`` holds. ``catalog`` is the ``ICEFLEET_CATALOG`` name, None = embedded."""

    redis_url: str = field(repr=False)
    catalog: str | None
    home: str
    pid: int
    pid_started: int | None
    command: str
    started_at_ms: int

    def __repr__(self) -> str:
        return (
            f"FleetRecord(redis_url={redact_url(self.redis_url)!r}, catalog={self.catalog!r}, "
            f"home={self.home!r}, pid={self.pid}, command={self.command!r})"
        )

    @classmethod
    def for_this_process(
        cls, redis_url: str, catalog: str | None, home: Path, command: str
    ) -> FleetRecord:
        pid = os.getpid()
        return cls(
            redis_url=redis_url,
            catalog=catalog,
            home=str(home.resolve()),
            pid=pid,
            pid_started=process_started(pid),
            command=command,
            started_at_ms=int(time.time() * 1000),
        )

    @property
    def path(self) -> Path:
        return Path(self.home) / RECORD_NAME

    def owner_alive(self) -> bool:
        return process_alive(self.pid, self.pid_started)

    def describe(self) -> str:
        """Where the settings came from, for humans: no password."""
        return (
            f"the local fleet of `icefleet {self.command}` (pid {self.pid}) recorded in {self.path}"
        )


def write_record(record: FleetRecord) -> Path:
    """Write ``record`` atomically with mode 0600; return its path."""
    path = record.path
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"version": VERSION, **asdict(record)}, indent=2)
    fd, tmp = tempfile.mkstemp(prefix=".fleet-", suffix=".json", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_record(home: Path) -> FleetRecord | None:
    """The record under ``home``, or None when there is none (or it is unreadable: removed)."""
    path = record_path(home)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        data.pop("version", None)
        return FleetRecord(**data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        # Half-written by hand or by an older version: not a fleet anyone can use.
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def remove_record(record: FleetRecord) -> bool:
    """Remove ``record``'s file if it still holds this record (not a newer fleet's)."""
    current = read_record(Path(record.home))
    if current is None or (current.pid, current.started_at_ms) != (
        record.pid,
        record.started_at_ms,
    ):
        return False
    with contextlib.suppress(FileNotFoundError):
        record.path.unlink()
    return True


@contextmanager
def recorded(
    redis_url: str, catalog: str | None, home: Path, command: str
) -> Iterator[FleetRecord]:
    """Write this process's record for the duration of the block; remove it at the end."""
    record = FleetRecord.for_this_process(redis_url, catalog, home, command)
    write_record(record)
    try:
        yield record
    finally:
        remove_record(record)


def keep_recorded(record: FleetRecord) -> None:
    """Write ``record`` again if it is gone: a command that found the fleet's Redis restarting
    took the record for stale and removed it; the fleet is still here."""
    if not record.path.exists():
        write_record(record)
