"""Run many ``icefleet`` commands as separate processes while importing icefleet once.

``python -m tests.support.cli_fork`` reads a JSON object ``{name: [args...]}`` on stdin, imports the CLI,
then forks one child per command, all at once: each child has its own stdout and stderr (files),
runs ``icefleet ARGS`` exactly as the console script does (click's standalone mode, uncaught
exceptions printed by Python's own hook) and exits with the command's code. It prints
``{name: {"code": int, "stdout": str, "stderr": str}}``.

Why: importing the CLI (pyiceberg, pyarrow, redis) costs a second of CPU; a hundred commands on
a shared, loaded machine then take minutes, of which the commands themselves are a few seconds.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


def _child(args: list[str], out: Path, err: Path) -> None:  # pragma: no cover - a forked child
    stdout = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    stderr = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    sys.argv = ["icefleet", *args]
    from workers.cli.main import main

    code = 0
    try:
        main(args=args, prog_name="icefleet")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback a user would see
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(jobs: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    import workers.cli.main  # noqa: F401  (imported once, before forking)

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        children: dict[int, tuple[str, Path, Path]] = {}
        for n, (name, args) in enumerate(jobs.items()):
            out, err = Path(tmp) / f"{n}.out", Path(tmp) / f"{n}.err"
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                _child(args, out, err)
            children[pid] = (name, out, err)
        while children:
            pid, status = os.wait()
            if pid not in children:
                continue
            name, out, err = children.pop(pid)
            results[name] = {
                "code": os.waitstatus_to_exitcode(status),
                "stdout": out.read_text(errors="replace"),
                "stderr": err.read_text(errors="replace"),
            }
    return results


if __name__ == "__main__":
    print(json.dumps(run(json.load(sys.stdin))))
