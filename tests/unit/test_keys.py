"""Every Redis key icefleet uses is named in common/coord/keys.py, with the same strings as before."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from common.coord import keys
from common.ingest.replay import REPLAYS_KEY, origin_key
from common.observe.metrics import CANARY_LAST_KEY
from common.write.partial import split_key

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (keys.split("b1"), "icefleet:split:b1"),
        (keys.split("b1~200"), "icefleet:split:b1~200"),
        (keys.replays(), "icefleet:replays"),
        (keys.replayed("abc"), "icefleet:replayed:abc"),
        (keys.canary_last(), "icefleet:canary:last"),
        (keys.outstanding(), "icefleet:outstanding"),
        (keys.dead_letters(), "icefleet:dead-letters"),
        (keys.pending("events.push"), "icefleet:pending:events.push"),
    ],
)
def test_key_strings_are_unchanged(key: str, expected: str) -> None:
    # Given data written by earlier versions, When keys are named through common/coord/keys.py,
    # Then they are the very same strings (data compatibility).
    assert key == expected


def test_modules_that_used_their_own_key_names_now_use_common_keys() -> None:
    # Given the modules that used to spell their keys themselves, When they name a key,
    # Then it is the one common/coord/keys.py names.
    assert split_key("b1") == keys.split("b1")
    assert keys.replays() == REPLAYS_KEY
    assert keys.canary_last() == CANARY_LAST_KEY

    class Letter:
        batch_id = "b"
        position = 3
        raw = b"{}"

    assert re.fullmatch(r"icefleet:replayed:[0-9a-f]{32}", origin_key(Letter()))  # type: ignore[arg-type]


def _key_literals(path: Path) -> list[str]:
    """String constants and f-string parts (docstrings aside) that spell an icefleet key."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and node.value.startswith("icefleet:"):
                found.append(node.value)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr == "PREFIX"
            and isinstance(node.value, ast.Name)
            and node.value.id == "keys"
        ):
            found.append("keys.PREFIX")
    return found


def test_no_redis_key_is_spelt_outside_common_keys() -> None:
    # Given the sources of common/ and workers/, When looking for key names,
    # Then only common/coord/keys.py spells one.
    offenders = {
        str(path.relative_to(ROOT)): literals
        for folder in ("common", "workers")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if path.name != "keys.py" and (literals := _key_literals(path))
    }
    assert offenders == {}
