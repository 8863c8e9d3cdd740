#!/bin/sh
# Like the official image: options alone mean redis-server OPTIONS; the server runs as redis in
# /data with protected mode off (the compose network is the boundary, as in the official image).
set -eu
case "${1:-}" in
    -* | *.conf) set -- redis-server "$@" ;;
esac
if [ "${1:-}" = redis-server ]; then
    shift
    chown -R redis:redis /data
    exec setpriv --reuid=redis --regid=redis --init-groups redis-server --protected-mode no "$@"
fi
exec "$@"
