"""Routing: event type -> table, and identifiers that can never escape the warehouse."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import InvalidIdentifierError
from common.ingest.routing import IDENTIFIER_PATTERN, Router, TableName
from common.settings import Route

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("event_type", "table"),
    [
        ("com.github.push", "events.push"),
        ("com.github.pull_request", "events.pull_request"),
        ("com.example.Order-Created", "events.order_created"),
        ("io.cloudevents/v1:UserSignedUp", "events.usersignedup"),
        ("single", "events.single"),
        ("a.b.2fa", "events.t_2fa"),
    ],
)
def test_default_rule_uses_last_segment(event_type: str, table: str) -> None:
    # Given the default router / When routing a type / Then the table is the last segment
    assert str(Router().table_for(event_type)) == table


@pytest.mark.parametrize(
    "hostile",
    [
        "../../etc/passwd",
        "..",
        "/",
        "com.example.../../../tmp",
        "events; DROP TABLE users; --",
        "a" * 10_000,
        "type\x00with\x00nul",
        "\u202eevil\u202c",
        "日本語.イベント",
        "%2e%2e%2fetc",
        "C:\\Windows\\System32",
        "s3://other-bucket/key",
        "",
        "....",
        "${jndi:ldap://x}",
    ],
)
def test_hostile_types_route_to_safe_identifiers(hostile: str) -> None:
    # Given a hostile type string
    # When routed
    table = Router().table_for(hostile)
    # Then both parts match the strict pattern: no path, no dots, no non-ASCII
    assert table.namespace == "events"
    assert IDENTIFIER_PATTERN.match(table.name), table
    assert "/" not in str(table) and ".." not in str(table)


@given(st.text(max_size=300))
def test_any_type_routes_to_a_valid_identifier(event_type: str) -> None:
    table = Router().table_for(event_type)
    assert IDENTIFIER_PATTERN.match(table.namespace) and IDENTIFIER_PATTERN.match(table.name)


def test_configured_rules_win_in_order() -> None:
    # Given two rules that both match a type
    router = Router(
        (Route("com.github.*", "github.events"), Route("com.*", "other.all")), namespace="ev"
    )
    # Then the first one decides, and unmatched types use the default rule
    assert str(router.table_for("com.github.push")) == "github.events"
    assert str(router.table_for("com.shop.order")) == "other.all"
    assert str(router.table_for("org.x.y")) == "ev.y"


@pytest.mark.parametrize(
    "name", ["events", "events.push.x", "../x.y", "Events.push", "events.pu sh", "a.", ".b", "1a.b"]
)
def test_table_name_parse_rejects_anything_but_two_safe_parts(name: str) -> None:
    with pytest.raises(InvalidIdentifierError):
        TableName.parse(name)


def test_table_name_round_trip() -> None:
    assert str(TableName.parse("events.push")) == "events.push"
    assert TableName.parse("events.push").parts == ("events", "push")
