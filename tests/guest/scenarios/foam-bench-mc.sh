# foam-bench-mc: memcached holding kup.mc_items= small items of mixed sizes (50-3000 bytes; default
# 20000, ~30 MiB; `make bench-foam`: 70000, ~107 MiB, the issue's workload) while `mctool churn`
# overwrites random items one acknowledged `set` at a time, as fast as memcached answers, during
# every dump (an ordinary cache's write load). In one boot of kernel A, store: rpramfs on the region
# made a devdax namespace:
#   1. plain `criu dump --leave-running` into tmpfs (kup's CRIU options for the app: established TCP
#      connections, the network lock), kup.samples= times (the baseline);
#   2. `kup checkpoint --throttle off --leave-running` (the pre-dumps stop on their own);
#   3. `kup checkpoint` with the defaults (at most 4 passes, --throttle 30); memcached is stopped;
#   4. lazy `kup restore` of 3, then every item must read back self-consistent and no older than
#      the newest generation memcached acknowledged to churn before the freeze (mctool verify
#      --acked): an acknowledged set lost across the checkpoint fails the scenario.
# Figures: the frozen times (CRIU's own) and pages of each final dump; the target (kup's
# final dump frozen <= 0.5x plain criu dump) is printed with its verdict, not enforced (TCG timing).
# (Stages run under set -e: commands whose failure is reported use `|| rc=$?`.)

. /bench/bench-lib.sh
MC_ADDR=127.0.0.1:11211
SIZES=50-3000

# churn_start N: the set load on the N items; churn_stop: its acknowledged generations in /tmp/acked.
churn_start() {
    rm -f /tmp/churn.stop /tmp/acked
    mctool churn --addr $MC_ADDR --items "$1" --value-sizes $SIZES --until-file /tmp/churn.stop --out /tmp/acked >/tmp/churn.out 2>&1 &
    CHURN=$!
    sleep 3
    kill -0 $CHURN 2>/dev/null || fail "mctool churn exited: $(cat /tmp/churn.out)"
}
churn_stop() {
    touch /tmp/churn.stop
    wait $CHURN || fail "mctool churn failed: $(cat /tmp/churn.out)"
    info "set load: $(cat /tmp/churn.out)"
}

# kup_ck NAME ARGS...: kup --json checkpoint of $mc (bench-lib's kup_json), reported.
kup_ck() {
    n=$1
    shift
    kup_json "$n" "$mc" "$@"
    sent=$(json_flat </tmp/"$n".json | sed -n 's/^apps\.0\.passes\.[0-9]*\.pages_sent=//p' | tr '\n' ' ')
    info "kup checkpoint $*: $K_PASSES passes sent ${sent% } pages; final dump frozen $K_FROZEN ms; pre-dumps stopped: $K_WHY"
}

stage_a() {
    need rpramfs kup mctool memcached criu
    ITEMS=$(cmdline_arg kup.mc_items) || ITEMS=20000
    SAMPLES=$(cmdline_arg kup.samples) || SAMPLES=1
    modprobe -a nf_tables netlink_diag unix_diag inet_diag tcp_diag udp_diag 2>/dev/null || true
    rp_devdax
    rpramfs mkfs "$REGION" >/tmp/mkfs.out 2>&1 || fail "rpramfs mkfs $REGION failed: $(tail -n 2 /tmp/mkfs.out)"
    rp_mount
    mc_start 11211 $((ITEMS * 3 / 1000 + 64))
    out=$(mctool load --addr $MC_ADDR --items "$ITEMS" --value-sizes $SIZES) || fail "loading memcached: $out"
    info "$out"
    mc=$(pidof memcached) || fail "memcached is not running"
    info "memcached pid $mc: $(grep -E 'VmRSS' /proc/$mc/status | tr -s ' \t' ' ')"
    churn_start "$ITEMS"

    # 1. The baseline: plain CRIU, the app left running.
    nl=
    command -v iptables >/dev/null || nl="--network-lock nftables"
    frozen=
    for s in $(seq 1 "$SAMPLES"); do
        rm -rf $PLAIN
        mkdir -p $PLAIN
        rc=0
        # shellcheck disable=SC2086 # nl is a list of options
        criu dump -t "$mc" -D $PLAIN -o dump.log --leave-running --tcp-established --skip-in-flight $nl >/tmp/criu.out 2>&1 || rc=$?
        [ $rc -eq 0 ] || { show_logs criu $PLAIN/dump.log; fail "criu dump -t $mc --leave-running exited $rc: $(tail -n 2 /tmp/criu.out)"; }
        kup criu-stats $PLAIN >/tmp/plain-stats.json 2>&1 || fail "kup criu-stats $PLAIN: $(cat /tmp/plain-stats.json)"
        f=$(jget /tmp/plain-stats.json frozen_time_us | awk '{ printf "%.1f\n", $1 / 1000 }')
        info "plain criu dump $s/$SAMPLES: frozen $f ms, $(jget /tmp/plain-stats.json pages_written) pages written, image $(du -sm $PLAIN | cut -f1) MiB"
        frozen="$frozen $f"
        sleep 2
    done
    # shellcheck disable=SC2086 # a list of samples
    P_FROZEN=$(median $frozen)
    rm -rf $PLAIN
    kill -0 "$mc" || fail "memcached died after the plain dump with --leave-running"

    # 2. kup without the throttle, left running.
    kup_ck off --throttle off --leave-running
    OFF_FROZEN=$K_FROZEN OFF_FINAL=$K_FINAL
    kill -0 "$mc" || fail "memcached died after kup checkpoint --leave-running"
    sleep 2

    # 3. kup with its defaults: memcached is stopped after the final dump.
    kup_ck auto
    AUTO_FROZEN=$K_FROZEN AUTO_FINAL=$K_FINAL AUTO_ID=$(jget /tmp/auto.json checkpoint)
    churn_stop
    wait_gone memcached 10 || fail "memcached still runs after the final dump"

    # 4. Every acknowledged set is in the restored memcached.
    rc=0
    kup restore --store $MNT --checkpoint "$AUTO_ID" >/tmp/restore.out 2>&1 || rc=$?
    sed 's/^/GUEST: INFO restore: /' /tmp/restore.out
    [ $rc -eq 0 ] || fail "kup restore exited $rc: $(tail -n 2 /tmp/restore.out)"
    out=$(mctool verify --addr $MC_ADDR --items "$ITEMS" --value-sizes $SIZES --acked /tmp/acked) || fail "after restore: $out"
    info "$out"

    ratio=$(awk -v k="$AUTO_FROZEN" -v p="$P_FROZEN" 'BEGIN { printf "%.2f", k / p }')
    ratio_off=$(awk -v k="$OFF_FROZEN" -v p="$P_FROZEN" 'BEGIN { printf "%.2f", k / p }')
    verdict=$(awk -v r="$ratio" 'BEGIN { print (r <= 0.5 ? "met" : "NOT met") }')
    echo "GUEST: TABLE foam-bench-mc: memcached, $ITEMS items of $SIZES bytes, mctool churn during every dump"
    echo "GUEST: TABLE   plain criu dump (median of $SAMPLES): frozen $P_FROZEN ms"
    echo "GUEST: TABLE   kup --throttle off: final dump $OFF_FINAL pages, frozen $OFF_FROZEN ms (${ratio_off}x plain)"
    echo "GUEST: TABLE   kup (defaults):     final dump $AUTO_FINAL pages, frozen $AUTO_FROZEN ms (${ratio}x plain)"
    echo "GUEST: TABLE targets: final-dump frozen under the set load <= 0.5x plain criu dump: ${ratio}x, $verdict"
    figure plain_frozen_ms "$P_FROZEN"
    figure kup_frozen_ms "$AUTO_FROZEN"
    pass "$out; plain_frozen_ms=$P_FROZEN off_frozen_ms=$OFF_FROZEN kup_frozen_ms=$AUTO_FROZEN ratio=$ratio"
}
