# update: `kup update --store ram` A -> B with memcached holding MC_ITEMS items of 64 KiB: kup checkpoints
# it (2 passes) into rpramfs on the region made a devdax namespace (/dev/dax0.0, as the operator guide
# recommends; the scenarios that define their own stage_a keep /dev/pmem0), writes the update record,
# unmounts, kexecs into B; on B
# `kup resume` (what a real host's boot runs) mounts the store, restores memcached lazily and checks it;
# every item must read back with its value. A client probes memcached with a get every 10 ms; it is
# updated along with memcached (a second app), and the longest gap between its answered gets is the
# downtime a client saw. Then the baseline an operator has without kup, on the same machine: stop
# memcached, reboot into B (kexec, the fast way), start memcached — its downtime, and the items it
# kept (none).

MC_ITEMS=2048
MC_VALUE=65536
MC_ADDR=127.0.0.1:11211

stage_a() {
    rp_devdax
    update_from_a
}

# update_from_a [KEY=VALUE...]: the update, with KEY=VALUE added to B's command line.
update_from_a() {
    need rpramfs kup mctool memcached
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    # Apps on a real host run with pids far above those early boot uses; CRIU needs them free again.
    echo 20000 >/proc/sys/kernel/ns_last_pid
    mc_start 11211 512
    out=$(mctool load --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "loading memcached: $out"
    info "$out"
    mc=$(pidof memcached) || fail "memcached is not running"
    setsid mctool probe --addr $MC_ADDR --interval-ms 10 --until-file /tmp/probe.stop --out /tmp/probe.out \
        </dev/null >/dev/null 2>&1 &
    probe=$!
    sleep 1
    kill -0 $probe 2>/dev/null || fail "the probe did not start"
    initrd_rebuild
    # The fallback kernel's initrd, kept in the store: B boots without it, and rebuilding it there
    # would delay the resume (a real host has it in /boot).
    cp /boot/initrd $MNT/initrd-a || fail "copying the initrd into the store"
    rc=0
    # Straight to the console: nothing of this boot survives the switch.
    kup update --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "$(next_cmdline b "$@")" --store ram --pid "$mc" --pid "$probe" \
        --old-kernel /boot/vmlinuz-a --old-initrd $MNT/initrd-a --old-append "$(next_cmdline a2)" || rc=$?
    fail "kup update returned (exit $rc) instead of switching kernels"
}

# resume_verified WHERE: kup resume must succeed and every item be back; prints the update's status
# and sets $out to mctool's verdict.
resume_verified() {
    rc=0
    # Straight to the console: a fallback switches kernels from inside kup resume.
    kup resume || rc=$?
    [ $rc -eq 0 ] || fail "kup resume $1 exited $rc"
    out=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "$1: $out"
    kup status | sed 's/^/GUEST: INFO status: /'
}

# resumed_release: the kernel the update record's "serving" event names, i.e. where kup resume brought
# the apps back and their health check passed (empty when there is none).
resumed_release() {
    kup status | awk '$(NF - 1) == "serving" { r = $NF } END { print r }'
}

# resumed_on_b: the update must have resumed on kernel B itself: this is B, the record says resumed,
# its serving event was on B, and there was no fallback.
resumed_on_b() {
    [ "$(uname -r)" = "$(kver b)" ] || fail "running $(uname -r), not B ($(kver b))"
    kup status | grep -q '^  state: resumed-on-new$' || fail "the update record does not say resumed-on-new: $(kup status | sed -n 2p)"
    r=$(resumed_release)
    [ "$r" = "$(kver b)" ] || fail "the update record says the apps resumed on '$r', not on B ($(kver b))"
    if kup status | grep -q ' fallback '; then fail "the timeline has a fallback"; fi
}

stage_b() {
    resume_verified "on $(uname -r)"
    resumed_on_b
    info "$out"
    touch /tmp/probe.stop
    wait_for /tmp/probe.out 10 || fail "the restored probe did not report"
    probe=$(cat /tmp/probe.out)
    info "$probe"
    downtime=$(echo "$probe" | sed -n 's/.*outage_ms=\([0-9]*\).*/\1/p')
    keys=$(echo "$out" | sed -n 's/.*keys=\([0-9]*\/[0-9]*\).*/\1/p')
    figure downtime_ms "$downtime"
    figure keys "$keys"
    [ "$keys" = "$MC_ITEMS/$MC_ITEMS" ] || fail "keys=$keys after the update, not $MC_ITEMS/$MC_ITEMS"
    # The baseline: stop memcached, reboot into B, start memcached.
    kill $(pidof memcached)
    wait_gone memcached 10 || fail "memcached does not stop"
    kexec_to b b2 "kup.t0=$(mctool now)" "kup.result=keys=$keys,downtime_ms=$downtime"
}

stage_b2() {
    t0=$(cmdline_arg kup.t0) || fail "no kup.t0"
    result=$(cmdline_arg kup.result | tr ',' ' ')
    case " $result " in *" keys="*" downtime_ms="*) ;; *) fail "kup.result is '$result', not keys=... downtime_ms=..." ;; esac
    for kv in $result; do figure "${kv%%=*}" "${kv#*=}"; done
    figure kup.t0 "$t0"
    mc_start 11211 512 3
    base_ms=$(($(mctool now) - t0))
    kept=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE | sed -n 's/.*keys=\([0-9]*\)\/.*/\1/p')
    figure baseline_downtime_ms "$base_ms"
    figure baseline_keys "$kept"
    info "side by side: kup update: $result | stop, reboot, start: downtime_ms=$base_ms keys=$kept/$MC_ITEMS"
    pass "$result kernel=$(kver a)->$(kver b) baseline_downtime_ms=$base_ms baseline_keys=$kept/$MC_ITEMS"
}

# Only after a fallback: A resumes the same checkpoint, but the update itself failed.
stage_a2() {
    rc=0
    kup resume || rc=$?
    out=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || true
    kup status
    fail "kup resume fell back to $(uname -r) (resume there exited $rc; $out)"
}
