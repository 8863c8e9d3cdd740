#!/bin/sh
# The image's entry point: `icefleet ARGS...`, unless the first word is a program on PATH.
#   docker run IMAGE worker writer                    -> icefleet worker writer
#   docker run IMAGE icefleet serve --host 0.0.0.0    -> icefleet serve --host 0.0.0.0
#   docker run IMAGE celery -A workers.app beat       -> celery -A workers.app beat
# exec: the program replaces this shell, so docker's SIGTERM reaches it directly (Celery's warm
# shutdown, uvicorn's graceful one); compose adds `init: true` to reap orphans.
#
# Secrets a role must not start without: for each variable ENTRYPOINT_REQUIRE_<NAME>=<hint>, the
# container refuses to start (exit 78, EX_CONFIG) unless <NAME> is set and not empty, and says so
# with the hint. compose.yaml asks for FLOWER_BASIC_AUTH and ICEFLEET_HTTP_TOKEN this way, so its
# other commands (config, down, ps...) work without them.
set -eu
missing=0
for required in $(env | sed -n 's/^ENTRYPOINT_REQUIRE_\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p'); do
    eval "value=\${$required:-}" # a shell name, matched above: nothing else is evaluated
    if [ -z "$value" ]; then
        eval "hint=\${ENTRYPOINT_REQUIRE_$required}"
        echo "icefleet-entrypoint: $required is not set: $hint" >&2
        missing=1
    fi
done
if [ "$missing" -ne 0 ]; then
    exit 78
fi
if [ "$#" -eq 0 ]; then
    set -- icefleet --help
else
    case "$(command -v -- "$1" 2>/dev/null || true)" in
        /*) ;;                      # a program: celery, icefleet, python, sh...
        *) set -- icefleet "$@" ;;  # an icefleet subcommand or option (even `wait`, a builtin)
    esac
fi
exec "$@"
