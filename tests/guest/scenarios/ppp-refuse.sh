# ppp-refuse: every bad input of `kup update --ppp` is refused before anything stops, with an error
# that names the problem, and memcached (started on A, PPP_ITEMS items of 64 KiB) keeps serving
# every item with the same pid: no module in the running kernel, the apps' pages outside the arena
# (memcached started before `kup ppp attach`), a new command line without the arena or with another
# one, no module for the new kernel, and pinning a process that CRIU does not hold stopped. Then
# `kup update --dry-run` without --ppp chooses PPP and says so, and no update was recorded.

PPP_ITEMS=1024
MC_VALUE=65536
MC_ADDR=127.0.0.1:11211
REFUSED=0 CASES=0

# refused WHAT TEXT CMD...: CMD must fail, print TEXT, and leave memcached ($mc) running.
refused() {
    what=$1 text=$2
    shift 2
    CASES=$((CASES + 1))
    rc=0
    "$@" >/tmp/refusal.out 2>&1 || rc=$?
    sed "s/^/GUEST: INFO $what: /" /tmp/refusal.out
    [ $rc -ne 0 ] || fail "$what: '$*' succeeded"
    grep -qF -- "$text" /tmp/refusal.out || fail "$what: the error does not say '$text'"
    if [ -n "${mc:-}" ]; then
        kill -0 "$mc" 2>/dev/null || fail "$what: memcached ($mc) is gone after the refusal"
        [ "$(pidof memcached)" = "$mc" ] || fail "$what: memcached is not the same process"
    fi
    REFUSED=$((REFUSED + 1))
}

# update_ppp APPEND...: kup update --ppp to B with command line APPEND.
update_ppp() {
    kup update --ppp --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "$1" --store ram --pid "$mc" \
        --old-kernel /boot/vmlinuz-a
}

stage_a() {
    need rpramfs kup mctool memcached
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    echo 20000 >/proc/sys/kernel/ns_last_pid
    initrd_rebuild
    ka=$(uname -r) kb=$(kver b)
    line=$(next_cmdline b)

    mv /lib/modules/$ka/extra/ppp.ko /tmp/ppp.ko.a || fail "no ppp.ko for $ka in the initramfs"
    refused "no module" "no PPP module for kernel $ka" kup ppp attach
    mv /tmp/ppp.ko.a /lib/modules/$ka/extra/ppp.ko

    mc_start 11211 256
    out=$(mctool load --addr $MC_ADDR --items $PPP_ITEMS --value-size $MC_VALUE) || fail "loading memcached: $out"
    mc=$(pidof memcached) || fail "memcached is not running"
    kup ppp attach || fail "kup ppp attach failed"
    refused "pages outside the arena" "lie in the arena" update_ppp "$line"

    kill "$mc"
    wait_gone memcached 10 || fail "memcached does not stop"
    mc=
    mc_start 11211 256
    out=$(mctool load --addr $MC_ADDR --items $PPP_ITEMS --value-size $MC_VALUE) || fail "loading memcached: $out"
    info "$out"
    mc=$(pidof memcached) || fail "memcached is not running"

    refused "no arena on the new command line" 'has no memmap=SIZE$START' update_ppp "$(echo "$line" | sed 's/,2G\$4G//')"
    refused "another arena on the new command line" 'reserves [0x100000000, 0x140000000)' update_ppp "$(echo "$line" | sed 's/,2G\$4G/,1G$4G/')"
    mv /lib/modules/$kb/extra/ppp.ko /tmp/ppp.ko.b || fail "no ppp.ko for $kb in the initramfs"
    refused "no module for the new kernel" "no ppp.ko for the new kernel $kb" update_ppp "$line"
    mv /tmp/ppp.ko.b /lib/modules/$kb/extra/ppp.ko
    refused "pinning a running process" "not stopped by CRIU" kup ppp pin --pid "$mc"
    # Pins taken while it runs (as before a freeze) cannot become a checkpoint's, and go with kup.
    refused "confirming the pins of a running process" "not stopped by CRIU" kup ppp pin --running --pid "$mc"

    # Everything in order: the default (no --ppp) is PPP, and the dry run says so.
    out=$(kup update --dry-run --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "$line" --store ram --pid "$mc" \
        --old-kernel /boot/vmlinuz-a) || fail "kup update --dry-run failed: $out"
    echo "$out" | sed 's/^/GUEST: INFO dry run: /'
    echo "$out" | grep -q '^  memory:     PPP: ' || fail "the dry run does not choose PPP"
    kup status | grep -q '^no update recorded' || fail "an update was recorded: $(kup status | head -n 2)"
    kup ppp status | grep -q ' 0 pinned by a checkpoint' || fail "pages stay pinned: $(kup ppp status)"
    out=$(mctool verify --addr $MC_ADDR --items $PPP_ITEMS --value-size $MC_VALUE) || fail "after the refusals: $out"
    keys=$(echo "$out" | sed -n 's/.*keys=\([0-9]*\/[0-9]*\).*/\1/p')
    figure keys "$keys"
    [ "$keys" = "$PPP_ITEMS/$PPP_ITEMS" ] || fail "keys=$keys after the refusals"
    pass "refused=$REFUSED/$CASES keys=$keys"
}
