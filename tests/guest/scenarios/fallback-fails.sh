# fallback-fails: the update of update.sh, where on B both the restore fails and the way back cannot
# be loaded (KUP_TEST_FAULT=restore,kexec-load in kup-faults, the test-only build). kup resume must
# stop there, never loop: exit 1, the record `failed`, and an error that says where each app is (not
# running) and the exact command that restores them. The scenario then runs that command and every
# item must read back on B. (fallback-app covers a failed health check, with the apps running.)

. /bench/scenarios/update.sh

stage_b() {
    need kup-faults
    rc=0
    KUP_TEST_FAULT=restore,kexec-load kup-faults resume >/tmp/out 2>&1 || rc=$?
    sed 's/^/GUEST: INFO resume: /' /tmp/out
    [ $rc -eq 1 ] || fail "kup resume exited $rc, expected 1 (the fallback was made to fail)"
    grep -q "falling back to $(kver a) failed: the kernel /boot/vmlinuz-a does not load: kexec-load: failed on purpose" /tmp/out ||
        fail "the error does not say the fallback failed"
    grep -q "restore: failed on purpose" /tmp/out || fail "the error does not name the failed restore"
    grep -q "memcached-[0-9]*: not running" /tmp/out || fail "the error does not say memcached is not running"
    [ -z "$(pidof memcached)" ] || fail "memcached runs although its restore failed"
    cmd=$(sed -n 's/.*restore the apps by hand (after stopping any that still run) with: //p' /tmp/out)
    [ -n "$cmd" ] || fail "the error names no restore command"
    kup status | sed 's/^/GUEST: INFO status: /'
    kup status | grep -q '^  state: failed$' || fail "the update record does not say failed: $(kup status | sed -n 2p)"
    rc=0
    kup resume >/tmp/again 2>&1 || rc=$?
    [ $rc -eq 0 ] && grep -q "the last update is finished" /tmp/again || fail "a second kup resume did not stop at the failed update (exit $rc): $(cat /tmp/again)"
    info "running the printed command: $cmd"
    rc=0
    sh -c "$cmd" >/tmp/restore 2>&1 || rc=$?
    sed 's/^/GUEST: INFO restore: /' /tmp/restore
    [ $rc -eq 0 ] || fail "the printed command exited $rc"
    out=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "after the restore by hand: $out"
    pass "restore and fallback failed on $(uname -r); kup stopped (state failed) and its restore command brought memcached back: $out"
}
