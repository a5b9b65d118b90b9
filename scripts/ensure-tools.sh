#!/usr/bin/env bash
# Make sure the test tools beyond the servers exist: headless Chromium with its
# WebDriver (the dashboard's browser test) and promtool (the alert rules' check).
#
#  * Found already on PATH (chromium, chromedriver, promtool)? Nothing to do.
#  * Else, as root with apt-get: `apt-get install` of the missing Debian packages
#    (chromium, chromium-driver, prometheus), with `apt-get update` first when
#    apt-cache does not know a package yet. A temporary policy-rc.d keeps Debian
#    from starting the prometheus service; we only want promtool.
#
# Idempotent and quiet on success; on failure prints what went wrong and exits 1.
set -euo pipefail

POLICY=/usr/sbin/policy-rc.d
POLICY_CREATED=0
LOG=$(mktemp "${TMPDIR:-/tmp}/flashsale-ensure-tools.XXXXXX")
cleanup() {
    if [ "$POLICY_CREATED" = 1 ]; then rm -f "$POLICY"; fi
    rm -f "$LOG"
}
trap cleanup EXIT

fail() {
    echo "ensure-tools: $*" >&2
    if [ -s "$LOG" ]; then tail -n 40 "$LOG" >&2; fi
    exit 1
}

missing() {  # the Debian packages whose binaries are not found, one a line
    command -v chromium >/dev/null 2>&1 || echo chromium
    command -v chromedriver >/dev/null 2>&1 || echo chromium-driver
    command -v promtool >/dev/null 2>&1 || echo prometheus
}

mapfile -t need < <(missing)
if [ "${#need[@]}" = 0 ]; then exit 0; fi

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    fail "missing ${need[*]}: install the Debian packages ${need[*]} (needs root and apt-get)"
fi
apt=(apt-get -o DPkg::Lock::Timeout=300 -q)
known=1
for pkg in "${need[@]}"; do
    if ! apt-cache show "$pkg" >/dev/null 2>&1; then known=0; fi
done
if [ "$known" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >>"$LOG" 2>&1 || fail "apt-get update failed"
fi
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\n# flashsale ensure-tools: do not start services\nexit 101\n' >"$POLICY"
    chmod 755 "$POLICY"
    POLICY_CREATED=1
fi
DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${need[@]}" \
    >>"$LOG" 2>&1 || fail "apt-get install ${need[*]} failed"

mapfile -t need < <(missing)
if [ "${#need[@]}" != 0 ]; then fail "still missing after apt-get install: ${need[*]}"; fi
