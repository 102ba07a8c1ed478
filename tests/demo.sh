#!/usr/bin/env bash
# `make demo`: the memcached kernel update in the bundled QEMU guest (tests/guest/scenarios/update.sh).
# Kernel A runs memcached with 128 MiB of items and a client probing it every 10 ms; `kup update
# --store ram` checkpoints both into rpramfs on the guest's memmap= region and kexecs into kernel B,
# where `kup resume` brings them back. Ends with one line:
#   kup demo: PASS keys=N/N downtime_ms=D kernel=A->B      (or: kup demo: FAIL <reason>)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$(mktemp)
trap 'rm -f "$out"' EXIT
"$here/guest/run" update "$@" 2>&1 | tee "$out"
# GUEST: PASS update keys=N/N downtime_ms=D kernel=A->B baseline_downtime_ms=X baseline_keys=0/N
line=$(sed -n 's/.*GUEST: PASS update \(keys=.*\)$/\1/p' "$out" | tail -n 1)
if [ -n "$line" ] && grep -q '^RESULT: PASS update' "$out"; then
    set -- $line
    echo "without kup (stop memcached, reboot into B, start it): ${4/baseline_/} ${5/baseline_/}"
    echo "kup demo: PASS $1 $2 $3"
    exit 0
fi
why=$(sed -n 's/.*GUEST: FAIL update \(.*\)$/\1/p; s/^RESULT: FAIL update: \(.*\)$/\1/p' "$out" | head -n 1)
echo "kup demo: FAIL ${why:-see the log above}"
exit 1
