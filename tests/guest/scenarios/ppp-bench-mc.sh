# ppp-bench-mc: the KUP paper's Fig. 4 (memcached's downtime per technique) and Fig. 8 (1, 2 and 4
# memcached instances updated together), in one run. Every memcached instance holds kup.mc_items=
# items of 64 KiB (default 4096: 256 MiB), loaded by mctool with its port as the seed, and every item
# is read back after every restore (a missing or damaged item fails the scenario). memcached is
# idle while it is checkpointed (the client-side outage under load is another benchmark).
# On the first boot, for one instance:
#   basic        `criu dump` into tmpfs, `criu restore -d`
#   incremental  `criu pre-dump`, then `criu dump --track-mem` with it as the parent, `criu restore -d`
#   on-demand    `kup checkpoint --iterations 1` into rpramfs, `kup restore --lazy`
#   FOAM         `kup checkpoint --iterations 2` into rpramfs, `kup restore --lazy`
# and FOAM (2 passes) for 2 and 4 instances checkpointed and restored together. Then PPP: `kup update
# --ppp` of 1, 2 and 4 instances, each a real kexec to the other kernel, where `kup resume` maps the
# pages back (CRCs checked). Downtime: the frozen time, plus the switch PPP's update measured with
# as many instances (checkpoint-done -> restore-start: kexec, boot, mounts, the arena), plus the
# restore until the app runs (`criu restore -d` returned; kup restore's running_ms). PPP's is its
# update record's frozen -> running. At the end `GUEST: TABLE4` and `GUEST: TABLE8` lines (the host
# plots them: ppp-bench-mc.host.sh) and `ppp-bench-mc: ppp_downtime_1=... foam_over_ppp_4=...`.
# (Stages run under set -e: commands whose failure is reported use `|| rc=$?`.)

. /bench/bench-lib.sh

RES=$MNT/ppp-bench-mc.results # survives the kexecs (rpramfs); lines "KIND N FROZEN RESTORE [SWITCH]"
MC_VALUE=65536
COUNTS="1 2 4"

items() { cmdline_arg kup.mc_items || echo 4096; }

# mc_up N: N memcached instances on ports 11211.., each loaded; sets MC_PIDS and PIDS_OPT.
mc_up() {
    MC_PIDS= PIDS_OPT=
    for i in $(seq 1 "$1"); do
        port=$((11210 + i))
        before=" $(pidof memcached || true) "
        mc_start $port $(($(items) * 64 / 1024 + 64))
        out=$(mctool load --addr 127.0.0.1:$port --items "$(items)" --value-size $MC_VALUE --seed $port) || fail "loading memcached on $port: $out"
        pid=
        for p in $(pidof memcached); do
            case $before in *" $p "*) ;; *) pid=$p ;; esac
        done
        [ -n "$pid" ] || fail "no new memcached process for port $port"
        MC_PIDS="$MC_PIDS $pid"
        PIDS_OPT="$PIDS_OPT --pid $pid"
    done
    info "$1 memcached instance(s) ($(items) items of 64 KiB each): pids$MC_PIDS"
}

# mc_check N LABEL: every item of the N instances reads back.
mc_check() {
    for i in $(seq 1 "$1"); do
        port=$((11210 + i))
        out=$(mctool verify --addr 127.0.0.1:$port --items "$(items)" --value-size $MC_VALUE --seed $port) || fail "$2: port $port: $out"
    done
    info "$2: every item of $1 instance(s) read back"
}

# mc_reap: the dumped instances are gone (reaped if they are our children) and their pids free.
mc_reap() {
    for p in $MC_PIDS; do
        wait "$p" 2>/dev/null || true
        pid_gone "$p" || fail "pid $p still exists 30 s after the dump"
    done
}

# mc_down: stops every memcached.
mc_down() {
    MC_PIDS=$(pidof memcached || true)
    for p in $MC_PIDS; do kill "$p" 2>/dev/null || true; done
    for p in $MC_PIDS; do
        wait "$p" 2>/dev/null || true
        pid_gone "$p" || { kill -9 "$p" 2>/dev/null || true; pid_gone "$p" || fail "memcached $p does not stop"; }
    done
}

CRIU_MC="--tcp-established --skip-in-flight"
command -v iptables >/dev/null || CRIU_MC="$CRIU_MC --network-lock nftables"

# plain KIND: basic or incremental CRIU of one instance into tmpfs, then `criu restore -d`.
plain() {
    mc_up 1
    rm -rf $PLAIN
    mkdir -p $PLAIN/1 $PLAIN/2
    rc=0
    dir=$PLAIN/1
    if [ "$1" = incremental ]; then
        # shellcheck disable=SC2086 # CRIU_MC is a list of options
        criu pre-dump -t $MC_PIDS -D $PLAIN/1 -o dump.log $CRIU_MC >/tmp/criu.out 2>&1 || rc=$?
        [ $rc -eq 0 ] || { show_logs criu $PLAIN/1/dump.log; fail "criu pre-dump exited $rc"; }
        dir=$PLAIN/2
        # shellcheck disable=SC2086
        criu dump -t $MC_PIDS -D $dir --prev-images-dir ../1 --track-mem -o dump.log $CRIU_MC >/tmp/criu.out 2>&1 || rc=$?
    else
        # shellcheck disable=SC2086
        criu dump -t $MC_PIDS -D $dir -o dump.log $CRIU_MC >/tmp/criu.out 2>&1 || rc=$?
    fi
    [ $rc -eq 0 ] || { show_logs criu $dir/dump.log; fail "criu dump ($1) exited $rc: $(tail -n 2 /tmp/criu.out)"; }
    mc_reap
    kup criu-stats $dir >/tmp/plain-stats.json 2>&1 || fail "kup criu-stats $dir: $(cat /tmp/plain-stats.json)"
    frozen=$(jget /tmp/plain-stats.json frozen_time_us | awk '{ printf "%.0f\n", $1 / 1000 }')
    t0=$(now_ms)
    # shellcheck disable=SC2086
    criu restore -D $dir -d -o restore.log $CRIU_MC >/tmp/criu.out 2>&1 || rc=$?
    t1=$(now_ms)
    [ $rc -eq 0 ] || { show_logs criu $dir/restore.log; fail "criu restore ($1) exited $rc: $(tail -n 2 /tmp/criu.out)"; }
    info "$1: frozen $frozen ms, running again after $((t1 - t0)) ms"
    mc_check 1 "$1"
    mc_down
    rm -rf $PLAIN
    echo "$1 1 $frozen $((t1 - t0))" >>$RES
}

# kup_foam KIND N PASSES: N instances checkpointed together into rpramfs, restored lazily.
kup_foam() {
    mc_up "$2"
    rc=0
    # shellcheck disable=SC2086 # PIDS_OPT is a list of options
    kup --json checkpoint $PIDS_OPT --store $MNT --iterations "$3" >/tmp/ck.json 2>/tmp/ck.err || rc=$?
    [ $rc -eq 0 ] || { sed 's/^/GUEST: INFO kup checkpoint: /' /tmp/ck.err; fail "kup checkpoint ($1, $2 instances) exited $rc"; }
    mc_reap
    id=$(jget /tmp/ck.json checkpoint)
    frozen=$(json_flat </tmp/ck.json | awk -F= '/^apps\.[0-9]+\.frozen_ms=/ && $2 + 0 > m { m = $2 + 0 } END { printf "%.0f\n", m }')
    kup --json restore --store $MNT --checkpoint "$id" --lazy --work-dir $KWORK >/tmp/rs.json 2>/tmp/rs.err || rc=$?
    [ $rc -eq 0 ] || { sed 's/^/GUEST: INFO kup restore: /' /tmp/rs.err; fail "kup restore ($1, $2 instances) exited $rc"; }
    running=$(json_flat </tmp/rs.json | awk -F= '/^apps\.[0-9]+\.running_ms=/ && $2 + 0 > m { m = $2 + 0 } END { printf "%.0f\n", m }')
    info "$1, $2 instance(s): frozen $frozen ms, running again after $running ms"
    mc_check "$2" "$1"
    mc_down
    rm -rf "${MNT:?}/$id" "$KWORK/$id"
    echo "$1 $2 $frozen $running" >>$RES
}

stage_a() {
    need rpramfs kup criu memcached mctool
    ppp_bench_setup
    : >$RES
    mkdir -p $KWORK
    mount -o remount,size=$(($(items) * 64 / 1024 + 512))m /tmp || fail "remounting /tmp failed"
    plain basic
    plain incremental
    kup_foam on-demand 1 1
    for n in $COUNTS; do kup_foam foam "$n" 2; done
    ppp_update 1
}

# ppp_update I: `kup update --ppp` of the I-th count of instances, to the other kernel.
ppp_update() {
    n=$(echo $COUNTS | awk -v i="$1" '{ print $i }')
    mc_up "$n"
    next=b
    [ "$(which_kernel)" = b ] && next=a
    rc=0
    # shellcheck disable=SC2086 # PIDS_OPT is a list of options
    kup update --ppp --kernel "/boot/vmlinuz-$next" --initrd $MNT/initrd --append "$(next_cmdline r kup.i="$1")" --store ram $PIDS_OPT \
        --old-kernel "/boot/vmlinuz-$(which_kernel)" --old-initrd $MNT/initrd --old-append "$(next_cmdline back)" || rc=$?
    fail "kup update --ppp of $n instances returned (exit $rc) instead of switching kernels"
}

stage_r() {
    I=$(cmdline_arg kup.i) || fail "no kup.i= on the command line"
    n=$(echo $COUNTS | awk -v i="$I" '{ print $i }')
    rc=0
    kup resume || rc=$?
    [ $rc -eq 0 ] || fail "kup resume of $n instances exited $rc"
    kup ppp attach --if-reserved || fail "kup ppp attach after the resume failed"
    kup status | sed 's/^/GUEST: INFO status: /'
    mc_check "$n" "ppp"
    times=$(kup status | awk '$2 == "s" && $3 == "(+" { t[$6] = $1 } END { printf "%d %d %d", (t["checkpoint-done"] - t["frozen"]) * 1000, (t["restore-start"] - t["checkpoint-done"]) * 1000, (t["running"] - t["frozen"]) * 1000 }')
    set -- $times
    info "ppp, $n instance(s): frozen $1 ms, switch $2 ms, outage $3 ms"
    echo "ppp $n $1 $3 $2" >>$RES
    mc_down
    if [ "$I" -lt 3 ]; then
        ppp_update $((I + 1))
    fi
    report
}

# report: Fig. 4 and Fig. 8 as TABLE4 and TABLE8 lines (ms), and the summary line.
report() {
    awk '
        $1 == "ppp" { sw[$2] = $5; pf[$2] = $3; po[$2] = $4; next }
        { f[$1, $2] = $3; r[$1, $2] = $4; if (!($1 in seen)) { seen[$1] = 1; order[++k] = $1 } }
        END {
            printf "GUEST: TABLE4 %-12s | %9s %9s %9s\n", "technique", "frozen", "restore", "downtime"
            for (i = 1; i <= k; i++) {
                t = order[i]
                if (t == "foam" && !((t, 1) in f)) continue
                printf "GUEST: TABLE4 %-12s | %9d %9d %9d\n", t, f[t, 1], r[t, 1], f[t, 1] + sw[1] + r[t, 1]
            }
            printf "GUEST: TABLE4 %-12s | %9d %9d %9d\n", "ppp", pf[1], po[1] - pf[1] - sw[1], po[1]
            printf "GUEST: TABLE8 %9s | %9s %9s | %9s %9s | %7s\n", "instances", "foam_fz", "ppp_fz", "foam_out", "ppp_out", "switch"
            split("1 2 4", ns, " ")
            for (i = 1; i <= 3; i++) {
                n = ns[i]
                printf "GUEST: TABLE8 %9d | %9d %9d | %9d %9d | %7d\n", n, f["foam", n], pf[n], f["foam", n] + sw[n] + r["foam", n], po[n], sw[n]
            }
            printf "GUEST: TABLE ppp-bench-mc: ppp_downtime_1=%d foam_over_ppp_frozen_4=%.1f\n", po[1], (pf[4] > 0 ? f["foam", 4] / pf[4] : 0)
        }' $RES
    pass "Fig. 4 (basic, incremental, on-demand, FOAM, PPP) and Fig. 8 (1, 2 and 4 instances) measured, every item read back after every restore"
}

stage_back() {
    kup resume || true
    kup status
    fail "kup resume fell back to $(uname -r)"
}
