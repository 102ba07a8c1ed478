# ppp: `kup update --ppp` A -> B with memcached holding PPP_ITEMS items of 64 KiB (1 GiB, twice the region). On A the arena
# (memmap=2G$4G) is attached at boot, before memcached starts, so its pages land there; kup pins
# them while CRIU holds memcached frozen and writes their PFNs into the checkpoint; B attaches the
# arena with those PFNs held back and `kup resume` maps them into the restored memcached (CRC first)
# before it runs. Every item must read back, and at least 90% of memcached's pages must be where they
# were before the update (the same PFN at the same address, from /proc/PID/pagemap).
# kup.ppp_opts=OPTION on the kernel command line (KUP_GUEST_APPEND) adds OPTION to kup update, e.g.
# --no-page-crc to measure what the CRCs cost.

PPP_ITEMS=16384
MC_VALUE=65536
MC_ADDR=127.0.0.1:11211

stage_a() {
    ppp_update_from_a
}

# ppp_update_from_a [KEY=VALUE...]: the PPP update from A, with KEY=VALUE added to B's command line.
ppp_update_from_a() {
    need rpramfs kup mctool memcached
    kup ppp attach || fail "kup ppp attach failed"
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    echo 20000 >/proc/sys/kernel/ns_last_pid
    mc_start 11211 1400
    out=$(mctool load --addr $MC_ADDR --items $PPP_ITEMS --value-size $MC_VALUE) || fail "loading memcached: $out"
    info "$out"
    mc=$(pidof memcached) || fail "memcached is not running"
    kup ppp status | sed 's/^/GUEST: INFO ppp: /'
    out=$(mctool pfns --pid "$mc" --out $MNT/pfns-before) || fail "reading memcached's PFNs: $out"
    info "before the update: $out"
    initrd_rebuild
    cp /boot/initrd $MNT/initrd-a || fail "copying the initrd into the store"
    rc=0
    kup update --ppp --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "$(next_cmdline b "$@")" --store ram --pid "$mc" \
        ${PPP_HEALTH_CHECK:+--health-check "$PPP_HEALTH_CHECK"} $(cmdline_arg kup.ppp_opts || true) \
        --old-kernel /boot/vmlinuz-a --old-initrd $MNT/initrd-a --old-append "$(next_cmdline a2)" || rc=$?
    fail "kup update --ppp returned (exit $rc) instead of switching kernels"
}

stage_b() {
    ppp_resume_checked
    pass "keys=$keys in_place=$in_place frozen_ms=$frozen checksum_ms=$checksum_ms crc_frozen_pages=$crc_frozen pin_ms=$pin_ms"
}

# ppp_resume_checked: `kup resume` on B, then every item, the pages in place, the module's state and
# the update record's figures checked; sets keys, in_place, frozen, checksum_ms, crc_frozen, pin_ms.
ppp_resume_checked() {
    rc=0
    kup resume || rc=$?
    [ $rc -eq 0 ] || fail "kup resume exited $rc"
    # What kup-resume.service runs next (kup resume attached the arena already).
    kup ppp attach --if-reserved || fail "kup ppp attach after the resume failed"
    kup status | sed 's/^/GUEST: INFO status: /'
    # The PFNs first: while the items are read (half a minute under TCG), the kernel may move the
    # released pages (6.12 did: 90-97 % in place read after, where PPP had put every kept page back).
    ppp_in_place "after the update"
    ppp_keys_back "after the update"
    # The update record's timeline: from "frozen" to "checkpoint-done" the apps were frozen.
    frozen=$(kup status | awk '$6 == "frozen" { f = $1 } $6 == "checkpoint-done" { d = $1 } END { if (f != "" && d != "") printf "%d", (d - f) * 1000 }')
    figure frozen_ms "$frozen"
    kup ppp status | sed 's/^/GUEST: INFO ppp: /'
    # Healthy: the module let go of the checkpoint's pages.
    kup ppp status | grep -q ' 0 held back for a restore, 0 pinned by a checkpoint, 0 kept intact' ||
        fail "the module still keeps checkpoint pages after a healthy resume: $(kup ppp status | tail -n 1)"
    # What verification cost: CRCs taken while memcached ran, and those taken while it was frozen.
    line=$(kup status | grep '^  ppp: ') || fail "the update record does not say what PPP did"
    checksum_ms=$(echo "$line" | sed -n 's/.*pins and CRCs \([0-9.]*\) ms while running.*/\1/p')
    crc_frozen=$(echo "$line" | sed -n 's/.* \([0-9]*\) pages while frozen.*/\1/p')
    pin_ms=$(echo "$line" | sed -n 's/.*frozen part \([0-9.]*\) ms.*/\1/p')
    figure checksum_ms "$checksum_ms"
    figure crc_frozen "$crc_frozen"
    figure pin_ms "$pin_ms"
}

# ppp_keys_back WHEN: every item of the checkpoint must read back; sets $keys.
ppp_keys_back() {
    out=$(mctool verify --addr $MC_ADDR --items $PPP_ITEMS --value-size $MC_VALUE) || fail "$1: $out"
    info "$out"
    keys=$(echo "$out" | sed -n 's/.*keys=\([0-9]*\/[0-9]*\).*/\1/p')
    figure keys "$keys"
    [ "$keys" = "$PPP_ITEMS/$PPP_ITEMS" ] || fail "keys=$keys $1"
}

# ppp_in_place WHEN [MIN%]: memcached's pages with the PFN they had before the update (pagemap) must
# be at least MIN% (default 90) of them; sets $in_place (P/T).
ppp_in_place() {
    mc=$(pidof memcached) || fail "memcached is not running $1"
    out=$(mctool pfns --pid "$mc" --out /tmp/pfns-after) || fail "reading memcached's PFNs $1: $out"
    in_place=$(mctool pfns-compare $MNT/pfns-before /tmp/pfns-after | sed -n 's/^in_place=//p')
    figure in_place "$in_place"
    same=${in_place%/*} total=${in_place#*/}
    [ $((same * 100)) -ge $((total * ${2:-90})) ] || fail "only $in_place of memcached's pages are where they were before the update, $1"
}

stage_a2() {
    kup resume || true
    kup status
    fail "kup resume fell back to $(uname -r)"
}
