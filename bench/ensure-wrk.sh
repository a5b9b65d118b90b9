#!/usr/bin/env bash
# Make sure `wrk` (the bench's load generator) is installed: Debian's package.
# Quiet when it is there already; as root with apt-get it installs it;
# otherwise it says what to do and exits 1. bench/run.py itself installs nothing.
set -euo pipefail

if command -v wrk >/dev/null 2>&1; then exit 0; fi

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    LOG=$(mktemp "${TMPDIR:-/tmp}/flashsale-ensure-wrk.XXXXXX")
    trap 'rm -f "$LOG"' EXIT
    if DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q update >>"$LOG" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q install -y \
            --no-install-recommends wrk >>"$LOG" 2>&1 &&
        command -v wrk >/dev/null 2>&1; then
        exit 0
    fi
    echo "ensure-wrk: apt-get install wrk failed:" >&2
    tail -n 20 "$LOG" >&2
    exit 1
fi

echo "ensure-wrk: wrk is not installed; install it (Debian/Ubuntu: sudo apt-get install wrk)" >&2
exit 1
