"""Every ``icefleet`` command against every expected failure: one line, no traceback, no secret.

Each command runs in a process of its own, nothing configured but what the failure sets (forked
from one that imported the CLI once: tests/support/cli_fork.py),
against: an unreachable Redis, a real ``redis-server`` with ``requirepass`` given the wrong
password, a malformed Redis URL, an unreachable PostgreSQL catalog, a table that does not exist
and a file that cannot be read. A command must exit 1 with exactly one line on stderr, starting
``error:`` and saying what failed, print nothing on stdout, and never show a password.

A command that does not use what is broken is not run against it, and says why in
:data:`UNAFFECTED`: a failure it cannot meet is no failure of it. ``query`` and ``verify`` read
only the catalog, so a broken Redis must not stop them (checked too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.services import RedisProcess, free_port

pytestmark = pytest.mark.integration

SECRET = "s3cret-pw-4711"
MISSING = "events.missing"


def commands(tmp: Path) -> dict[str, list[str]]:
    """Every command, with arguments that reach what it connects to."""
    events = tmp / "events.ndjson"
    events.write_text('{"specversion":"1.0","id":"1","source":"/t","type":"com.example.thing"}\n')
    return {
        "demo": ["demo", "--events", "10", "--writers", "1"],
        "up": ["up", "--writers", "1"],
        "send": ["send", str(events)],
        "wait": ["wait", "--timeout", "1"],
        "status": ["status", "--no-workers"],
        "status --watch": ["status", "--watch", "--count", "1", "--no-workers"],
        "tables": ["tables"],
        "query": ["query", f"SELECT count(*) FROM {MISSING}"],
        "worker": ["worker", "writer", "--pool", "solo"],
        "serve": ["serve", "--port", str(free_port())],
        "evolve": ["evolve", MISSING, "--rename", "a=b"],
        "compact": ["compact", MISSING],
        "expire-snapshots": ["expire-snapshots", MISSING],
        "remove-orphans": ["remove-orphans", MISSING],
        "delete": ["delete", MISSING, "--where", "id = 'x'"],
        "verify": ["verify", MISSING],
        "sync-catalog": ["sync-catalog", "--dry-run"],
        "dead-letters list": ["dead-letters", "list"],
        "dead-letters replay": ["dead-letters", "replay", "--all"],
        "dead-letters purge": ["dead-letters", "purge", "--yes"],
    }


REDIS_ONLY = {"send", "wait", "worker", "serve", "dead-letters list"}
REDIS_ONLY |= {"dead-letters replay", "dead-letters purge"}
CATALOG_ONLY = {"query", "verify"}
TAKES_A_TABLE = {"query", "evolve", "compact", "expire-snapshots", "remove-orphans"}
TAKES_A_TABLE |= {"delete", "verify"}
# failure -> the commands that never meet it, and why
UNAFFECTED: dict[str, set[str]] = {
    "unreachable Redis": CATALOG_ONLY,  # run separately: they must succeed
    "wrong password": CATALOG_ONLY,
    "malformed Redis URL": set(),  # every command reads its settings first
    "unreachable catalog": REDIS_ONLY,  # the writers meet the catalog, with their own retries
    "missing table": set(),  # only the commands in TAKES_A_TABLE name a table
    "unreadable file": set(),  # only send reads a file
}


@dataclass
class Failure:
    name: str
    env: dict[str, str]
    says: str  # what the line must mention
    commands: dict[str, list[str]] = field(default_factory=dict)


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ICEFLEET_", "PYICEBERG_"))}
    env.update({"ICEFLEET_HOME": str(home), **extra})
    return env


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    with RedisProcess(tmp_path_factory.mktemp("authredis"), password="the-right-one") as server:
        yield server


def failure(name: str, tmp: Path, redis_url: str, password_redis: RedisProcess) -> Failure:
    every = commands(tmp)
    home = tmp / "home"
    if name == "unreachable Redis":
        env = {"ICEFLEET_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"}
        says = "is not reachable"
    elif name == "wrong password":
        env = {"ICEFLEET_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:{password_redis.port}/0"}
        says = "refused the credentials"
    elif name == "malformed Redis URL":
        env = {"ICEFLEET_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:notaport/0"}
        says = "ICEFLEET_REDIS_URL"
    elif name == "unreachable catalog":
        uri = f"postgresql+psycopg2://icefleet:{SECRET}@127.0.0.1:{free_port()}/icefleet"
        env = {
            "ICEFLEET_REDIS_URL": redis_url,
            "ICEFLEET_CATALOG": "gone",
            "PYICEBERG_CATALOG__GONE__TYPE": "sql",
            "PYICEBERG_CATALOG__GONE__URI": uri,
        }
        says = "ICEFLEET_CATALOG"
    elif name == "missing table":
        env = {"ICEFLEET_REDIS_URL": redis_url}
        says = f"no table {MISSING}"
        every = {command: every[command] for command in TAKES_A_TABLE}
    else:  # unreadable file
        env = {"ICEFLEET_REDIS_URL": redis_url}
        says = "cannot read"
        (tmp / "a-directory").mkdir()
        every = {
            "send (missing file)": ["send", str(tmp / "nothing-here.ndjson")],
            "send (directory)": ["send", str(tmp / "a-directory")],
        }
    chosen = {c: args for c, args in every.items() if c not in UNAFFECTED[name]}
    return Failure(name, cli_env(home, **env), says, chosen)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_all(env: dict[str, str], jobs: dict[str, list[str]]) -> dict[str, Result]:
    """Run the commands side by side, each a process of its own (tests/support/cli_fork.py)."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.cli_fork"],
        input=json.dumps(jobs),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr
    return {
        name: Result(r["code"], r["stdout"], r["stderr"])
        for name, r in json.loads(done.stdout).items()
    }


@pytest.mark.parametrize("name", list(UNAFFECTED))
def test_every_command_fails_with_one_line_and_no_secret(
    name: str, tmp_path: Path, redis_url: str, password_redis: RedisProcess
) -> None:
    # Given one thing broken
    broken = failure(name, tmp_path, redis_url, password_redis)

    # When every command that uses it runs
    results = run_all(broken.env, broken.commands)

    # Then each exits 1 with one line on stderr that says what failed, and nothing else
    problems = []
    for command, result in results.items():
        lines = result.stderr.strip().splitlines()
        shown = result.stdout + result.stderr
        if (
            result.returncode != 1
            or len(lines) != 1
            or not lines[0].startswith("error: ")
            or broken.says not in lines[0]
            or result.stdout.strip()
            or "Traceback" in shown
            or SECRET in shown
        ):
            problems.append(f"{command}: exit {result.returncode}\n{shown}")
    assert not problems, "\n\n".join(problems)
    assert len(results) >= (2 if name == "unreadable file" else 7)


def test_commands_that_read_only_the_catalog_ignore_a_broken_redis(
    tmp_path: Path, password_redis: RedisProcess
) -> None:
    # Given a Redis with the wrong password configured, and an empty embedded catalog
    env = cli_env(
        tmp_path / "home",
        ICEFLEET_REDIS_URL=f"redis://:{SECRET}@127.0.0.1:{password_redis.port}/0",
    )

    # When query and verify run
    results = run_all(
        env, {"query": ["query", "SELECT 41 + 1 AS answer", "--csv"], "verify": ["verify"]}
    )

    # Then they succeed
    assert results["query"].returncode == 0, results["query"].stderr
    assert results["query"].stdout.splitlines() == ["answer", "42"]
    assert results["verify"].returncode == 0, results["verify"].stderr
