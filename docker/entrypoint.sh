#!/bin/sh
# The image's entry point: `icefleet ARGS...`, unless the first word is a program on PATH.
#   docker run IMAGE worker writer                    -> icefleet worker writer
#   docker run IMAGE icefleet serve --host 0.0.0.0    -> icefleet serve --host 0.0.0.0
#   docker run IMAGE celery -A workers.app beat       -> celery -A workers.app beat
# exec: the program replaces this shell, so docker's SIGTERM reaches it directly (Celery's warm
# shutdown, uvicorn's graceful one); compose adds `init: true` to reap orphans.
set -eu
if [ "$#" -eq 0 ]; then
    set -- icefleet --help
else
    case "$(command -v -- "$1" 2>/dev/null || true)" in
        /*) ;;                      # a program: celery, icefleet, python, sh...
        *) set -- icefleet "$@" ;;  # an icefleet subcommand or option (even `wait`, a builtin)
    esac
fi
exec "$@"
