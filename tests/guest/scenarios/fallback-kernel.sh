# fallback-kernel: the update of update.sh into a kernel B that panics before any kup code runs (its
# command line names an init that does not exist). panic=-1 resets the machine; QEMU's default boot
# entry is still kernel A (kup never changes it), whose boot runs `kup resume` as a real host's would:
# it restores the same checkpoint from the region, which survived the reset; every item must be there.

. /bench/scenarios/update.sh

stage_a() {
    if rpramfs info "$REGION" >/dev/null 2>&1; then
        after_reset
    else
        update_from_a rdinit=/kup-no-such-init
    fi
}

after_reset() {
    [ "$(uname -r)" = "$(kver a)" ] || fail "booted $(uname -r) after the reset, not A"
    resume_verified "on A after the reset"
    kup status | grep -q '"resumed"' || fail "the update record does not say resumed"
    pass "kernel $(kver b) panicked; back on $(uname -r) after the reset with the same checkpoint: $out"
}
