# converge: pre-dumps that stop when the dirty set stops shrinking, and auto-converge (`--throttle`),
# in one boot of kernel A (no kexec), with cgroup v2 mounted at /sys/fs/cgroup.
# memsubject rewrites the first kup.d= % (default 50) of its kup.w= MiB (default 128) at kup.rate=
# MiB/s (default 64), a little faster than a pass stores pages under TCG, so the set never shrinks.
#   1. `kup checkpoint --iterations 6 --throttle off --leave-running`: the pre-dumps must stop before the
#      limit, and the reason the pass table gives must agree with the pages the passes sent;
#   2. `kup checkpoint --iterations 6 --throttle T` (kup.throttle=, default 30, kup's default) of the same
#      subject (it keeps running after 1): one pre-dump runs with the subject held to T % of the CPU it used (it sits in the root cgroup,
#      so kup moves it into a child cgroup and back), and the final dump must send less than 0.9x the
#      pages of the unthrottled final dump of 1; no kup-throttle-* cgroup is left, the subject is back
#      in "/";
#   3. lazy `kup restore` of checkpoint 2; the subject checks all its memory (SIGUSR1 -> OK);
#   4. the restored subject moved into its own cgroup /app (cpu controller on): a throttled
#      checkpoint with --leave-running changes /app's cpu.max during the pass and puts "max 100000" back.
# Figures: the final dumps' pages and frozen times, with and without the throttle.
# (Stages run under set -e: commands whose failure is reported use `|| rc=$?`.)

. /bench/bench-lib.sh
CG=/sys/fs/cgroup

# ck NAME PID ARGS...: kup --json checkpoint of PID (bench-lib's kup_json), the figures that decide
# as INFO lines.
ck() {
    kup_json "$@"
    name=$1
    json_flat </tmp/"$name".json | grep -E '^apps\.0\.(converged|frozen_ms|passes\.[0-9]+\.(kind|pages_sent|seconds|frozen_ms|throttled))=' |
        sed "s/^/GUEST: INFO $name: /"
}

# sent NAME I: the pages pass I (0-based) of /tmp/NAME.json sent.
sent() { jget /tmp/"$1".json "apps.0.passes.$2.pages_sent"; }

stage_a() {
    need rpramfs kup memsubject criu
    W=$(cmdline_arg kup.w) || W=128
    D=$(cmdline_arg kup.d) || D=50
    R=$(cmdline_arg kup.rate) || R=64
    T=$(cmdline_arg kup.throttle) || T=30
    grep -q " $CG cgroup2" /proc/mounts || mount -t cgroup2 none $CG || fail "mount -t cgroup2 none $CG failed"
    grep -qw cpu $CG/cgroup.controllers || fail "no cpu controller in $CG/cgroup.controllers: $(cat $CG/cgroup.controllers)"
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    SUBJ_OPTS="--dirty-mib-per-s $R" subj_start "$W" "$D"

    # 1. No throttle: the pre-dumps stop on their own before the limit of 6 passes.
    ck plain "$PID" --iterations 6 --throttle off --leave-running
    n=$K_PASSES why=$K_WHY p_why=$K_WHY
    [ "$n" -lt 6 ] || fail "plain: all 6 passes ran although the subject rewrites the same $D % all the time ($why)"
    last=$(sent plain $((n - 2)))
    before=$(sent plain $((n - 3)))
    case $why in
        *"stopped shrinking"*)
            [ $((last * 10)) -gt $((before * 8)) ] || fail "plain: \"$why\" but the last pre-dump sent $last pages after $before" ;;
        *" pages were written during the last pre-dump (at most"*)
            [ "$last" -le 512 ] || fail "plain: \"$why\" but the last pre-dump sent $last pages" ;;
        *) fail "plain: the pre-dumps stopped for no reason the scenario knows: $why" ;;
    esac
    p_final=$K_FINAL p_frozen=$K_FROZEN
    kill -0 "$PID" || fail "the subject did not keep running after --leave-running"

    # 2. Throttled to $T % of its CPU use for one more pre-dump.
    ck throttled "$PID" --iterations 6 --throttle "$T"
    reap
    n=$K_PASSES why=$K_WHY
    case $why in *"ran throttled"*) ;; *) fail "throttled: no throttled pre-dump ($why)" ;; esac
    how=$(jget /tmp/throttled.json "apps.0.passes.$((n - 2)).throttled")
    case $how in "$T % of the "*" in $CG/kup-throttle-"*) ;; *) fail "throttled: the last pre-dump was not throttled as asked: $how" ;; esac
    t_final=$K_FINAL t_frozen=$K_FROZEN
    left=$(ls -d $CG/kup-throttle-* 2>/dev/null || true)
    [ -z "$left" ] || fail "throttled: kup left $left behind"
    [ $((t_final * 10)) -lt $((p_final * 9)) ] || fail "throttled: the final dump sent $t_final pages, not under 0.9x the $p_final without the throttle"
    info "final dump without the throttle: $p_final pages, frozen $p_frozen ms; after a pre-dump at $T % of its CPU use: $t_final pages, frozen $t_frozen ms"

    # 3. The throttled checkpoint restores, and every page is right.
    rc=0
    kup restore --store $MNT >/tmp/restore.out 2>&1 || rc=$?
    sed 's/^/GUEST: INFO restore: /' /tmp/restore.out
    [ $rc -eq 0 ] || fail "kup restore exited $rc: $(tail -n 2 /tmp/restore.out)"
    verify "restored" "$W"
    [ "$(sed -n 's/^0:://p' /proc/"$PID"/cgroup)" = / ] || fail "the restored subject is in cgroup $(cat /proc/"$PID"/cgroup), not the root it was dumped in"

    # 4. The app's own cgroup: its cpu.max changes during the pass and comes back.
    echo +cpu >$CG/cgroup.subtree_control
    mkdir -p $CG/app
    echo "$PID" >$CG/app/cgroup.procs || fail "cannot move the restored subject into $CG/app"
    ck own "$PID" --iterations 6 --throttle "$T" --leave-running
    how=$(jget /tmp/own.json "apps.0.passes.$((K_PASSES - 2)).throttled")
    case $how in "$T % of the "*" through $CG/app/cpu.max") ;; *) fail "own: the last pre-dump was not throttled through $CG/app/cpu.max: $how" ;; esac
    max=$(cat $CG/app/cpu.max)
    [ "$max" = "max 100000" ] || fail "own: $CG/app/cpu.max is \"$max\" after the checkpoint, not \"max 100000\" as before"
    verify "after the checkpoint in its own cgroup" "$W"
    subj_stop

    figure plain_final_pages "$p_final"
    figure plain_frozen_ms "$p_frozen"
    figure throttled_final_pages "$t_final"
    figure throttled_frozen_ms "$t_frozen"
    pass "final_pages=$p_final,$t_final frozen_ms=$p_frozen,$t_frozen (unthrottled, then at $T %; without the throttle: $p_why)"
}
