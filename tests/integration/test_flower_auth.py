"""Flower is never open by accident: ``icefleet up --flower`` runs it on 127.0.0.1 only, behind
basic auth (a random password when ICEFLEET_FLOWER_BASIC_AUTH is not set), the password in its
environment, not its command line. A real Flower process on the session's Redis."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.settings import load_settings
from tests.support.services import free_port, wait_for_port
from workers.fleet import Fleet, generated_basic_auth

pytestmark = pytest.mark.integration


def status_of(url: str, auth: str | None = None) -> int:
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (Linux /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


@pytest.mark.parametrize("given", [None, "ops:s3cret-given"])
def test_flower_requires_basic_auth_and_listens_on_loopback_only(
    redis_url: str, tmp_path: Path, given: str | None
) -> None:
    # Given the fleet's Flower, with a password given or generated
    env = {} if given is None else {"ICEFLEET_FLOWER_BASIC_AUTH": given}
    settings = load_settings(env, redis_url=redis_url, home=tmp_path)
    port = free_port()
    fleet = Fleet(settings, spawn_redis=False, flower=True, flower_port=port)
    fleet.flower_auth = settings.flower_basic_auth or generated_basic_auth()
    fleet._add("flower", fleet._flower_argv(), fleet.flower_env())
    try:
        wait_for_port(port, timeout_s=60)
        url = f"http://127.0.0.1:{port}/"
        auth = fleet.flower_auth

        # Then without credentials, or with wrong ones, it answers 401; with them, 200
        assert status_of(url) == 401
        assert status_of(url, "icefleet:wrong") == 401
        assert status_of(url, auth) == 200
        if given is not None:
            assert auth == given
        else:
            user, _, password = auth.partition(":")
            assert user == "flower" and len(password) >= 20
        # on 127.0.0.1 only, and the password is not on its command line for `ps` to show
        assert listening_addresses(port) == {"0100007F"}
        proc = fleet.process("flower")
        assert not any(auth.partition(":")[2] in arg for arg in proc.argv)
    finally:
        fleet.stop()


def test_the_flower_credentials_setting_must_be_a_pair() -> None:
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="user:password") as refused:
        load_settings({"ICEFLEET_FLOWER_BASIC_AUTH": "only-a-password"})
    assert "only-a-password" not in str(refused.value)
    assert "only-a-password" not in repr(
        load_settings({"ICEFLEET_FLOWER_BASIC_AUTH": "u:only-a-password"})
    )
