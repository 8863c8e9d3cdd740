"""The ``icefleet`` command line: help for every command, and argument errors that say what to fix.

Nothing here reaches a server: every case fails (or prints help) before connecting. The commands
that do connect are exercised against real processes in tests/integration/test_fleet.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from workers.cli.main import main

pytestmark = pytest.mark.unit

COMMANDS = {
    "demo": ["--events", "--writers"],
    "up": ["--writers", "--flower"],
    "send": ["FILE", "--table", "--batch-id"],
    "wait": ["--timeout", "--batch-id"],
    "status": ["--json", "--watch"],
    "tables": ["--json"],
    "query": ["SQL", "--json", "--csv"],
    "worker": ["writer|committer", "--pool", "--beat"],
}


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    for name in ("ICEFLEET_REDIS_URL", "ICEFLEET_CATALOG", "ICEFLEET_BATCH_MAX_EVENTS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ICEFLEET_HOME", str(tmp_path / "home"))
    return CliRunner()


def test_main_help_lists_every_command(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for command in COMMANDS:
        assert command in result.output


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(runner: CliRunner, command: str) -> None:
    result = runner.invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    for word in COMMANDS[command]:
        assert word in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--events", "0"], "--events"),
        (["demo", "--writers", "abc"], "--writers"),
        (["up", "--pool", "gevent"], "--pool"),
        (["worker", "scheduler"], "writer"),
        (["worker", "committer", "--concurrency", "0"], "--concurrency"),
        (["send"], "FILE"),
        (["send", "-", "--table", "Events.Page"], "--table"),
        (["send", "-", "--batch-id", "orders~12"], "--batch-id"),
        (["wait", "--timeout", "-1"], "--timeout"),
        (["status", "--watch", "--json"], "--watch"),
        (["query", "  "], "SQL"),
        (["query", "SELECT 1", "--max-rows", "0"], "--max-rows"),
        (["nonsense"], "No such command"),
    ],
)
def test_argument_errors_exit_2_naming_the_problem(
    runner: CliRunner, args: list[str], message: str
) -> None:
    result = runner.invoke(main, args, input="")
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_an_invalid_setting_names_the_variable(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ICEFLEET_BATCH_MAX_EVENTS", "lots")
    result = runner.invoke(main, ["send", "-"], input='{"id": "x"}\n')
    assert result.exit_code == 1
    assert "ICEFLEET_BATCH_MAX_EVENTS" in result.output
    assert "positive whole number" in result.output


def test_demo_without_redis_server_says_how_to_install_it(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a PATH without redis-server and no Redis configured
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    # When the demo starts
    result = runner.invoke(main, ["demo", "--events", "10"])

    # Then it fails before starting anything, with the install commands
    assert result.exit_code == 1
    assert "redis-server" in result.output
    assert "apt-get install redis-server" in result.output
    assert "brew install redis" in result.output


def test_up_without_redis_server_fails_before_starting_anything(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = runner.invoke(main, ["up", "--flower"])
    assert result.exit_code == 1
    assert "apt-get install redis-server" in result.output


@pytest.mark.parametrize("make", ["missing", "directory"])
def test_a_file_send_cannot_read_is_one_line_exit_1(
    runner: CliRunner, tmp_path: Path, make: str
) -> None:
    # Given a path that does not exist, or a directory
    path = tmp_path / "events.ndjson"
    if make == "directory":
        path.mkdir()

    # When send is given it
    result = runner.invoke(main, ["send", str(path)])

    # Then one line says it cannot be read, before anything connects
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith(f"error: cannot read {path}")
