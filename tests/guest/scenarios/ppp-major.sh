# ppp-major: the PPP update of ppp.sh across major kernel releases, Debian's 6.1 (A) to its 6.12 (B),
# and back: ppp.ko built for each from its own headers package; the PFN lists written by one kernel's
# module are held back and mapped by the other's, and the second update pins, checksums and tracks
# writes on 6.12. After each update every item must read back on the target kernel itself (a fallback
# fails the scenario), with at least 90% of memcached's pages where they were before that update.

. /bench/scenarios/ppp.sh

# resumed_here TARGET: this is kernel TARGET (a|b), kup resume put memcached back with PPP and checked it.
resumed_here() {
    [ "$(uname -r)" = "$(kver "$1")" ] || fail "running $(uname -r), not $1 ($(kver "$1"))"
    ppp_resume_checked
    kup status | grep -q '^  state: resumed-on-new$' || fail "the update record does not say resumed-on-new: $(kup status | sed -n 2p)"
}

stage_b() {
    resumed_here b
    info "$(kver a) -> $(kver b): keys=$keys in_place=$in_place frozen_ms=$frozen"
    echo "$keys $in_place $frozen" >$MNT/ppp-major-first
    # Back to A: now 6.12's module pins the pages and writes the PFN lists.
    mc=$(pidof memcached) || fail "memcached is not running on B"
    out=$(mctool pfns --pid "$mc" --out $MNT/pfns-before) || fail "reading memcached's PFNs on B: $out"
    # One initramfs serves both kernels: A's copy in the store is B's fallback initrd too.
    initrd_rebuild
    rc=0
    kup update --ppp --kernel /boot/vmlinuz-a --initrd /boot/initrd --append "$(next_cmdline back)" --store ram --pid "$mc" \
        --old-kernel /boot/vmlinuz-b --old-initrd $MNT/initrd-a --old-append "$(next_cmdline b2)" || rc=$?
    fail "kup update --ppp from B returned (exit $rc) instead of switching kernels"
}

stage_back() {
    resumed_here a
    read -r keys1 in_place1 frozen1 <$MNT/ppp-major-first || fail "no figures of the first update in the store"
    pass "keys=$keys1,$keys in_place=$in_place1,$in_place frozen_ms=$frozen1,$frozen kernel=$(kver a)->$(kver b)->$(kver a)"
}

stage_b2() {
    kup resume || true
    kup status
    fail "kup resume fell back to $(uname -r)"
}
