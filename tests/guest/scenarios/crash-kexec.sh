# crash-kexec: kernel A writes files continuously into rpramfs, each acknowledged after fsync of the
# file and its directory; in the middle the daemon gets kill -9 and A kexecs into B without unmounting.
# On B the mount recovers, every acknowledged file is intact, and fsck is clean after unmount.
# File contents are a function of their number, so B recomputes them; the number of acknowledged files
# travels on the kexec command line (kup.acked=).

# ~290 KiB, unique per file and line
crash_content() { awk -v f="$1" 'BEGIN { for (i = 1; i <= 12000; i++) printf "kup-crash-%s-%09d\n", f, i }'; }

crash_writer() {
    i=0
    while [ $i -lt 1000 ]; do
        i=$((i + 1))
        crash_content $i | dd of="$MNT/w/f$i" bs=65536 conv=fsync 2>/dev/null || exit 0
        sync "$MNT/w" 2>/dev/null || exit 0
        echo $i >/tmp/acked
    done
}

stage_a() {
    need rpramfs
    rpramfs mkfs "$REGION" || fail "rpramfs mkfs $REGION failed"
    rp_mount
    mkdir -p "$MNT/w" && sync "$MNT" || fail "mkdir $MNT/w"
    echo 0 >/tmp/acked
    crash_writer &
    writer=$!
    sleep 4
    acked_before=$(cat /tmp/acked)
    kill -0 $writer 2>/dev/null || fail "the writer stopped before the kill (acked $acked_before)"
    pids=$(pidof rpramfs) || fail "no rpramfs daemon to kill"
    kill -9 $pids
    mark "killed rpramfs daemon(s) $pids with SIGKILL while writing"
    wait $writer
    acked=$(cat /tmp/acked)
    [ "$acked" -ge 3 ] || fail "only $acked files acknowledged before the kill"
    info "$acked files acknowledged (fsync'd) before kill -9 of the daemon; kexec without unmount"
    kexec_to b b "kup.acked=$acked"
}

stage_b() {
    acked=$(cmdline_arg kup.acked) || fail "no kup.acked= on the command line"
    rp_mount
    rp_daemon_log
    i=0
    while [ $i -lt "$acked" ]; do
        i=$((i + 1))
        [ -f "$MNT/w/f$i" ] || fail "acknowledged file w/f$i is missing"
        want=$(crash_content $i | sha256sum | cut -c1-64)
        got=$(sha256sum <"$MNT/w/f$i" | cut -c1-64)
        [ "$got" = "$want" ] || fail "acknowledged file w/f$i differs (sha256 $got, expected $want)"
    done
    present=$(ls "$MNT/w" | wc -l)
    rp_umount
    rp_fsck --scrub
    pass "all $acked fsync'd files intact on $(uname -r) after kill -9 + kexec ($present files present)"
}
