# cold: after a cold boot the region is zeroed (a fresh QEMU starts with zeroed RAM). Mount must refuse
# with a message that the region holds no rpramfs, exit non-zero, mount nothing and write nothing: the
# region stays all zeros, checked on A and again on B after a kexec.

# cold_zero_check WHEN: the whole region reads as zeros. od folds repeated lines into "*", so a zeroed
# region prints exactly one line of zeros and a "*" (the fastest whole-region check in busybox under
# TCG: ~10 s for 512 MiB, where cmp or sha256sum take 25-35 s).
cold_zero_check() {
    out=$(od -An -tx8 "$REGION" | head -n 3)
    [ "$out" = " 0000000000000000 0000000000000000
*" ] || fail "$REGION is not all zeros ($1): $(echo "$out" | head -n 1)"
}

cold_refuse() {
    mkdir -p "$MNT"
    rc=0
    rpramfs mount "$REGION" "$MNT" >/tmp/out 2>&1 || rc=$?
    sed 's/^/mount: /' /tmp/out
    [ $rc -ne 0 ] || fail "rpramfs mount of a zeroed region exited 0"
    grep -qi 'no rpramfs' /tmp/out || fail "mount's message does not say the region holds no rpramfs: $(cat /tmp/out)"
    ! grep -q " $MNT " /proc/mounts || fail "$MNT is mounted"
    wait_gone rpramfs 5 || fail "an rpramfs daemon is left running"
    info "mount refused (exit $rc): $(grep -i 'no rpramfs' /tmp/out | head -n 1)"
    rc=0
    rpramfs fsck "$REGION" >/tmp/out 2>&1 || rc=$?
    sed 's/^/fsck: /' /tmp/out
    [ $rc -ne 0 ] || fail "rpramfs fsck of a zeroed region exited 0"
}

stage_a() {
    need rpramfs
    cold_zero_check "at a cold boot"
    cold_refuse
    kexec_to b b
}

stage_b() {
    cold_zero_check "after mount and fsck on A"
    cold_refuse
    cold_zero_check "after mount and fsck on B"
    pass "mount refused a zeroed region and wrote nothing, on $(kver a) and $(kver b)"
}
