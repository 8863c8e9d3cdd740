"""No secret is ever printed: every command of ``icefleet``, run as a user runs it (a process of
its own) against a Redis that is down, with the password in the URL's user part or as a
``?password=`` query, fails in one line that shows the URL with ``***`` and never the password.
The gateway's side (``/healthz``, 503s) is in tests/integration/test_gateway.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.redaction import redact_text, redact_url
from tests.support.services import free_port
from workers.cli.main import main

pytestmark = pytest.mark.integration

SECRET = "pa55-w0rd-never-shown"
EVENT = json.dumps({"specversion": "1.0", "id": "1", "source": "/s", "type": "t.x"})
# every command that reaches Redis, with what it needs to get there
COMMANDS: dict[str, list[str]] = {
    "status": ["status", "--no-workers"],
    "send": ["send", "--max-wait", "0", "-"],
    "wait": ["wait", "--timeout", "1"],
    "dead-letters list": ["dead-letters", "list"],
    "dead-letters replay": ["dead-letters", "replay", "--all"],
    "dead-letters purge": ["dead-letters", "purge", "--yes"],
    "compact": ["compact", "events.x"],
    "expire-snapshots": ["expire-snapshots", "events.x"],
    "remove-orphans": ["remove-orphans", "events.x"],
    "delete": ["delete", "events.x", "--where", "id = '1'"],
    "evolve": ["evolve", "events.x", "--rename", "a=b"],
    "quarantine": ["quarantine", "--list"],
    "up": ["up", "--writers", "1"],
}


def test_every_command_that_reaches_redis_is_listed() -> None:
    # Only these need no Redis: serving HTTP (its own tests), a worker, the catalog commands.
    no_redis = {
        "serve",
        "worker",
        "verify",
        "sync-catalog",
        "tables",
        "query",
        "demo",
    }  # demo: as up
    assert set(main.commands) - no_redis == {name.split()[0] for name in COMMANDS}


@pytest.mark.parametrize("form", ["userinfo", "query"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_no_command_prints_the_redis_password(command: str, form: str, tmp_path: Path) -> None:
    # Given a Redis URL with a password, on a port nobody listens on
    port = free_port()
    url = (
        f"redis://:{SECRET}@127.0.0.1:{port}/0"
        if form == "userinfo"
        else f"redis://127.0.0.1:{port}/0?password={SECRET}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEFLEET_", "PYICEBERG_"))}
    env.update(ICEFLEET_REDIS_URL=url, ICEFLEET_HOME=str(tmp_path))

    # When the command runs as a user runs it
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli.main", *COMMANDS[command]],
        input=EVENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )

    # Then it fails over Redis (or, for the query form, the setting: the broker's client cannot
    # read it), and neither its output nor its error shows the password
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert SECRET not in output
    if form == "query":
        assert "ICEFLEET_REDIS_URL='redis://127.0.0.1" in output and "password=***" in output
    else:
        assert "Redis" in output or "127.0.0.1" in output, output


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:pw@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("redis://user:pw@127.0.0.1/0?db=1", "redis://user:***@127.0.0.1/0?db=1"),
        ("redis://127.0.0.1:6379/0?password=pw&db=1", "redis://127.0.0.1:6379/0?password=***&db=1"),
        (
            "rediss://u@127.0.0.1/0?ssl_keyfile_password=pw",
            "rediss://u@127.0.0.1/0?ssl_keyfile_password=***",
        ),
        ("postgresql://u@127.0.0.1/d?password=pw", "postgresql://u@127.0.0.1/d?password=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@127.0.0.1:notaport/0", "redis://:***@127.0.0.1:notaport/0"),
    ],
)
def test_one_redaction_path_for_every_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert (
        redact_text(f"Error connecting to {url} (refused)")
        == f"Error connecting to {shown} (refused)"
    )
