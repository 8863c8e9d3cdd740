"""``python -m benchmarks``: which benchmarks run, and with which options."""

from __future__ import annotations

import types

import pytest

import benchmarks.__main__ as runner


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    seen: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(runner, "available", lambda: ["bench_one", "bench_two"])

    def load(name: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(main=lambda argv: seen.append((name, argv)) and 0)

    monkeypatch.setattr(runner.importlib, "import_module", load)
    return seen


def test_options_after_one_name_go_to_that_benchmark(calls: list[tuple[str, list[str]]]) -> None:
    # When one benchmark is named with options, Then it runs with exactly those options
    assert runner.main(["one", "--duration", "600"]) == 0
    assert calls == [("benchmarks.bench_one", ["--duration", "600"])]


def test_several_names_run_with_their_defaults(calls: list[tuple[str, list[str]]]) -> None:
    # When two are named, or none, Then each runs with no options, in order
    assert runner.main(["two", "bench_one"]) == 0
    assert runner.main([]) == 0
    assert calls == [
        ("benchmarks.bench_two", []),
        ("benchmarks.bench_one", []),
        ("benchmarks.bench_one", []),
        ("benchmarks.bench_two", []),
    ]


@pytest.mark.parametrize("argv", [["--duration", "1"], ["one", "two", "--x"], ["nope"]])
def test_options_without_one_name_or_an_unknown_name_are_refused(
    calls: list[tuple[str, list[str]]], argv: list[str]
) -> None:
    # When options have no single benchmark, or a name is unknown, Then exit 2, nothing runs
    assert runner.main(argv) == 2
    assert calls == []
