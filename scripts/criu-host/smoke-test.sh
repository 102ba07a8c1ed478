#!/usr/bin/env bash
# Dump + restore smoke test for the host CRIU that install.sh set up.
#
#   scripts/criu-host/smoke-test.sh [PRIVATE_KIB [SHARED_KIB]]     (defaults: 65536 = 64 MiB, 1024)
#
# Builds pattern.c, starts it under setsid (no tty, no sockets, stdio to a file), runs `criu dump`, checks the
# process is gone, runs `criu restore -d`, asks the restored process to verify its memory (SIGUSR1) and prints
# timings. Environment: CRIU (default: the wrapper install.sh prints), KUP_SMOKE_DIR (default a mktemp dir,
# removed on success unless KUP_SMOKE_KEEP=1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PRIV_KIB=${1:-65536}
SHR_KIB=${2:-1024}
CRIU=${CRIU:-$("$here/install.sh")}
W=${KUP_SMOKE_DIR:-$(mktemp -d /tmp/kup-criu-smoke.XXXXXX)}
mkdir -p "$W/img"
now() { date +%s.%N; }
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (b - a) * 1000 }'; }
wait_for() { # wait_for FILE PREFIX
    for _ in $(seq 200); do grep -q "^$2" "$1" 2>/dev/null && return 0; sleep 0.05; done
    echo "smoke: timed out waiting for '$2' in $1: $(cat "$1" 2>/dev/null)" >&2; return 1
}

cc -O2 -Wall -o "$W/pattern" "$here/pattern.c"
setsid -f "$W/pattern" "$W/status" "$PRIV_KIB" "$SHR_KIB" </dev/null >"$W/pattern.out" 2>&1
wait_for "$W/status" READY
pid=$(awk '{ print $2 }' "$W/status")
echo "smoke: pattern pid $pid: $(cat "$W/status")"
kill -USR1 "$pid"; wait_for "$W/status" OK

t0=$(now)
"$CRIU" dump -t "$pid" -D "$W/img" -o dump.log -v4
t_dump=$(now)
# criu kills the dumped task; its parent (init here) reaps it a moment later and only then is the pid free
for _ in $(seq 100); do [ -e "/proc/$pid" ] || break; sleep 0.02; done
if [ -e "/proc/$pid" ]; then echo "smoke: pid $pid still exists after dump: $(head -c 200 "/proc/$pid/stat")" >&2; exit 1; fi
t_gone=$(now)
rm -f "$W/status"
t1=$(now)
"$CRIU" restore -D "$W/img" -d -o restore.log -v4
t2=$(now)
kill -USR1 "$pid"; wait_for "$W/status" "OK\|BAD"
result=$(cat "$W/status")
kill -TERM "$pid" 2>/dev/null || true
echo "smoke: after restore: $result"
echo "smoke: image size $(du -sh "$W/img" | cut -f1), dump $(ms "$t0" "$t_dump") ms (pid freed after $(ms "$t_dump" "$t_gone") ms more), restore $(ms "$t1" "$t2") ms"
case "$result" in
    OK*) [ "${KUP_SMOKE_KEEP:-0}" = 1 ] || [ -n "${KUP_SMOKE_DIR:-}" ] || rm -rf "$W"; echo "smoke: PASS" ;;
    *) echo "smoke: FAIL (logs in $W/img)" >&2; exit 1 ;;
esac
