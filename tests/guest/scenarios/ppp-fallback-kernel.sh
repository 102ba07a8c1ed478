# ppp-fallback-kernel: ppp's update into a kernel B that panics before any kup code runs (as in
# fallback-kernel). The warm reset keeps RAM, so the arena's pages survive it; kernel A boots again
# and `kup resume` attaches the arena with the same PFNs held back, checks each page's CRC and maps
# them into the restored memcached: every item must read back, and the pages must be where they
# were (PFNs as before the update).

. /bench/scenarios/ppp.sh

stage_a() {
    if rpramfs info "$REGION" >/dev/null 2>&1; then
        after_reset
    else
        ppp_update_from_a rdinit=/kup-no-such-init
    fi
}

stage_b() { fail "kernel B reached the bench's init: it was meant to panic before running anything"; }
stage_a2() { stage_b; }

after_reset() {
    [ "$(uname -r)" = "$(kver a)" ] || fail "booted $(uname -r) after the reset, not A"
    rc=0
    kup resume || rc=$?
    [ $rc -eq 0 ] || fail "kup resume on A after the reset exited $rc"
    kup status | sed 's/^/GUEST: INFO status: /'
    kup status | grep -q '^  state: resumed-on-old$' || fail "the update record does not say resumed-on-old: $(kup status | sed -n 2p)"
    ppp_keys_back "after the reset"
    ppp_in_place "after the reset"
    pass "kernel $(kver b) panicked; back on $(uname -r) after the reset: keys=$keys in_place=$in_place"
}
