# ppp-switch-fails: a PPP update whose `kexec -e` returns instead of switching, after memcached's
# final dump was committed and its pages pinned (KUP_TEST_FAULT=kexec-exec in kup-faults, the
# test-only build). kup must bring memcached back on A: the checkpoint is from this very boot, so its
# pages are still pinned and are mapped as copies (CRC checked); exit 1 naming the failure, every item
# readable, the record at resumed-on-old, and afterwards no page left pinned or held by the module.

. /bench/scenarios/ppp.sh
PPP_ITEMS=2048

stage_a() {
    need rpramfs kup kup-faults mctool memcached
    kup ppp attach || fail "kup ppp attach failed"
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    echo 20000 >/proc/sys/kernel/ns_last_pid
    mc_start 11211 256
    out=$(mctool load --addr $MC_ADDR --items $PPP_ITEMS --value-size $MC_VALUE) || fail "loading memcached: $out"
    mc=$(pidof memcached) || fail "memcached is not running"
    initrd_rebuild
    rc=0
    KUP_TEST_FAULT=kexec-exec kup-faults update --ppp --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "$(next_cmdline b)" \
        --store ram --pid "$mc" --old-kernel /boot/vmlinuz-a --old-initrd /boot/initrd >/tmp/out 2>&1 || rc=$?
    sed 's/^/GUEST: INFO kexec-exec: /' /tmp/out
    [ $rc -eq 1 ] || fail "kup update with the fault kexec-exec exited $rc, expected 1"
    grep -q "kexec-exec: failed on purpose" /tmp/out || fail "the error does not name the failed switch"
    grep -q "the apps were restored from checkpoint .* and run again on $(uname -r)" /tmp/out || fail "the error does not say the apps were restored here"
    grep -q "taken on this boot: its PPP pages are still pinned and are mapped as copies" /tmp/out || fail "the restore does not say it copies the pinned pages"
    [ "$(pidof memcached)" = "$mc" ] || fail "memcached is not back under its pid $mc"
    ppp_keys_back "after the failed switch"
    kup status | sed 's/^/GUEST: INFO status: /'
    kup status | grep -q 'state: resumed-on-old' || fail "the update record does not say resumed-on-old"
    kup ppp status | grep -q ' 0 held back for a restore, 0 pinned by a checkpoint, 0 kept intact' ||
        fail "the module still keeps checkpoint pages: $(kup ppp status | tail -n 1)"
    pass "kexec -e failed after the final dump; memcached restored on $(uname -r) from its pinned pages: keys=$keys"
}
