"""Fail unless line and branch coverage each reach their floor, measured separately.

coverage.py's own ``fail_under`` checks one blended figure (statements and branches together),
which lets well-covered lines hide untested branches. This reads the totals of
``coverage json`` and checks each figure on its own.

Usage: python .ci/check_coverage.py [REPORT.json] [--min-lines 85] [--min-branches 80]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_REPORT = ".coverage-report.json"


def percent(covered: int, total: int) -> float:
    """Covered share in percent; nothing to cover counts as fully covered."""
    return 100.0 if total == 0 else 100.0 * covered / total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", default=DEFAULT_REPORT, type=Path)
    parser.add_argument("--min-lines", type=float, default=85.0, metavar="PCT")
    parser.add_argument("--min-branches", type=float, default=80.0, metavar="PCT")
    args = parser.parse_args(argv)

    try:
        totals = json.loads(args.report.read_text())["totals"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"coverage check: cannot read totals from {args.report}: {exc}", file=sys.stderr)
        return 2
    if totals.get("num_statements", 0) == 0:
        print("coverage check: FAIL, no statements measured (was any code imported?)")
        return 1
    if "num_branches" not in totals:
        print("coverage check: FAIL, no branch data (set [tool.coverage.run] branch = true)")
        return 1

    checks = [
        ("lines", totals["covered_lines"], totals["num_statements"], args.min_lines),
        ("branches", totals["covered_branches"], totals["num_branches"], args.min_branches),
    ]
    failed = False
    for name, covered, total, floor in checks:
        pct = percent(covered, total)
        ok = pct >= floor
        failed |= not ok
        verdict = "ok" if ok else "FAIL"
        print(f"coverage {name:<8} {pct:6.2f}% ({covered}/{total}), minimum {floor:g}%: {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
