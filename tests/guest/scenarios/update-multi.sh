# update-multi: three apps updated together A -> B: two memcached instances (ports 11211 and 11212,
# 64 MiB of items each, different seeds) and memsubject (a process that verifies its own 64 MiB of
# memory). All enter the final dump together; on B every item of both instances reads back and the
# memsubject finds every page intact.

MC_ITEMS=1024
MC_VALUE=65536

stage_a() {
    need rpramfs kup mctool memcached memsubject
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    echo 20000 >/proc/sys/kernel/ns_last_pid
    for port in 11211 11212; do
        mc_start $port 256
        out=$(mctool load --addr 127.0.0.1:$port --items $MC_ITEMS --value-size $MC_VALUE --seed $port) || fail "loading $port: $out"
        info "port $port: $out"
    done
    # The subject's status file lives in the store, which both kernels see.
    setsid memsubject --status $MNT/subject.status --private-mib 64 --memfd-mib 8 </dev/null >/dev/null 2>&1 &
    wait_for $MNT/subject.status 30 || fail "memsubject did not start"
    subject=$(sed -n 's/.*pid=\([0-9]*\).*/\1/p' $MNT/subject.status)
    pids=
    for p in $(pidof memcached) $subject; do pids="$pids --pid $p"; done
    initrd_rebuild
    cp /boot/initrd $MNT/initrd-a || fail "copying the initrd into the store"
    rc=0
    kup update --kernel /boot/vmlinuz-b --initrd /boot/initrd --append "$(next_cmdline b)" --store ram $pids \
        --old-kernel /boot/vmlinuz-a --old-initrd $MNT/initrd-a --old-append "$(next_cmdline a2)" || rc=$?
    fail "kup update returned (exit $rc) instead of switching kernels"
}

stage_b() {
    rc=0
    kup resume || rc=$?
    [ $rc -eq 0 ] || fail "kup resume exited $rc"
    for port in 11211 11212; do
        out=$(mctool verify --addr 127.0.0.1:$port --items $MC_ITEMS --value-size $MC_VALUE --seed $port) || fail "port $port after the update: $out"
        info "port $port: $out"
    done
    subject=$(sed -n 's/.*pid=\([0-9]*\).*/\1/p' $MNT/subject.status)
    rm -f $MNT/subject.status
    kill -USR1 "$subject" || fail "memsubject (pid $subject) is not running after the update"
    wait_for $MNT/subject.status 60 || fail "memsubject did not answer"
    status=$(cat $MNT/subject.status)
    case $status in OK*) ;; *) fail "memsubject after the update: $status" ;; esac
    pass "2 memcached instances ($MC_ITEMS items each) and memsubject updated together to $(uname -r): $status"
}

stage_a2() {
    kup status
    fail "kup resume fell back to $(uname -r)"
}
