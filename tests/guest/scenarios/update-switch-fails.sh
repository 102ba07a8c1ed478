# update-switch-fails: faults in kup update on A (kup-faults, the test-only build). First the new
# kernel does not load (KUP_TEST_FAULT=kexec-load): refused in the preflight, memcached untouched.
# Then kup update stops memcached (its final dump is committed) and `kexec -e` returns instead of
# switching (KUP_TEST_FAULT=kexec-exec): kup must bring memcached back on A from the checkpoint it
# just made: exit 1 naming the failure and the restored app, every item readable, and the update
# record at resumed-on-old.

MC_ITEMS=512
MC_VALUE=65536
MC_ADDR=127.0.0.1:11211

# faulty_update FAULT: kup-faults update A -> B of memcached with KUP_TEST_FAULT=FAULT, which must
# exit 1; its output is in /tmp/out.
faulty_update() {
    rc=0
    KUP_TEST_FAULT=$1 kup-faults update --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "$(next_cmdline b)" \
        --store ram --pid "$mc" --old-kernel /boot/vmlinuz-a --old-initrd /boot/initrd >/tmp/out 2>&1 || rc=$?
    sed "s/^/GUEST: INFO $1: /" /tmp/out
    [ $rc -eq 1 ] || fail "kup update with the fault $1 exited $rc, expected 1"
}

stage_a() {
    need rpramfs kup kup-faults mctool memcached
    rp_devdax
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    echo 20000 >/proc/sys/kernel/ns_last_pid
    mc_start 11211 128
    out=$(mctool load --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "loading memcached: $out"
    mc=$(pidof memcached) || fail "memcached is not running"
    initrd_rebuild
    faulty_update kexec-load
    grep -q "does not load: kexec-load: failed on purpose" /tmp/out || fail "the error does not say the kernel does not load"
    [ "$(pidof memcached)" = "$mc" ] || fail "memcached (pid $mc) did not keep running after the refused load"
    [ -z "$(ls $MNT)" ] || fail "the refused update left something in the store: $(ls $MNT)"
    out=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "after the refused load: $out"
    faulty_update kexec-exec
    grep -q "kexec-exec: failed on purpose" /tmp/out || fail "the error does not name the failed switch"
    grep -q "the apps were restored from checkpoint .* and run again on $(uname -r)" /tmp/out || fail "the error does not say the apps were restored here"
    [ "$(pidof memcached)" = "$mc" ] || fail "memcached is not back under its pid $mc"
    out=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "after the failed switch: $out"
    kup status | sed 's/^/GUEST: INFO status: /'
    kup status | grep -q 'state: resumed-on-old' || fail "the update record does not say resumed-on-old"
    kup status | grep -q 'switch-failed' || fail "the timeline has no switch-failed"
    pass "a kernel that does not load was refused before anything stopped; kexec -e failed after the final dump and memcached was restored on $(uname -r) from the checkpoint: $out"
}
