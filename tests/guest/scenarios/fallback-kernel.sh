# fallback-kernel: the update of update.sh into a kernel B that panics before any kup code runs (its
# command line names an init that does not exist). panic=-1 resets the machine; QEMU's default boot
# entry is still kernel A (kup never changes it), whose boot runs `kup resume` as a real host's would:
# it restores the same checkpoint from the region, which survived the reset; every item must be there.
# B must not get as far as the bench's init or kup (stages b, b2, a2 fail), the update record must show
# one resume attempt, on A, and no event on B; the host checks that the console shows B's panic
# between the switch and A's second boot (fallback-kernel.host.sh).

. /bench/scenarios/update.sh

stage_a() {
    if rpramfs info "$REGION" >/dev/null 2>&1; then
        after_reset
    else
        update_from_a rdinit=/kup-no-such-init
    fi
}

stage_b() { fail "kernel B reached the bench's init: it was meant to panic before running anything"; }
stage_b2() { stage_b; }
stage_a2() { fail "kup resume ran on B and fell back by kexec: B was meant to panic before running anything"; }

after_reset() {
    [ "$(uname -r)" = "$(kver a)" ] || fail "booted $(uname -r) after the reset, not A"
    resume_verified "on A after the reset"
    kup status | grep -q '^  state: resumed-on-old$' || fail "the update record does not say resumed-on-old: $(kup status | sed -n 2p)"
    r=$(resumed_release)
    [ "$r" = "$(kver a)" ] || fail "the update record says the apps resumed on '$r', not on A ($(kver a))"
    ups=$(kup status | awk '$(NF - 1) == "kernel-up" { n++ } END { print n + 0 }')
    [ "$ups" -eq 1 ] || fail "$ups kernel-up events in the timeline, not 1 (B must not have run kup resume)"
    on_b=$(kup status | awk -v b="$(kver b)" '$NF == b { n++ } END { print n + 0 }')
    [ "$on_b" -eq 0 ] || fail "the update's timeline has $on_b event(s) on B ($(kver b)): B ran kup instead of panicking"
    pass "kernel $(kver b) panicked; back on $(uname -r) after the reset with the same checkpoint, resumed on $r: $out"
}
