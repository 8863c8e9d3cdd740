"""The docs: the configuration reference is the one generated from the settings, every relative
link in the README and docs/ resolves, and the README keeps the commands CI relies on."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from common import settings_doc
from common.errors import ConfigError, IcefleetError
from common.settings import _VARIABLES, Settings, load_settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "docs" / "configuration.md"
REFRESH = "make docs (python -m common.settings_doc docs/configuration.md)"
#: Pages another change writes: a link to one is accepted while it is absent, checked once it is
#: there (none now: docs/compose.md came with the compose stack's work).
NOT_YET_WRITTEN: set[Path] = set()

FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens, -1... for
    repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of a page whose file (or heading anchor) does not exist in ``root``."""
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(root)}: {target}"
        if not resolved.is_relative_to(root):
            broken.append(f"{where} (outside the repository)")
        elif not resolved.exists():
            if resolved not in NOT_YET_WRITTEN:
                broken.append(f"{where} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where} (no such heading)")
    return broken


def test_the_configuration_reference_is_generated_from_the_settings() -> None:
    # Given the reference rendered from common/settings.py now
    expected = settings_doc.render()
    # When the committed docs/configuration.md is read
    committed = REFERENCE.read_text(encoding="utf-8") if REFERENCE.exists() else ""
    # Then they are the same
    assert committed == expected, f"docs/configuration.md is stale: run {REFRESH}"


def test_every_variable_is_in_the_reference_with_a_default_that_loads_back() -> None:
    # Given the rendered reference's rows, by variable
    rows = {}
    for line in settings_doc.render().splitlines():
        match = re.match(r"^\| `(ICEFLEET_\w+)` \| (.+?) \| ", line)
        if match:
            rows[match.group(1)] = match.group(2)
    # Then every variable has exactly one row
    assert sorted(rows) == sorted("ICEFLEET_" + suffix for suffix in _VARIABLES)
    # and each default, written back into its variable, loads as the field's default
    defaults = {f.name: f.default for f in fields(Settings)}
    for name, shown in rows.items():
        attr = _VARIABLES[name.removeprefix("ICEFLEET_")][0]
        if shown == "unset":
            assert defaults[attr] in (None, ()), name
            continue
        spelt = re.fullmatch(r"`([^`]+)`( \(.+\))?", shown)
        assert spelt is not None, (name, shown)
        loaded = load_settings({name: spelt.group(1)})
        assert getattr(loaded, attr) == defaults[attr], (name, shown)


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("ICEFLEET_METRICS_PORT", "70000", "a TCP port number, 1 to 65535"),
        ("ICEFLEET_COMPACT_MIN_FILES", "1", "a whole number of at least 2"),
        ("ICEFLEET_SCHEMA_MODE", "loose", "one of evolve, strict, raw"),
        ("ICEFLEET_MAINTENANCE_EXPIRE_INTERVAL", "0s", "a positive duration such as 10m"),
    ],
)
def test_the_accepts_column_says_what_a_wrong_value_is_told(
    variable: str, value: str, accepts: str
) -> None:
    # Given a value the variable refuses
    with pytest.raises(ConfigError) as refused:
        # When it is loaded
        load_settings({variable: value})
    # Then the error and the reference's row for the variable state the same rule
    assert accepts in str(refused.value)
    row = next(line for line in settings_doc.render().splitlines() if f"`{variable}`" in line)
    assert accepts in row


def test_a_setting_without_a_docstring_stops_the_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given settings whose docstrings are all missing
    monkeypatch.setattr(settings_doc, "attribute_docs", lambda cls: {})
    # When the reference is rendered, Then it refuses, naming the field and the fix
    with pytest.raises(IcefleetError, match=r"Settings\.home \(ICEFLEET_HOME\).*make docs"):
        settings_doc.render()


def test_attribute_docs_reads_the_string_under_each_field() -> None:
    # Given a class with one field documented and one not
    @dataclass
    class Example:
        documented: int = 1
        """What it is,
        over two lines."""
        bare: int = 2

    # When its attribute docstrings are read, Then only the documented field has one, cleaned
    assert settings_doc.attribute_docs(Example) == {"documented": "What it is,\nover two lines."}


def test_a_parser_that_refuses_nothing_stops_the_generator() -> None:
    # Given a parser that takes any text, When asked what it accepts, Then the generator refuses
    with pytest.raises(IcefleetError, match="accepts every probe"):
        settings_doc.accepts(lambda raw: raw)


def test_main_prints_the_reference_or_writes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the rendered reference
    expected = settings_doc.render()
    # When main runs without a path, Then it prints it
    assert settings_doc.main([]) == 0
    assert capsys.readouterr().out == expected
    # When main runs with a path, Then it writes it there
    target = tmp_path / "configuration.md"
    assert settings_doc.main([str(target)]) == 0
    assert target.read_text(encoding="utf-8") == expected


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    # Given the README and every page of docs/
    pages = markdown_pages()
    assert len(pages) > 1
    # When their relative links are followed, Then each reaches a file (and heading) of the repo
    broken = [problem for page in pages for problem in broken_links(page)]
    assert broken == [], "broken links:\n" + "\n".join(broken)


def test_the_link_check_finds_a_missing_file_a_missing_heading_and_an_escape(
    tmp_path: Path,
) -> None:
    # Given a page in a repository of its own with good links and three bad ones
    root = tmp_path / "repo"
    root.mkdir()
    (root / "other.md").write_text("# Some `Heading`: here\n", encoding="utf-8")
    page = root / "page.md"
    page.write_text(
        "# Top\n[ok](other.md#some-heading-here) [self](#top) [gone](missing.md) "
        "[anchor](other.md#nope) [out](../elsewhere.md) [web](https://example.org/x) "
        "`[code](missing.md)`\n```\n[fenced](missing.md)\n```\n",
        encoding="utf-8",
    )
    # When its links are checked
    broken = broken_links(page, root)
    # Then exactly the three bad ones are reported, each with its reason
    assert broken == [
        "page.md: missing.md (no such file)",
        "page.md: other.md#nope (no such heading)",
        "page.md: ../elsewhere.md (outside the repository)",
    ]


def test_the_readme_keeps_the_quick_start_commands() -> None:
    # Given the README, Then it has the demo command and the test command CI runs (.ci/run)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert (
        "apt-get update && apt-get install -y redis-server make && pip install -e . "
        "&& icefleet demo\n" in readme
    )
    assert "pip install -e '.[test]' && make test\n" in readme
    # and it stays a page a newcomer reads in minutes, the reference being in docs/
    assert len(readme.encode("utf-8")) <= 10_240
