# smoke: the bench without the project's binaries. Kernel A writes 4 MiB of random data at 1 MiB into
# /dev/pmem0 with a header holding its SHA-256, kexecs into kernel B with the same memmap=, and B checks
# the data against the header and against the checksum passed on B's command line.

SMOKE_MIB=4

smoke_sum() { dd if=/dev/pmem0 bs=1M skip=1 count=$SMOKE_MIB 2>/dev/null | sha256sum | cut -d' ' -f1; }

stage_a() {
    dd if=/dev/urandom of=/tmp/pattern bs=1M count=$SMOKE_MIB 2>/dev/null || fail "no random pattern"
    sum=$(sha256sum </tmp/pattern | cut -d' ' -f1)
    dd if=/tmp/pattern of=/dev/pmem0 bs=1M seek=1 conv=notrunc 2>/dev/null || fail "writing /dev/pmem0"
    printf 'KUPSMOKE %s %s\n' "$sum" "$SMOKE_MIB" | dd of=/dev/pmem0 bs=4096 conv=notrunc,sync 2>/dev/null
    sync
    [ "$(smoke_sum)" = "$sum" ] || fail "read-back on A differs"
    info "wrote $SMOKE_MIB MiB sha256=$sum"
    kexec_to b b "kup.smoke=$sum"
}

stage_b() {
    want=$(cmdline_arg kup.smoke) || fail "no kup.smoke= on the command line"
    header=$(dd if=/dev/pmem0 bs=4096 count=1 2>/dev/null | head -n 1)
    [ "$header" = "KUPSMOKE $want $SMOKE_MIB" ] || fail "header on /dev/pmem0 is '$header'"
    got=$(smoke_sum)
    [ "$got" = "$want" ] || fail "data on /dev/pmem0 has sha256 $got, expected $want"
    pass "pmem data survived kexec $(kver a) -> $(kver b) (sha256 $got)"
}
