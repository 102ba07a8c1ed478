# Helpers of the benchmark scenarios (foam-bench, ppp-bench), sourced from /bench/bench-lib.sh:
# memsubject (tests/subjects/memsubject.c) as the subject, the guest clock, kup's JSON. They use
# $ST (memsubject's status file) and set PID.

ST=/tmp/ms.st        # memsubject's status file
PLAIN=/tmp/plain     # plain CRIU dump (tmpfs)
KWORK=/run/kup       # kup restore's work directory (CRIU logs, lazy-pages socket)

# Milliseconds of the guest's wall clock (busybox date has no %N).
now_ms() { adjtimex | awk '/tv_sec/ { s = $2 } /tv_usec/ { u = $2 } END { printf "%.0f\n", s * 1000 + u / 1000 }'; }

# json_flat: serde_json's pretty output (one value per line) as PATH=VALUE lines, e.g.
# apps.0.passes.1.pages_sent=1234 (strings without their quotes; empty arrays and null as they are).
json_flat() {
    awk '
        function path(   i, p) { p = ""; for (i = 1; i <= d; i++) if (k[i] != "") p = p (p == "" ? "" : ".") k[i]; return p }
        {
            line = $0; sub(/^[ \t]+/, "", line); sub(/,$/, "", line)
            if (line ~ /^"[^"]*": /) { key = line; sub(/^"/, "", key); sub(/".*/, "", key); val = line; sub(/^"[^"]*": /, "", val) }
            else { key = ""; val = line }
            if (val == "}" || val == "]") { d--; next }
            if (key == "" && d > 0 && arr[d]) key = "" idx[d]++
            if (val == "{" || val == "[") { d++; k[d] = key; arr[d] = (val == "["); idx[d] = 0; next }
            sub(/^"/, "", val); sub(/"$/, "", val)
            p = path(); print (p == "" ? key : p "." key) "=" val
        }'
}

# jget FILE PATH: one value of a JSON file (empty when absent).
jget() { json_flat <"$1" | awk -v p="$2" 'index($0, p "=") == 1 { print substr($0, length(p) + 2); exit }'; }

# show_logs LABEL FILE...: the last lines of CRIU's logs into the console log, for a failure.
show_logs() {
    label=$1
    shift
    for f in "$@"; do
        [ -f "$f" ] || continue
        tail -n 25 "$f" | sed "s|^|GUEST: INFO $label $f: |"
    done
}

# subj_start W D: a fresh subject, READY (filled and checked once), then $SUBJ_WARM s (default 3) of
# dirtying; $SUBJ_OPTS are more memsubject options (e.g. --dirty-on-signal); its output goes to
# $SUBJ_ERR (default /tmp/ms.err; /dev/null for a subject restored on another boot). Sets PID.
subj_start() {
    rm -f $ST $ST.tmp
    # shellcheck disable=SC2086 # SUBJ_OPTS is a list of options
    setsid memsubject --status $ST --private-mib "$1" --dirty-pct "$2" $SUBJ_OPTS </dev/null >"${SUBJ_ERR:-/tmp/ms.err}" 2>&1 &
    SUBJ_JOB=$!
    t0=$(now_ms)
    i=0
    while [ ! -e $ST ]; do
        kill -0 $SUBJ_JOB 2>/dev/null || fail "memsubject --private-mib $1 --dirty-pct $2 exited: $(cat "${SUBJ_ERR:-/tmp/ms.err}")"
        i=$((i + 1))
        [ $i -gt $(((60 + $1 / 2) * 10)) ] && fail "memsubject ($1 MiB) not READY after $((60 + $1 / 2)) s"
        usleep 100000
    done
    read -r line <$ST
    case $line in READY*) ;; *) fail "memsubject: $line" ;; esac
    PID=$(echo "$line" | sed -n 's/.* pid=\([0-9]*\).*/\1/p')
    [ -n "$PID" ] || fail "no pid in memsubject's status: $line"
    info "W=$1 D=$2: subject pid $PID ready after $(($(now_ms) - t0)) ms ($(awk '/^VmRSS/ { print $2 / 1024 " MiB RSS" }' /proc/$PID/status))"
    sleep "${SUBJ_WARM:-3}"
}

# reap: the subject was dumped (CRIU killed it); reap it (it is our child) and wait until its pid is free.
reap() {
    wait $SUBJ_JOB 2>/dev/null || true
    pid_gone $PID || fail "pid $PID still exists 30 s after the dump"
}

# pid_gone PID: waits up to 30 s until /proc/PID is gone (restored tasks are reaped by /init).
pid_gone() {
    i=0
    while [ -d "/proc/$1" ]; do
        i=$((i + 1))
        [ $i -gt 300 ] && return 1
        usleep 100000
    done
}

# verify LABEL W: SIGUSR1 to the (restored) subject; its memory check must say OK.
verify() {
    rm -f $ST
    kill -USR1 "$PID" 2>/dev/null || fail "$1: no process $PID after the restore"
    t0=$(now_ms)
    i=0
    while [ ! -e $ST ]; do
        [ -d "/proc/$PID" ] || fail "$1: the restored subject $PID died"
        i=$((i + 1))
        [ $i -gt $(((60 + $2 / 2) * 10)) ] && fail "$1: no answer to SIGUSR1 within $((60 + $2 / 2)) s"
        usleep 100000
    done
    read -r line <$ST
    case $line in
        OK*) info "$1: memory check $line ($(($(now_ms) - t0)) ms)" ;;
        *) fail "$1: memory check after restore: $line" ;;
    esac
}

# subj_stop: SIGTERM (then SIGKILL) to the restored subject; waits until its pid is free.
subj_stop() {
    kill "$PID" 2>/dev/null || true
    pid_gone "$PID" && return 0
    kill -9 "$PID" 2>/dev/null || true
    pid_gone "$PID" || fail "pid $PID still exists after SIGKILL"
}

# median N...: the middle value (the lower middle for an even count).
median() {
    printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'
}


# kup_json NAME PID ARGS...: `kup --json checkpoint --pid PID --store $MNT ARGS...`, the JSON in
# /tmp/NAME.json; a failure shows kup's error and CRIU's logs and fails the scenario. Sets K_PASSES
# (how many passes), K_FROZEN, K_FINAL (the final dump's pages) and K_WHY (why the pre-dumps stopped).
kup_json() {
    name=$1 pid=$2
    shift 2
    rc=0
    kup --json checkpoint --pid "$pid" --store $MNT "$@" >/tmp/"$name".json 2>/tmp/"$name".err || rc=$?
    if [ $rc -ne 0 ]; then
        sed 's/^/GUEST: INFO kup checkpoint: /' /tmp/"$name".err
        show_logs criu $MNT/*/*/criu/*/criu.log
        fail "kup checkpoint $* exited $rc: $(tail -n 1 /tmp/"$name".err)"
    fi
    K_PASSES=$(json_flat </tmp/"$name".json | grep -c '^apps\.0\.passes\.[0-9]*\.kind=')
    K_FROZEN=$(jget /tmp/"$name".json apps.0.frozen_ms)
    K_FINAL=$(jget /tmp/"$name".json "apps.0.passes.$((K_PASSES - 1)).pages_sent")
    K_WHY=$(jget /tmp/"$name".json apps.0.converged)
}

# kup_checkpoint ITERATIONS [STORE]: checkpoints $PID into the store (default: rpramfs on /kup).
# Sets CK_ID CK_FROZEN CK_WALL CK_STATS; JSON in /tmp/ck.json.
kup_checkpoint() {
    store=${2:-$MNT}
    rc=0
    t0=$(now_ms)
    kup --json checkpoint --pid "$PID" --store "$store" --iterations "$1" >/tmp/ck.json 2>/tmp/ck.err || rc=$?
    t1=$(now_ms)
    if [ $rc -ne 0 ]; then
        sed 's/^/GUEST: INFO kup checkpoint: /' /tmp/ck.err
        show_logs criu "$store"/*/*/criu/*/criu.log
        fail "kup checkpoint --pid $PID --iterations $1 exited $rc: $(tail -n 1 /tmp/ck.err)"
    fi
    reap
    CK_ID=$(jget /tmp/ck.json checkpoint)
    CK_FROZEN=$(jget /tmp/ck.json apps.0.frozen_ms)
    CK_WALL=$((t1 - t0))
    # CRIU's own split of the final dump's frozen time: collecting pages (memdump) and handing them
    # to kup's page server, which writes them into the store (memwrite).
    CK_STATS=
    for dir in "$store/$CK_ID"/*/criu/"$1"; do
        kup criu-stats "$dir" >/tmp/ck-stats.json 2>&1 || continue
        CK_STATS="final dump: memdump $(jget /tmp/ck-stats.json memdump_time_us | awk '{ printf "%.0f", $1 / 1000 }') ms, memwrite $(jget /tmp/ck-stats.json memwrite_time_us | awk '{ printf "%.0f", $1 / 1000 }') ms (CRIU stats)"
    done
    if [ -z "$CK_ID" ] || [ -z "$CK_FROZEN" ] || [ "$CK_FROZEN" = null ]; then fail "kup checkpoint printed no checkpoint id or frozen_ms: $(cat /tmp/ck.json)"; fi
}

# kup_restore MODE: restores checkpoint $CK_ID (eager|lazy). Sets R_RUNNING R_IMAGES R_FETCHED R_LINE.
kup_restore() {
    rc=0
    kup --json restore --store $MNT --checkpoint "$CK_ID" --"$1" --work-dir $KWORK >/tmp/rs.json 2>/tmp/rs.err || rc=$?
    if [ $rc -ne 0 ]; then
        sed 's/^/GUEST: INFO kup restore: /' /tmp/rs.err
        cat /tmp/rs.json
        show_logs criu $KWORK/"$CK_ID"/*/restore.log $KWORK/"$CK_ID"/*/lazy-pages.log
        fail "kup restore --checkpoint $CK_ID --$1 exited $rc: $(tail -n 1 /tmp/rs.err)"
    fi
    R_RUNNING=$(jget /tmp/rs.json apps.0.running_ms)
    R_IMAGES=$(jget /tmp/rs.json apps.0.images_ms)
    R_FETCHED=$(jget /tmp/rs.json apps.0.fetched_ms)
    [ -n "$R_RUNNING" ] || fail "kup restore printed no running_ms: $(cat /tmp/rs.json)"
    PID=$(jget /tmp/rs.json apps.0.pid)
    R_LINE="running again after $R_RUNNING ms (images $R_IMAGES ms)"
    if [ "$1" = lazy ]; then
        R_LINE="$R_LINE, all memory fetched after $R_FETCHED ms (pages: $(jget /tmp/rs.json apps.0.pages_eager) eager, $(jget /tmp/rs.json apps.0.pages_lazy) lazy, $(jget /tmp/rs.json apps.0.pages_served) served in $(jget /tmp/rs.json apps.0.lazy_requests) requests; kup's page server read and checked them in $(jget /tmp/rs.json apps.0.server_read_ms) ms and sent them in $(jget /tmp/rs.json apps.0.server_send_ms) ms, waiting for CRIU included)"
    else
        R_LINE="$R_LINE ($(jget /tmp/rs.json apps.0.pages_eager) pages eager, written into the stopped tasks in $(jget /tmp/rs.json apps.0.fill_ms) ms (reading and checking $(jget /tmp/rs.json apps.0.fill_read_ms) ms, writing $(jget /tmp/rs.json apps.0.fill_write_ms) ms), $(jget /tmp/rs.json apps.0.pages_forced) of them through /proc/PID/mem)"
    fi
}

# passes_line: pages per pass of /tmp/ck.json.
passes_line() {
    json_flat </tmp/ck.json | awk -F= '
        match($1, /^apps\.0\.passes\.[0-9]+\./) {
            n = substr($1, 15) + 0; f = substr($1, RLENGTH + 1); v[n, f] = $2; if (n + 1 > np) np = n + 1
        }
        END {
            for (n = 0; n < np; n++)
                printf "%spass %d %s: %s pages sent, %s unchanged, %.1f s, frozen %s ms", (n ? "; " : ""), n + 1, v[n, "kind"], v[n, "pages_sent"], v[n, "pages_unchanged"], v[n, "seconds"], v[n, "frozen_ms"]
            print ""
        }'
}


# plain_dump: a fresh subject (W, D) dumped by plain CRIU into $PLAIN (tmpfs) and reaped; its
# statistics in /tmp/plain-stats.json. Sets P_FROZEN (CRIU's frozen time, ms) and P_WALL.
plain_dump() {
    subj_start "$W" "$D"
    # With SUBJ_BURST set, the subject's burst of writes starts as the dump does.
    if [ -n "${SUBJ_BURST:-}" ]; then kill -USR2 "$PID"; fi
    rm -rf $PLAIN
    mkdir -p $PLAIN
    rc=0
    t0=$(now_ms)
    criu dump -t "$PID" -D $PLAIN -o dump.log >/tmp/criu.out 2>&1 || rc=$?
    t1=$(now_ms)
    [ $rc -eq 0 ] || { show_logs criu $PLAIN/dump.log; fail "criu dump -t $PID exited $rc: $(tail -n 2 /tmp/criu.out)"; }
    reap
    kup criu-stats $PLAIN >/tmp/plain-stats.json 2>&1 || fail "kup criu-stats $PLAIN: $(cat /tmp/plain-stats.json)"
    P_FROZEN=$(jget /tmp/plain-stats.json frozen_time_us | awk '{ printf "%.1f\n", $1 / 1000 }')
    P_WALL=$((t1 - t0))
}


# plain_restore LABEL: `criu restore -d` from $PLAIN, the memory check of the restored subject ($W
# MiB), its stop. Sets P_RESTORE (ms, until criu restore -d returned).
plain_restore() {
    rc=0
    t0=$(now_ms)
    criu restore -D $PLAIN -d -o restore.log >/tmp/criu.out 2>&1 || rc=$?
    t1=$(now_ms)
    [ $rc -eq 0 ] || { show_logs criu $PLAIN/restore.log; fail "criu restore -D $PLAIN exited $rc: $(tail -n 2 /tmp/criu.out)"; }
    P_RESTORE=$((t1 - t0))
    info "$1: running again after ${P_RESTORE} ms (wall, until criu restore -d returned)"
    verify "$1" "$W"
    subj_stop
    rm -rf $PLAIN
}


# ppp_bench_setup: the first boot of the PPP benchmarks: the arena attached, a fresh rpramfs store
# on the region, the initrd in the store for the next kernels, pids from 20000 on (free on the other
# kernel for the restored apps).
ppp_bench_setup() {
    modprobe -a nf_tables netlink_diag unix_diag inet_diag tcp_diag udp_diag af_packet_diag 2>/dev/null || true
    kup ppp attach || fail "kup ppp attach failed"
    rpramfs mkfs "$REGION" >/tmp/mkfs.out 2>&1 || fail "rpramfs mkfs $REGION failed: $(tail -n 2 /tmp/mkfs.out)"
    rp_mount
    info "$(uname -r); RAM: $(awk '/^MemTotal/ { print int($2 / 1024) }' /proc/meminfo) MiB; $REGION: $(region_mib) MiB; $(cat /proc/cmdline)"
    kup ppp status | sed 's/^/GUEST: INFO ppp: /'
    initrd_rebuild
    cp /boot/initrd $MNT/initrd || fail "copying the initrd into the store"
    echo 20000 >/proc/sys/kernel/ns_last_pid
}
