# update-refuse: kup update refuses bad input before anything is stopped, and memcached keeps serving
# every item after each refusal: a missing kernel, a file that is no kernel, a command line that drops
# the region's memmap=, a pid that does not exist, a store without room, no --kernel with no newer
# kernel in /boot (none named by its release, then only the running one). --dry-run passes and
# stops nothing; without --kernel it chooses the newest kernel in /boot and its initrd.

MC_ITEMS=256
MC_VALUE=65536
MC_ADDR=127.0.0.1:11211

# refused WHAT EXPECTED-TEXT KUP-ARGS...: kup update must exit 1 naming the problem; memcached untouched.
refused() {
    what=$1 want=$2
    shift 2
    rc=0
    kup update --store ram --pid "$mc" --old-kernel /boot/vmlinuz-a --old-initrd /boot/initrd "$@" >/tmp/out 2>&1 || rc=$?
    sed "s/^/GUEST: INFO $what: /" /tmp/out
    [ $rc -eq 1 ] || fail "$what: kup update exited $rc, expected 1"
    grep -q -- "$want" /tmp/out || fail "$what: the error does not say '$want'"
    [ "$(pidof memcached)" = "$mc" ] || fail "$what: memcached (pid $mc) is not running any more"
    out=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "$what: $out"
}

stage_a() {
    need rpramfs kup mctool memcached
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    mc_start 11211 64
    out=$(mctool load --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "loading memcached: $out"
    mc=$(pidof memcached)
    initrd_rebuild
    good="$(next_cmdline b)"

    refused missing-kernel "does not exist" --kernel /boot/vmlinuz-nope --append "$good"
    refused not-a-kernel "not a bootable kernel image" --kernel /etc/passwd --append "$good"
    refused drops-memmap "drops memmap=" --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "console=ttyS0 quiet kup.stage=b"
    rc=0
    kup update --store ram --pid 4000000 --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "$good" \
        --old-kernel /boot/vmlinuz-a >/tmp/out 2>&1 || rc=$?
    sed "s/^/GUEST: INFO no-such-pid: /" /tmp/out
    [ $rc -eq 1 ] && grep -q "no process with pid 4000000" /tmp/out || fail "no-such-pid: exit $rc"
    fallocate -l 440M $MNT/filler || fail "fallocate of the filler"
    refused store-full "free space in the store" --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "$good"
    rm $MNT/filler
    [ -z "$(ls $MNT | grep -v lost)" ] || info "store after the refusals: $(ls $MNT | tr '\n' ' ')"

    rc=0
    kup update --dry-run --store ram --pid "$mc" --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "$good" \
        --old-kernel /boot/vmlinuz-a --old-initrd /boot/initrd >/tmp/out 2>&1 || rc=$?
    sed "s/^/GUEST: INFO dry-run: /" /tmp/out
    [ $rc -eq 0 ] || fail "--dry-run exited $rc"
    grep -q "preflight passed" /tmp/out || fail "--dry-run did not report its preflight"
    grep -Eq "estimate:   the apps write [0-9.]+ MiB/s of distinct pages .*then a final dump of ~[0-9.]+ MiB frozen for ~[0-9.]+ s" /tmp/out || fail "--dry-run printed no downtime estimate from the measured write rate"
    [ "$(pidof memcached)" = "$mc" ] || fail "--dry-run stopped memcached"
    out=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "after --dry-run: $out"

    # Without --kernel: the newest /boot/vmlinuz-<release> whose image is that release, newer than
    # the running kernel, with its initrd.img-<release>. The bench's vmlinuz-a and vmlinuz-b are
    # not named by release, so they are never picked.
    b_release=$(sed -n 's/^kup update: .* -> //p' /tmp/out)
    [ -n "$b_release" ] || fail "--dry-run did not name the new kernel's release"
    refused no-kernel-by-release "no kernel in /boot" --append "$good"
    ln -s vmlinuz-a "/boot/vmlinuz-$(uname -r)"
    refused newest-is-running "is the running one" --append "$good"
    ln -s vmlinuz-b "/boot/vmlinuz-$b_release"
    ln -s initrd "/boot/initrd.img-$b_release"
    rc=0
    kup update --dry-run --store ram --pid "$mc" --append "$good" --old-kernel /boot/vmlinuz-a --old-initrd /boot/initrd >/tmp/out 2>&1 || rc=$?
    sed "s/^/GUEST: INFO newest-kernel: /" /tmp/out
    [ $rc -eq 0 ] || fail "--dry-run without --kernel exited $rc"
    grep -qF "new kernel: /boot/vmlinuz-$b_release (the newest in /boot) (initrd /boot/initrd.img-$b_release)" /tmp/out ||
        fail "--dry-run without --kernel did not choose /boot/vmlinuz-$b_release with its initrd"
    rm "/boot/vmlinuz-$(uname -r)" "/boot/vmlinuz-$b_release" "/boot/initrd.img-$b_release"
    [ "$(pidof memcached)" = "$mc" ] || fail "the kernel choice stopped memcached"
    out=$(mctool verify --addr $MC_ADDR --items $MC_ITEMS --value-size $MC_VALUE) || fail "after the kernel choice: $out"
    pass "7 bad inputs refused before anything stopped, --dry-run passed, without --kernel it chose $b_release; memcached kept serving: $out"
}
